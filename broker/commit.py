"""Group commit: the order in which a batch of the round policy's actions reaches disk and broker.

The coordinator judges the messages waiting in its inbox one after another and hands each event's
actions to :meth:`GroupCommit.add`. Nothing is performed then. :meth:`GroupCommit.flush` performs
the whole batch in the one order that keeps the policy's promise (an update is acknowledged only
once it, and the state that counts it, are durable):

1. every accepted payload is written durably, several at once: the file system then commits their
   fsyncs together, several times faster than one after another;
2. the last state the policy produced is saved, once for the batch;
3. the acknowledgements, receipts, announcements and events, in the order they were produced;
4. the batch's round-log lines, with one write and one fsync.

A crash before step 2 leaves the messages unacknowledged: the broker delivers them again. A crash
after it and before step 4 leaves lines out of the log, which :mod:`.recovery` writes back on the
restart. The ``done`` hook hears each action's name as it completes (the crash tests stop there).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from fednca.transport.base import Message

from .round_events import Action, LogEvent, SaveState, StoreUpdate
from .round_state import RoundState
from .roundlog import LogRecord
from .store import RoundStore

STORE_THREADS = 8  # payloads of one batch written at once


class GroupCommit:
    """Gathers a batch's actions; ``perform`` carries out each deferred one (ack, receipt,
    announcement) and ``event`` publishes each round-log record before it is appended."""

    def __init__(
        self, *, store: RoundStore, perform: Callable[[Action, Message | None], None],
        event: Callable[[LogRecord], None], done: Callable[[str], None],
    ) -> None:  # fmt: skip
        self._store = store
        self._perform = perform
        self._event = event
        self._done = done
        self._to_store: list[tuple[StoreUpdate, bytes]] = []
        self._unsaved: RoundState | None = None
        self._deferred: list[tuple[Action, Message | None]] = []

    def add(self, action: Action, message: Message | None) -> None:
        """One action of the batch; ``message`` is the one being handled (None for the clock's or
        the operator's events)."""
        if isinstance(action, StoreUpdate):
            assert message is not None, "only an update message is stored"
            self._to_store.append((action, message.payload))
        elif isinstance(action, SaveState):
            self._unsaved = action.state
        else:
            self._deferred.append((action, message))

    def flush(self) -> None:
        """Store the batch's updates, save the state that counts them, then ack, receipt and log."""
        to_store, self._to_store = self._to_store, []
        self._store_updates(to_store)
        if self._unsaved is not None:
            self._store.save_state(self._unsaved)
            self._unsaved = None
            self._done("SaveState")
        deferred, self._deferred = self._deferred, []
        records: list[LogRecord] = []
        for action, message in deferred:
            if isinstance(action, LogEvent):
                self._event(action.record)
                records.append(action.record)
            else:
                self._perform(action, message)
            self._done(type(action).__name__)
        self._store.append_logs(records)  # the round log: one write and one fsync for the batch

    def _store_updates(self, batch: list[tuple[StoreUpdate, bytes]]) -> None:
        def put(item: tuple[StoreUpdate, bytes]) -> None:
            action, payload = item
            self._store.put_update(action.round, action.site, action.update_id, payload)

        if len(batch) > 1:
            with ThreadPoolExecutor(max_workers=min(len(batch), STORE_THREADS), thread_name_prefix="store") as pool:
                list(pool.map(put, batch))  # re-raises the first failure
        elif batch:
            put(batch[0])
        for _ in batch:
            self._done("StoreUpdate")
