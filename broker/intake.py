"""The intake of update messages: the steps every update takes from the broker's queue to a durable
payload, the same in the coordinator and in each of its workers (:mod:`.workers`).

1. A batch is taken from the inbox (:func:`take_batch`): up to ``batch`` messages, the first
   waited for, the rest only if already there, so that one fsync round and one log append serve
   many messages while a quiet federation still answers each message at once.
2. Each message is charged to its site's budget (:meth:`Intake.admit`, :mod:`.admission`) before
   any crypto: a flood costs a bucket lookup, not an unsealing. Names that are not enrolled share
   one bucket, so inventing site names buys a flood nothing.
3. Each admitted update is opened once, on the verification threads (:meth:`Intake.submit`,
   :mod:`.verifier`): the whole batch is submitted at once, the results are then taken in arrival
   order, so what follows comes out exactly as with one thread.
4. The payloads that verified are written durably together (:class:`PayloadWriter`): several
   files fsynced at once and each folder once, before any of them is acknowledged.

What follows differs: the coordinator judges each opened update with the round policy
(:mod:`.commit` orders the rest), a worker forwards a record of it to the aggregator. Keeping the
common steps in one place keeps a worker admitting, opening and storing exactly what a coordinator
on its own would.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Mapping, Sequence, TypeVar

from nacl.public import PrivateKey

from fednca.keys import Registry
from fednca.transport.base import Client, Message

from .admission import Admission, budgets_for
from .store import RoundStore
from .telemetry import STATUS_MAX_BYTES
from .verifier import Opened, Verifier, open_update_once

STORE_THREADS = 8  # payloads of one batch written at once
UNENROLLED = "*"  # the one budget that every name not enrolled is charged to
T = TypeVar("T")

Payload = tuple[int, str, str, bytes]  # (round, site, update id, payload)


def take_batch(client: Client, *, batch: int, timeout: float, take: Callable[[Message], T]) -> list[T]:
    """``take`` of each of up to ``batch`` waiting messages, in arrival order (the first waited for
    up to ``timeout`` s, the others only if already waiting)."""
    taken: list[T] = []
    message = client.receive(timeout)
    while message is not None:
        taken.append(take(message))
        if len(taken) >= batch:
            break
        message = client.receive(0.0)
    return taken


def payer(site: str, registry: Registry) -> str:
    """The budget a message on ``site``'s topic is charged to."""
    return site if site in registry.sites else UNENROLLED


class Intake:
    """Admission and opening of the updates of one federation, for a model of ``shapes``, sealed
    to ``box_keys``; ``verifier`` the threads that open them."""

    def __init__(
        self, *, federation: str, box_keys: Sequence[PrivateKey], shapes: Mapping[str, tuple[int, ...]],
        max_update_bytes: int, verifier: Verifier, opener: Callable[[str, bytes, Registry], Opened] | None = None,
    ) -> None:  # fmt: skip
        self.federation = federation
        self._box_keys = list(box_keys)
        self.shapes = dict(shapes)
        self.max_update_bytes = max_update_bytes
        self._verifier = verifier
        self._opener = opener  # secure aggregation opens masked updates instead (broker/secure_rounds.py)
        self.admission = Admission(budgets=budgets_for(max_update_bytes=max_update_bytes,
                                                       status_max_bytes=STATUS_MAX_BYTES))  # fmt: skip

    def admit(self, site: str, kind: str, size: int, now: float, registry: Registry) -> bool:
        """Charge a message of ``size`` bytes on ``site``'s ``kind`` topic; False: refuse it."""
        return self.admission.admit(payer(site, registry), kind, size, now)

    def refused(self, site: str, registry: Registry) -> int:
        """How many messages the budget that ``site`` is charged to has refused so far."""
        return self.admission.refused(payer(site, registry)).messages

    def open(self, site: str, payload: bytes, registry: Registry) -> Opened:
        """Open ``payload`` from ``updates/<site>`` now, in this thread."""
        if self._opener is not None:
            return self._opener(site, payload, registry)
        return open_update_once(payload, site=site, box_keys=self._box_keys, registry=registry,
                                federation=self.federation, shapes=self.shapes,
                                max_bytes=self.max_update_bytes)  # fmt: skip

    def submit(self, site: str, payload: bytes, registry: Registry) -> "Future[Opened]":
        """Open ``payload`` on the verification threads."""
        return self._verifier.submit(self.open, site, payload, registry)


class PayloadWriter:
    """Writes a batch's payloads durably together (:meth:`.store.RoundStore.put_updates`): the file
    system commits their fsyncs at once, several times faster than one file after another. The
    threads are started by the first batch of more than one payload."""

    def __init__(self, *, store: RoundStore, threads: int = STORE_THREADS) -> None:
        self._store = store
        self._threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def write(self, items: Sequence[Payload]) -> None:
        if not items:
            return
        if len(items) > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self._threads, thread_name_prefix="store")
        self._store.put_updates(items, pool=self._pool)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
