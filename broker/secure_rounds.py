"""Secure aggregation in the coordinator: the I/O shell around :mod:`.unmask_phase` and
:mod:`fednca.secagg_round`, used by :class:`.coordinator.Coordinator` through a few hooks.

* **Roster** (:meth:`SecureRounds.params`): when a round is first announced, each enrolled site
  with an unused round key in the book (:mod:`fednca.round_keys`) is put on the roster, sorted by
  id, with the fixed point, weight cap and threshold; the parameters are written durably
  (``secagg/<round>/params.json`` in the round store) and the keys marked used in the book, so a
  re-announcement, or a restart, announces exactly the same roster.
* **Intake** (:meth:`SecureRounds.open`): the verification threads open a masked update instead
  of a plain one; a plain update is refused as ``wrong_update_kind``. The payload is stored and
  counted by the round policy as any update.
* **Unmasking** (:meth:`SecureRounds.begin`, :meth:`answer`, :meth:`tick`): when the round closes,
  its survivors and missing sites are written (``phase.json``), each survivor gets its request on
  ``receipts/<site>`` (published again every ``resend_s`` while it is silent), each answer is
  checked and written (``answers/<site>.bin``) before the coordinator acknowledges it. A
  coordinator killed at any instant resumes from these files and the stored masked updates.
* **Aggregate** (:meth:`SecureRounds.aggregate`): the survivors' weighted mean delta, decoded from
  the stored masked vectors and the answers, applied to the model and checked as any aggregate;
  a round given up keeps the previous model and says why. The refills the round's updates carried
  join the book then, before the next roster is drawn.

What the coordinator holds of a round: masked vectors (uniform on their own), the answers (the
survivors' self-mask seeds, shares of them, and seeds of pairs with missing sites) and nothing
from which one site's update follows.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from fednca.aggregate import AggregationConfig, check_model
from fednca.aggregate import apply as apply_delta
from fednca.aggregate_rows import layout_of, unflatten
from fednca.atomic import write_bytes
from fednca.fixedpoint import FixedPoint
from fednca.keys import CoordinatorKeys, Registry
from fednca.round_keys import RoundKeyError, read_book, write_book
from fednca.rounds_vocab import Reason, RoundReason
from fednca.secagg import SecAggError
from fednca.secagg_round import check_answer, unmask_mean
from fednca.tensorcodec import WireError, loads_strict
from fednca.topics import Topics
from fednca.transport.base import Client, TransportError
from fednca.wire import UpdateHeader, verify_update
from fednca.wire_envelope import UPDATE
from fednca.wire_secagg import (
    MASKED, MaskedUpdate, RosterEntry, SecureParams, UnmaskAnswer, check_masked, kind_of, make_unmask_request,
    max_masked_bytes, open_unmask_answer, secagg_field, verify_masked,
)

from . import unmask_phase as up
from .errors import StoreError
from .global_model import GlobalModel
from .round_events import UpdateRejected, UpdateVerified
from .round_state import RoundState
from .secure_config import SecureAggregationConfig
from .store import RoundStore
from .verifier import Opened

log = logging.getLogger("fednca.coordinator")

Shapes = Mapping[str, tuple[int, ...]]
ROUND_KEY_BOOK = "round-keys.json"  # in the federation's round store: every site's signed public round keys


class SecureRounds:
    """Secure aggregation for one federation's coordinator (see the module docstring)."""

    def __init__(self, *, config: SecureAggregationConfig, federation: str, store: RoundStore, keys: CoordinatorKeys,
                 book_path: Path, client: Client, clock: Callable[[], float], max_rounds: int | None = None,
                 done: Callable[[str], None] = lambda name: None) -> None:
        self._cfg = config
        self._max_rounds = max_rounds
        self._done = done  # hears "UnmaskRequested" and "AnswerStored" (the crash tests stop there)
        self._federation = federation
        self._store = store
        self._keys = keys
        self._book_path = Path(book_path)
        self._client = client
        self._topics = Topics(federation)
        self._clock = clock
        self._folder = store.folder / "secagg"
        self._params: dict[int, SecureParams] = {}
        self._lock = threading.Lock()  # params are read on the verification threads
        self._phase: up.UnmaskState | None = None
        self._updates: dict[str, MaskedUpdate] = {}  # the unmasked round's survivors
        self._answers: dict[str, UnmaskAnswer] = {}
        self._decision: up.Action | None = None  # Decode or GiveUp, until the model is made

    # -- the roster ----------------------------------------------------------------------------

    def params(self, round: int, enrolled: frozenset[str] | set[str], registry: Registry) -> SecureParams | None:
        """The round's parameters and roster: made and stored the first time, the same ever after."""
        with self._lock:
            if round in self._params:
                return self._params[round]
        path = self._folder / str(round) / "params.json"
        if path.exists():
            params = secagg_field.parse(path.read_text())
        else:
            book = read_book(self._book_path)
            chosen = {s: book.next_key(s) for s in sorted(enrolled) if s in registry.sites}
            lacking = sorted(s for s, k in chosen.items() if k is None)
            if lacking:
                log.warning("round %d: sites without an unused round key are left off the roster: %s (give each "
                            "one: fednca coordinator round-keys)", round, ", ".join(lacking))
            entries = [(s, k) for s, k in chosen.items() if k is not None]
            if not entries:
                log.error("round %d: no enrolled site has a round key; no site can send a masked update", round)
                return None
            roster = tuple(RosterEntry(site=s, x=i + 1, key_index=k.index, public=k.public)
                           for i, (s, k) in enumerate(entries))
            n = len(roster)
            fp = FixedPoint(bound=float(self._cfg.bound), frac_bits=self._cfg.frac_bits_for(n), ring_bits=self._cfg.ring_bits)
            params = SecureParams(fixed_point=fp, max_weight=self._cfg.max_weight,
                                  threshold=self._cfg.threshold_for(n), roster=roster)
            # The keys are spent first: a crash between the two writes then wastes one key per
            # site, where the other order would let the next round's roster name the same key.
            write_book(self._book_path, book.mark_used({e.site: e.key_index for e in roster}))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(path, secagg_field.format(params).encode())
        with self._lock:
            self._params[round] = params
        return params

    def announced(self, round: int, enrolled: frozenset[str], registry: Registry) -> SecureParams | None:
        """What the announcement of ``round`` carries: its parameters, none for the final model's."""
        if self._max_rounds is not None and round > self._max_rounds:
            return None  # the federation's last announcement: nothing to train, no key to spend
        return self.params(round, enrolled, registry)

    # -- intake (verification threads) ---------------------------------------------------------

    def opener(self, shapes: Shapes) -> Callable[[str, bytes, Registry], Opened]:
        """What the intake opens each update with, for a model of ``shapes``."""
        n = sum(math.prod(s) for s in shapes.values())
        return functools.partial(self.open, n_values=n, max_bytes=max_masked_bytes(n))

    def open(self, site: str, payload: bytes, registry: Registry, *, n_values: int, max_bytes: int) -> Opened:
        """A masked update opened as the policy needs it; a plain one refused as ``wrong_update_kind``."""
        kind = kind_of(payload)
        if kind == UPDATE:
            try:
                h = verify_update(payload, topic_site=site, coordinator_keys=[self._keys.box], registry=registry,
                                  max_bytes=max_bytes).header
            except WireError as e:
                h = e.header if isinstance(e.header, UpdateHeader) else None
                return Opened(UpdateRejected(site, h.update_id if h else None, e.reason, h.round if h else None))
            return Opened(UpdateRejected(site, h.update_id, RoundReason.WRONG_UPDATE_KIND, h.round))
        try:
            if kind != MASKED:
                raise WireError(Reason.MALFORMED, "neither a masked update nor an unmask answer")
            update = verify_masked(payload, topic_site=site, coordinator_keys=[self._keys.box], registry=registry,
                                   max_bytes=max_bytes)
            h = update.header
            if h.federation != self._federation:
                raise WireError(Reason.WRONG_FEDERATION, f"for federation {h.federation!r}", header=h)
            params = self._stored_params(h.round)
            if params is None:  # a round announced without a roster: nothing could unmask it at the close
                raise WireError(RoundReason.NOT_ON_ROSTER, f"round {h.round} has no secure-aggregation roster",
                                header=h)
            check_masked(update, params=params, n_values=n_values)  # another round's is then the policy's to refuse
        except WireError as e:
            log.debug("masked update from %s refused: %s", site, e)
            h = e.header if isinstance(e.header, UpdateHeader) else None
            return Opened(UpdateRejected(site, h.update_id if h else None, e.reason, h.round if h else None))
        event = UpdateVerified(site, h.update_id, h.round, h.base_sha256, h.samples, h.steps, h.partial, dict(h.metrics))
        return Opened(event)

    def _stored_params(self, round: int) -> SecureParams | None:
        """The parameters of ``round`` if they were ever made (in memory, else in the store)."""
        with self._lock:
            params = self._params.get(round)
        if params is None:
            path = self._folder / str(round) / "params.json"
            if path.exists():
                params = secagg_field.parse(path.read_text())
        return params

    # -- unmasking -----------------------------------------------------------------------------

    def begin(self, state: RoundState, registry: Registry) -> bool:
        """Start (or resume) the unmasking of the closed round ``state``; True once decided."""
        if self._phase is not None and self._phase.round == state.round:
            return self._decision is not None
        params = self.params(state.round, state.enrolled, registry)
        if params is None:
            raise StoreError(f"round {state.round} closed without a roster")
        folder = self._folder / str(state.round)
        phase_path = folder / "phase.json"
        if phase_path.exists():
            saved = loads_strict(phase_path.read_text())
            survivors, missing, began = tuple(saved["survivors"]), tuple(saved["missing"]), float(saved["began_at"])
        else:
            survivors = tuple(sorted(a.site for a in state.accepted))
            missing = tuple(e.site for e in params.roster if e.site not in survivors)
            began = self._clock()
            write_bytes(phase_path, json.dumps({"survivors": survivors, "missing": missing, "began_at": began}).encode())
        self._updates = {}
        for a in state.accepted:
            try:
                self._updates[a.site] = verify_masked(self._store.read_update(state.round, a.site, a.update_id),
                                                      topic_site=a.site, coordinator_keys=[self._keys.box],
                                                      registry=registry)
            except WireError as e:
                raise StoreError(f"round {state.round}: the stored masked update of {a.site} no longer opens ({e})") from None
        self._answers = {}
        self._decision = None
        self._phase = up.UnmaskState(round=state.round, survivors=survivors, missing=missing,
                                     threshold=params.threshold, began_at=began, timeout_s=self._cfg.unmask_timeout_s,
                                     resend_s=self._cfg.resend_s)
        answers = folder / "answers"
        for path in sorted(answers.glob("*.bin")) if answers.is_dir() else []:
            answer = self._open_answer(path.stem, path.read_bytes(), registry)
            if answer is None:
                raise StoreError(f"{path}: a stored answer no longer opens")
            self._answers[answer.site] = answer
            self._phase = self._feed(up.AnswerArrived(answer.site), registry=None)
        log.info("round %d: unmasking %d survivor(s), %d missing, %d answer(s) stored", state.round, len(survivors),
                 len(missing), len(self._answers))
        self._phase = self._feed(up.Begin(), registry=registry)
        return self._decision is not None

    def answer(self, site: str, payload: bytes, registry: Registry) -> None:
        """An unmask answer from ``updates/<site>``: checked, stored, then the caller acknowledges it."""
        if self._phase is None or self._phase.done:
            log.info("unmask answer of %s with no unmasking under way: dropped", site)
            return
        answer = self._open_answer(site, payload, registry)
        if answer is None:
            return
        if site in self._phase.survivors and site not in self._phase.answered:
            path = self._folder / str(self._phase.round) / "answers" / f"{site}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes(path, bytes(payload))
            self._answers[site] = answer
            self._done("AnswerStored")
        self._phase = self._feed(up.AnswerArrived(site), registry=registry)

    def tick(self, registry: Registry) -> bool:
        """Let time run; True when the round is decided and its model should be made now."""
        if self._phase is None:
            return False
        if not self._phase.done:
            self._phase = self._feed(up.Tick(), registry=registry)
        return self._decision is not None

    def aggregate(self, state: RoundState, *, model: GlobalModel, registry: Registry,
                  cfg: AggregationConfig) -> tuple[dict[str, np.ndarray], str | None]:
        """The model after the unmasked round, and None; or the previous model and why it is kept."""
        previous = dict(model.tensors)
        decision, params = self._decision, self._params[state.round]
        self._take_refills(registry)
        self._phase, self._decision = None, None
        if isinstance(decision, up.GiveUp):
            return previous, f"secure aggregation: {decision.why}"
        survivors = {s: u for s, u in self._updates.items()}
        try:
            mean = unmask_mean(masked={s: u.masked for s, u in survivors.items()},
                               weights={s: u.weight for s, u in survivors.items()},
                               missing=[e.site for e in params.roster if e.site not in survivors],
                               answers=self._answers, params=params)
        except SecAggError as e:
            return previous, f"secure aggregation: {e}"
        layout = layout_of(model.shapes)
        candidate = apply_delta(previous, {k: v.astype(np.float32) for k, v in unflatten(mean, layout).items()})
        problem = check_model(candidate, previous, cfg)
        return (previous, problem) if problem is not None else (candidate, None)

    # -- helpers -------------------------------------------------------------------------------

    def _open_answer(self, site: str, payload: bytes, registry: Registry) -> UnmaskAnswer | None:
        assert self._phase is not None
        try:
            answer = open_unmask_answer(payload, topic_site=site, coordinator_keys=[self._keys.box], registry=registry,
                                        federation=self._federation)
            check_answer(answer, round_no=self._phase.round, survivors=self._phase.survivors,
                         missing=self._phase.missing, params=self._params[self._phase.round])
        except (WireError, SecAggError) as e:
            log.warning("unmask answer of %s refused: %s", site, e)
            return None
        return answer

    def _feed(self, event: up.Event, *, registry: Registry | None) -> up.UnmaskState:
        assert self._phase is not None
        state, actions = up.handle(self._phase, event, self._clock())
        for action in actions:
            if isinstance(action, up.Request) and registry is not None:
                self._request(state, action.sites)
            elif isinstance(action, (up.Decode, up.GiveUp)):
                self._decision = action
                if isinstance(action, up.GiveUp):
                    log.warning("round %d: %s; the previous model is kept", state.round, action.why)
            elif isinstance(action, up.Refuse):
                log.warning("round %d: answer of %s refused: %s", state.round, action.site, action.why)
        return state

    def _request(self, state: up.UnmaskState, sites: tuple[str, ...]) -> None:
        params = self._params[state.round]
        for site in sites:
            shares = {}
            for other, update in self._updates.items():
                if other != site:
                    peers = [p.site for p in params.peers(other)]
                    shares[other] = update.shares[peers.index(site)]
            payload = make_unmask_request(federation=self._federation, site=site, round=state.round,
                                          survivors=state.survivors, missing=state.missing, shares=shares,
                                          signing_key=self._keys.signing)
            try:
                self._client.publish(self._topics.receipts(site), payload, qos=1)
            except TransportError as e:
                log.warning("round %d: unmask request to %s not sent now (%s); sent again later", state.round, site, e)
        self._done("UnmaskRequested")

    def _take_refills(self, registry: Registry) -> None:
        """Add each site's refill on its own: one site's refused keys (revoked since, or over the
        per-site limit) must not cost the other sites theirs, or they would run out of round keys."""
        if not any(u.refill for u in self._updates.values()):
            return
        book = read_book(self._book_path)
        for site, update in sorted(self._updates.items()):
            try:
                book = book.add(update.refill, registry)
            except RoundKeyError as e:
                log.warning("round keys sent by %s with its update not taken: %s", site, e)
        write_book(self._book_path, book)
