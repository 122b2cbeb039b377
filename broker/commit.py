"""Group commit: the order in which a batch of the round policy's actions reaches disk and broker.

The coordinator judges the messages waiting in its inbox one after another and hands each event's
actions to :meth:`GroupCommit.add`. Nothing is performed then. :meth:`GroupCommit.flush` performs
the whole batch in the one order that keeps the policy's promise (an update is acknowledged only
once it, and the state that counts it, are durable):

1. every accepted payload is written durably, several at once (:class:`.intake.PayloadWriter`:
   the file system commits their fsyncs together, and each folder is fsynced once for the batch,
   several times faster than one file after another); the verified deltas join the
   round's spool (``kept``, not durable: rebuilt from the payloads after a crash);
2. the batch's round-log lines and the last state the policy produced are made durable together
   (:meth:`.store.RoundStore.save_state`): one append and one fsync, the acceptances being those
   lines; a transition also rewrites the state snapshot;
3. the acknowledgements, receipts, announcements and events, in the order they were produced.

A crash before step 2 leaves the messages unacknowledged: the broker delivers them again. A crash
after it leaves them unacknowledged too, but counted: the broker's second delivery is a
re-delivery, acknowledged again and not counted twice. The ``done`` hook hears each action's name
as it completes (the crash tests stop there).
"""

from __future__ import annotations

from typing import Callable

from fednca.transport.base import Message

from .round_events import Action, LogEvent, SaveState, StoreUpdate
from .round_state import RoundState
from .roundlog import LogRecord
from .errors import StoreError
from .intake import PayloadWriter
from .store import RoundStore


class GroupCommit:
    """Gathers a batch's actions; ``perform`` carries out each deferred one (ack, receipt,
    announcement), ``event`` publishes each round-log record once it is durable, and ``kept`` hears
    of each update stored (round, site, update id), in the order the policy accepted them."""

    def __init__(
        self, *, store: RoundStore, perform: Callable[[Action, Message | None], None],
        event: Callable[[LogRecord], None], done: Callable[[str], None],
        kept: Callable[[int, str, str], None] | None = None, stored_elsewhere: bool = False,
    ) -> None:  # fmt: skip
        self._store = store
        self._perform = perform
        self._event = event
        self._done = done
        self._kept = kept
        self._stored_elsewhere = stored_elsewhere  # workers stored the payloads (workers.py): check, not write
        self._writer = PayloadWriter(store=store)  # writes a batch's payloads at once
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
        """Store the batch's updates, make its lines and state durable, then ack, receipt, publish."""
        to_store, self._to_store = self._to_store, []
        self._store_updates(to_store)
        deferred, self._deferred = self._deferred, []
        records = [action.record for action, _ in deferred if isinstance(action, LogEvent)]
        if self._unsaved is not None:
            self._store.save_state(self._unsaved, log=records)
            self._unsaved = None
            self._done("SaveState")
        else:
            self._store.append_logs(records)  # the round log: one write and one fsync for the batch
        for action, message in deferred:
            if isinstance(action, LogEvent):
                self._event(action.record)
            else:
                self._perform(action, message)
            self._done(type(action).__name__)

    def _store_updates(self, batch: list[tuple[StoreUpdate, bytes]]) -> None:
        items = [(action.round, action.site, action.update_id, payload) for action, payload in batch]
        if self._stored_elsewhere:
            for round, site, update_id, _ in items:
                if not self._store.update_path(round, site, update_id).is_file():
                    raise StoreError(f"update {update_id} of site {site!r}: the worker that verified it did not store it")
        else:
            self._writer.write(items)
        for action, _ in batch:
            if self._kept is not None:
                self._kept(action.round, action.site, action.update_id)
            self._done("StoreUpdate")
