"""A site's side of secure aggregation: its masked update, and its one answer to the unmask request.

When the round announcement carries ``secagg`` (the fixed point, threshold and roster, docs/
secure-aggregation.md), the daemon sends a masked update instead of a plain one
(:meth:`SecureSite.build`): the delta is clipped, encoded, weighted and masked
(:func:`fednca.secagg_round.mask_delta`), with a fresh self-mask seed and the round key the roster
names. Later the coordinator's unmask request arrives on ``receipts/<site>``
(:meth:`SecureSite.answer`); the site checks it and answers once.

What lives where, in ``<state>/secagg/`` (0700, files 0600, each written atomically):

* ``round-keys.key``: the round key secrets not yet used (index -> secret). The enrolment batch is
  read from the key folder's ``round-keys.key`` the first time; the refills the daemon makes are
  added here. A secret is erased once its round is over (:meth:`SecureSite.forget_before`), so a
  device stolen later opens no round already aggregated.
* ``round-<r>.json``: what the answer needs (self-mask seed, round secret, the round's parameters),
  written **before** the masked update enters the outbox. A SIGKILL between masking and
  answering therefore loses nothing: the outbox publishes the same update again, and the answer
  is made from this file. A second masking of the same round (an update lost and rebuilt) reuses
  the seed, so the coordinator never holds two vectors of one site under different self-masks.
* ``answer-<r>.bin`` and ``answer-<r>.lists``: the answer, stored before it is published, and the
  two lists it answered. A request repeated with the same lists gets the same bytes again (the
  coordinator asks again until it hears); a request with other lists is refused: a site answers
  one request per round, so a coordinator cannot collect both secrets of a site by asking twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets as pysecrets
from pathlib import Path
from typing import Callable

import numpy as np
from nacl.bindings import crypto_scalarmult_base
from nacl.signing import SigningKey
from nacl.utils import random as nacl_random

from fednca.aggregate_rows import flatten, layout_of
from fednca.atomic import write_bytes
from fednca.keys import CoordinatorPublicKeys
from fednca.round_keys import (
    ROUND_KEYS_SECRET_FILE, RoundKeyError, SignedRoundKey, read_secrets, signed_text, write_secrets,
)
from fednca.secagg import SecAggError
from fednca.secagg_round import answer_request, mask_delta
from fednca.tensorcodec import WireError, loads_strict
from fednca.wire import Announcement
from fednca.wire_secagg import make_masked_update, make_unmask_answer, open_unmask_request, secagg_field

from .errors import CheckpointMismatch, DaemonError
from .submission import Progress, read_progress

log = logging.getLogger("fednca.daemon")

REFILL_KEEP = 8  # unused round keys the coordinator should always hold for this site
Rand = Callable[[int], bytes]


class SecureAggregationRefused(DaemonError):
    """This site cannot take part in the secure round as announced (not on the roster, no round key)."""


class SecureSite:
    """Secure aggregation for one site; ``state_dir`` its state folder, ``key_dir`` its key folder."""

    def __init__(self, *, state_dir: str | os.PathLike, key_dir: str | os.PathLike, site: str, federation: str,
                 signing_key: SigningKey, coordinator: CoordinatorPublicKeys, rand: Rand = nacl_random) -> None:
        self.folder = Path(state_dir) / "secagg"
        self._key_dir = Path(key_dir)
        self.site = site
        self.federation = federation
        self._signing = signing_key
        self._coordinator = coordinator
        self._rand = rand

    # -- round keys ----------------------------------------------------------------------------

    @property
    def _ring_path(self) -> Path:
        return self.folder / ROUND_KEYS_SECRET_FILE

    def _ring(self) -> dict[int, bytes]:
        if self._ring_path.exists():
            return read_secrets(self._ring_path)
        return read_secrets(self._key_dir / ROUND_KEYS_SECRET_FILE)  # the enrolment batch

    def _refill(self, ring: dict[int, bytes], used: int) -> tuple[dict[int, bytes], tuple[SignedRoundKey, ...]]:
        """The ring topped up to :data:`REFILL_KEEP` unused keys, and the newest of them, signed."""
        unused = sorted(i for i in ring if i > used)
        if len(unused) < REFILL_KEEP:
            start = max([used, *ring]) + 1
            ring = {**ring, **{i: self._rand(32) for i in range(start, start + REFILL_KEEP)}}
            write_secrets(self._ring_path, ring)  # before any public half leaves the device
            unused = sorted(i for i in ring if i > used)
        refill = tuple(SignedRoundKey(site=self.site, index=i, public=crypto_scalarmult_base(ring[i]),
                                      signature=self._signing.sign(signed_text(self.site, i, crypto_scalarmult_base(ring[i]))).signature)
                       for i in unused[-REFILL_KEEP:])
        return ring, refill

    # -- the masked update ---------------------------------------------------------------------

    def build(self, *, announcement: Announcement, checkpoint: bytes) -> tuple[str, bytes, Progress]:
        """(update id, sealed masked update, progress) for the announced secure round."""
        h = announcement.header
        params = h.secagg
        assert params is not None
        me = params.entry(self.site)
        if me is None:
            raise SecureAggregationRefused(f"site {self.site!r} is not on the roster of round {h.round} (the coordinator "
                                           "holds no unused round key of it: fednca coordinator round-keys)")
        progress = read_progress(checkpoint)
        if progress.round != h.round or progress.base_sha256 != h.model_sha256:
            raise CheckpointMismatch(f"checkpoint is for round {progress.round}, not round {h.round}")
        if progress.steps < 1 or set(progress.weights) != set(announcement.tensors):
            raise CheckpointMismatch(f"checkpoint of round {h.round} holds no training step for the announced model")
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            ring = self._ring()
            if not self._ring_path.exists():
                write_secrets(self._ring_path, ring)  # from now on the state folder's copy is erased as rounds end
        except RoundKeyError as e:
            raise SecureAggregationRefused(str(e)) from None
        delta = {k: progress.weights[k].astype(np.float32) - announcement.tensors[k] for k in announcement.tensors}
        row = flatten(delta, layout_of({k: v.shape for k, v in announcement.tensors.items()}))
        digest = hashlib.sha256(row.tobytes()).hexdigest()
        kept = self._round_file(h.round)
        if kept is not None and kept.get("delta_sha256") not in (None, digest):
            # The same masks over other work: the coordinator, given both, would read their difference.
            raise SecureAggregationRefused(f"round {h.round} was masked already from other work; a second masked "
                                           "update under the same masks would reveal the difference, so this "
                                           "site sits the round out")
        if kept is not None and kept["key_index"] == me.key_index:
            secret, self_seed = bytes.fromhex(kept["secret"]), bytes.fromhex(kept["self_seed"])
        elif me.key_index in ring:
            secret, self_seed = ring[me.key_index], self._rand(32)
        else:
            raise SecureAggregationRefused(f"round {h.round} names round key {me.key_index}, which this site "
                                           "does not hold (erased, or never made here)")
        if crypto_scalarmult_base(secret) != me.public:
            raise SecureAggregationRefused(f"round key {me.key_index} on the roster is not this site's")
        ring, refill = self._refill(ring, me.key_index)
        record = {"round": h.round, "key_index": me.key_index, "secret": secret.hex(), "self_seed": self_seed.hex(),
                  "params": secagg_field.format(params), "delta_sha256": digest}
        write_bytes(self._round_path(h.round), json.dumps(record).encode(), mode=0o600)  # before the outbox
        try:
            m = mask_delta(row, site=self.site, samples=progress.samples, params=params, round_secret=secret,
                           self_seed=self_seed, federation=self.federation, round_no=h.round, rand=self._rand)
        except SecAggError as e:
            raise SecureAggregationRefused(str(e)) from None
        update_id = pysecrets.token_hex(16)
        payload = make_masked_update(
            federation=self.federation, site=self.site, round=h.round, base_sha256=h.model_sha256,
            samples=progress.samples, steps=progress.steps, partial=progress.steps < progress.planned,
            metrics={k: v for k, v in progress.metrics.items() if k in ("train_loss", "dice_global", "dice_local")},
            weight=m.weight, key_index=me.key_index, masked=m.masked, shares=m.shares, refill=refill,
            signing_key=self._signing, coordinator_box=self._coordinator.box, update_id=update_id)
        return update_id, payload, progress

    # -- the answer ----------------------------------------------------------------------------

    def answer(self, payload: bytes) -> bytes | None:
        """The sealed answer to an unmask request (stored before it is returned), or None when this
        site does not answer it (the reason is logged)."""
        try:
            request = open_unmask_request(payload, coordinator_verify_key=self._coordinator.verify,
                                          federation=self.federation, site=self.site)
        except WireError as e:
            log.warning("unmask request refused: %s", e)
            return None
        kept = self._round_file(request.round)
        if kept is None:
            log.warning("unmask request of round %d: this site holds no masked update of that round", request.round)
            return None
        lists = json.dumps({"survivors": request.survivors, "missing": request.missing}).encode()
        answer_path, lists_path = self.folder / f"answer-{request.round}.bin", self.folder / f"answer-{request.round}.lists"
        if answer_path.exists():
            if lists_path.read_bytes() != lists:
                log.error("round %d: a second unmask request with other lists is refused (this site answers one)",
                          request.round)
                return None
            return answer_path.read_bytes()
        try:
            a = answer_request(request, site=self.site, params=secagg_field.parse(kept["params"]),
                               round_secret=bytes.fromhex(kept["secret"]), self_seed=bytes.fromhex(kept["self_seed"]),
                               federation=self.federation)
        except SecAggError as e:
            log.error("round %d: unmask request refused: %s", request.round, e)
            return None
        sealed = make_unmask_answer(federation=self.federation, site=self.site, round=request.round,
                                    self_seed=a.self_seed, shares=a.shares, pair_seeds=a.pair_seeds,
                                    signing_key=self._signing, coordinator_box=self._coordinator.box)
        write_bytes(lists_path, lists, mode=0o600)
        write_bytes(answer_path, sealed, mode=0o600)  # last: its presence means answered
        log.info("round %d: unmask answer made (%d shares, %d pair seeds)", request.round, len(a.shares),
                 len(a.pair_seeds))
        return sealed

    def forget_before(self, round: int) -> None:
        """A round at or after ``round`` is announced: erase what earlier rounds kept, secrets first."""
        if not self.folder.is_dir():
            return
        old = [p for p in self.folder.glob("round-*.json") if _round_of(p) is not None and _round_of(p) < round]
        spent = set()
        for path in old:
            kept = self._round_file(_round_of(path))  # type: ignore[arg-type]
            if kept is not None:
                spent.add(kept["key_index"])
        if spent and self._ring_path.exists():
            ring = read_secrets(self._ring_path)
            write_secrets(self._ring_path, {i: s for i, s in ring.items() if i > max(spent)})
        for path in old + [p for p in self.folder.glob("answer-*") if (_round_of(p) or round) < round]:
            path.unlink(missing_ok=True)

    def _round_path(self, round: int) -> Path:
        return self.folder / f"round-{round}.json"

    def _round_file(self, round: int) -> dict | None:
        path = self._round_path(round)
        if not path.exists():
            return None
        try:
            data = loads_strict(path.read_text())
        except (ValueError, OSError) as e:
            log.error("%s: unreadable (%s)", path, e)
            return None
        return data if isinstance(data, dict) else None


def _round_of(path: Path) -> int | None:
    stem = path.name.split(".")[0]
    digits = stem.rsplit("-", 1)[-1]
    return int(digits) if digits.isdigit() else None
