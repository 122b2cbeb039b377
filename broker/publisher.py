"""What the coordinator tells the world: the signed round announcement, signed receipts, and the
``events`` topic with its mirror in the ``logging`` module.

With model deltas on (:mod:`.downlink`), a round is announced twice, both retained: whole on the
``model`` topic first, then as a delta from the previous model on ``round``. Every site receives
``round``; only a site that does not hold the delta's base subscribes to ``model``, and by then it
holds the same round's whole model (or a newer one).

Every message goes out at QoS 1. The handles of those the broker has not yet taken are kept, so
that :meth:`Publisher.wait_published` can hold a shutdown until they are safe; without it a
receipt still in the client's memory would die with the process.

An event is the round-log record (:mod:`.roundlog`) with the federation's name added. A very large
federation's site lists can make one longer than the broker's limit; then each list is sent as its
length instead, and the full record stays in the round log.
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any, Callable, Mapping

import numpy as np
from nacl.signing import SigningKey

from fednca.config import ModelConfig, TrainConfig
from fednca.topics import Topics
from fednca.transport.base import Client, PayloadTooLarge, PublishHandle
from fednca.quantise import Quantised
from fednca.wire import make_announcement, make_receipt
from fednca.wire_secagg import SecureParams

from .round_events import SendReceipt
from .roundlog import LogRecord, encode

log = logging.getLogger("fednca.coordinator")

_TIMES = ("deadline", "previous_deadline")  # clock readings a reader wants as local dates, not unix time


def _shown(key: str, value: object) -> object:
    """A log line's value: the deadline fields as local dates (the JSON on ``events`` keeps the number)."""
    if key in _TIMES and isinstance(value, (int, float)):
        return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(value))
    return value

NO_UPDATE_ID = "0" * 32  # a receipt's update id when the update's own could not be read
_WARNING_KINDS = frozenset({"update_rejected", "update_dropped", "message_dropped", "deadline_extended",
                            "site_throttled", "lines_suppressed"})
_KEEP_HANDLES = 256  # answered handles are pruned once this many are held


class Publisher:
    """Publishes for one federation through ``client``, signing with ``signing_key``."""

    def __init__(
        self, *, client: Client, topics: Topics, federation: str, signing_key: SigningKey, train: TrainConfig,
        model: ModelConfig, clock: Callable[[], float] = time.time, update_dtype: str | None = None,
        model_topic: bool = False, max_staleness: int | None = None,
    ) -> None:  # fmt: skip
        self._client = client
        self._max_staleness = max_staleness  # announced in buffered asynchronous rounds (rounds.md)
        self._clock = clock  # tells each announcement's seconds_left
        self._topics = topics
        self._federation = federation
        self._signing = signing_key
        self._train = train
        self._model = model
        # Announced when the federation wants other than float16, the dtype every site assumes
        # unless told: an announcement without the field still opens on daemons that predate it.
        self._update_dtype = None if update_dtype in (None, "float16") else update_dtype
        self._model_topic = model_topic  # also publish the whole model on ``model`` (deltas on)
        self._pending: list[PublishHandle] = []  # not yet answered by the broker

    def announce(
        self, *, round: int, deadline: float, quorum: int, tensors: Mapping[str, np.ndarray],
        delta: tuple[str, Quantised] | None = None, secagg: SecureParams | None = None,
    ) -> None:  # fmt: skip
        """The signed, retained announcement of ``round`` with its global model (and, with secure
        aggregation, ``secagg``: the round's fixed point, threshold and roster).

        It carries the time left as well as the deadline: sites time the round by the former on
        their own clock (a site's wall clock may be hours off) and show the latter. ``delta``
        (base sha256, q8 delta giving ``tensors``) sends the model as that delta on ``round``.
        """
        deadline_s = math.ceil(deadline)
        seconds_left = min(max(deadline_s - math.floor(self._clock()), 0), deadline_s)
        fields = dict(
            federation=self._federation, round=round, deadline=deadline_s, quorum=quorum,
            train=self._train, model=self._model, tensors=tensors, signing_key=self._signing,
            seconds_left=seconds_left, update_dtype=self._update_dtype, max_staleness=self._max_staleness,
            secagg=secagg,
        )  # fmt: skip
        whole = make_announcement(**fields)  # type: ignore[arg-type]
        if self._model_topic:
            self._publish(self._topics.model, whole, retain=True)
        payload = whole if delta is None else make_announcement(**fields, delta=delta)  # type: ignore[arg-type]
        self._publish(self._topics.round, payload, retain=True)

    def receipt(self, action: SendReceipt) -> None:
        payload = make_receipt(
            federation=self._federation, site=action.site, round=action.round,
            update_id=action.update_id or NO_UPDATE_ID, reason=None if action.accepted else action.reason,
            signing_key=self._signing,
        )  # fmt: skip
        self._publish(self._topics.receipts(action.site), payload)

    def event(self, record: LogRecord) -> None:
        """One record on the ``events`` topic and as a line of the ``logging`` module."""
        fields = encode(record)
        message = {"federation": self._federation, **fields}
        try:
            self._publish(self._topics.events, _json(message))
        except PayloadTooLarge:  # a very large federation's site lists: send their lengths instead
            self._publish(self._topics.events, _json(_shortened(message, 0)))
        level = logging.WARNING if record.kind in _WARNING_KINDS else logging.INFO
        if not log.isEnabledFor(level):
            return
        # The log line has its own time, and names the kind first.
        shown = _shortened({k: v for k, v in fields.items() if k not in ("kind", "at")}, 8)
        log.log(level, "%s %s", record.kind, " ".join(f"{k}={_shown(k, v)}" for k, v in shown.items()))

    def wait_published(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until the broker has taken every message published so far."""
        deadline = time.monotonic() + timeout
        for handle in self._pending:
            if not handle.wait(max(0.0, deadline - time.monotonic())):
                return False
        self._pending = []
        return True

    def _publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        if len(self._pending) >= _KEEP_HANDLES:
            self._pending = [h for h in self._pending if not h.done]
        self._pending.append(self._client.publish(topic, payload, qos=1, retain=retain))


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":")).encode()


def _shortened(fields: Mapping[str, Any], longest: int) -> dict[str, Any]:
    """``fields`` with every list longer than ``longest`` replaced by its length."""
    return {k: len(v) if isinstance(v, list) and len(v) > longest else v for k, v in fields.items()}
