"""Opening updates on every core: unseal, verify, parse, once per update, on a pool of threads.

Opening an update is the coordinator's main work per message: a SealedBox decryption (X25519 and
XSalsa20-Poly1305), an Ed25519 verification, then parsing and bounding the tensors. PyNaCl calls
libsodium through cffi, which releases the GIL for the call, and numpy releases it for the
conversions, so threads use both cores of a small machine without the cost of a process pool
(pickling every payload and every delta across processes). Measured on this project's 2-core
machine: see docs/coordinator.md.

The order of what the coordinator does stays the order messages arrived: it submits a batch of
messages here, then takes each result in submission order (:meth:`concurrent.futures.Future.result`
of each, in turn), so receipts, acknowledgements and the round log come out exactly as with one
thread. :func:`open_update_once` is pure apart from the crypto: the same payload gives the same
:class:`Opened`.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar

import numpy as np
from nacl.public import PrivateKey

from fednca.aggregate_rows import Layout, flatten, layout_of, row_norm
from fednca.keys import Registry
from fednca.wire import UpdateHeader, WireError, check_update, verify_update

from .round_events import UpdateRejected, UpdateVerified

log = logging.getLogger("fednca.coordinator")

VERIFY_THREADS = max(2, len(os.sched_getaffinity(0)))
T = TypeVar("T")


@dataclass(frozen=True)
class Opened:
    """What one update message became: the policy's event and, when it verified, its delta as a
    float32 row (:func:`fednca.aggregate_rows.flatten`) with its global norm."""

    event: UpdateVerified | UpdateRejected
    row: np.ndarray | None = None
    norm: float = 0.0


def open_update_once(
    payload: bytes, *, site: str, box_keys: Sequence[PrivateKey], registry: Registry, federation: str,
    shapes: Mapping[str, tuple[int, ...]], max_bytes: int,
) -> Opened:  # fmt: skip
    """Unseal, verify and check ``payload`` from ``updates/<site>``; round and base model are the
    policy's to judge. A peer's garbage becomes ``UpdateRejected`` with the codec's reason."""
    try:
        verified = verify_update(payload, topic_site=site, coordinator_keys=list(box_keys), registry=registry,
                                 max_bytes=max_bytes)  # fmt: skip
        update = check_update(verified, federation=federation, round=None, base_sha256=None, shapes=shapes)
    except WireError as e:
        log.debug("update from %s refused: %s", site, e)
        h = e.header if isinstance(e.header, UpdateHeader) else None
        return Opened(UpdateRejected(site, h.update_id if h else None, e.reason, h.round if h else None))
    h = update.header
    layout: Layout = layout_of(shapes)
    row = flatten(update.delta, layout)
    event = UpdateVerified(site, h.update_id, h.round, h.base_sha256, h.samples, h.steps, h.partial, dict(h.metrics))
    return Opened(event, row, row_norm(row, layout))


class Verifier:
    """A pool of ``threads`` threads; ``submit`` returns a future, ``ordered`` maps in order."""

    def __init__(self, *, threads: int = VERIFY_THREADS) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads!r}")
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[..., T], *args: object, **kwargs: object) -> Future[T]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="verify")
        return self._pool.submit(fn, *args, **kwargs)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
