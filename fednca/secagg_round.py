"""One round of secure aggregation, both sides, as pure functions over the wire's dataclasses.

A site (:func:`mask_delta`, :func:`answer_request`) and the coordinator (:func:`unmask_plan`,
:func:`unmask_mean`) meet here, so that the tests, the bench, the daemon and the coordinator run
exactly the same arithmetic. No I/O, no clock; randomness is passed in.

Site, at submission: clip, encode in fixed point with weight ``min(samples, max_weight)``, mask
with a fresh self-mask seed ``b`` and the pairwise seeds of its round key with each peer's,
split ``b`` into one Shamir share per roster position and seal each peer's share under the
pair's share key. What it must keep until it answers: ``b`` and its round secret key.

Site, at the unmask request: refuse unless the request is consistent (it is a survivor, no site
is both survivor and missing, the two lists are the roster); then answer with ``b``, its share of
each other survivor's ``b`` (opened from the sealed shares the request forwards) and its pairwise
seed with each missing site, which it computes itself: a missing site sent nothing, so nothing of
it was shared, and its masks are removed by its peers naming the seeds of the pairs.

Coordinator: every survivor's ``b`` comes from its own answer or, for a survivor that died after
masking, from ``threshold`` shares in the others' answers; every (survivor, missing) pair's seed
comes from the survivor's answer. A survivor that never answers while a site is missing leaves a
pair mask nobody may remove (rebuilding its round key would give the coordinator both secrets of
a site whose vector it holds): the round cannot be decoded, and :func:`unmask_plan` says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from .fixedpoint import decode_mean, encode
from .secagg import SecAggError, mask, pairwise_seed, share_key, unmask_sum
from .shamir import Share, ShamirError, combine, lagrange_at_zero, split
from .wire_secagg import SEALED_SHARE_BYTES, SecureParams, UnmaskAnswer, UnmaskRequest

Rand = Callable[[int], bytes]
MIN_SURVIVORS = 2  # the "sum" of one survivor is its update, whatever the threshold or the roster's size


@dataclass(frozen=True)
class Masked:
    """What a site sends (``masked``, ``weight``, ``shares`` sealed per peer in roster order)."""

    masked: np.ndarray
    weight: int
    shares: tuple[bytes, ...]


def mask_delta(row: np.ndarray, *, site: str, samples: int, params: SecureParams, round_secret: bytes,
               self_seed: bytes, federation: str, round_no: int, rand: Rand) -> Masked:
    """A site's masked, weighted fixed-point update and its sealed shares of ``self_seed``."""
    me = params.entry(site)
    if me is None:
        raise SecAggError(f"site {site!r} is not on the roster of round {round_no}")
    fp = params.fixed_point
    weight = min(samples, params.max_weight)
    encoded = encode(row, weight=weight, fp=fp)
    peers = params.peers(site)
    seeds = {p.site: pairwise_seed(my_secret=round_secret, peer_public=p.public, my_id=site, peer_id=p.site,
                                   federation=federation, round_no=round_no) for p in peers}
    masked = mask(encoded, site=site, self_seed=self_seed, pair_seeds=seeds, fp=fp)
    shares = split(self_seed, threshold=params.threshold, n=len(params.roster), rand=rand)
    sealed = []
    for p in peers:
        key = share_key(my_secret=round_secret, peer_public=p.public, my_id=site, peer_id=p.site,
                        federation=federation, round_no=round_no)
        box = SecretBox(key).encrypt(shares[p.x - 1].to_bytes(), rand(SecretBox.NONCE_SIZE))
        assert len(box) == SEALED_SHARE_BYTES
        sealed.append(bytes(box))
    return Masked(masked=masked, weight=weight, shares=tuple(sealed))


@dataclass(frozen=True)
class Answer:
    self_seed: bytes
    shares: dict[str, bytes]  # survivor -> my Shamir share of its seed, as bytes
    pair_seeds: dict[str, bytes]  # missing site -> my pairwise seed with it


def check_request(request: UnmaskRequest, *, site: str, params: SecureParams) -> None:
    """Raise :class:`SecAggError` unless an honest site may answer ``request``."""
    both = sorted(set(request.survivors) & set(request.missing))
    if both:
        raise SecAggError(f"the request lists {both} as both survivor and missing: answering would open them")
    if site not in request.survivors:
        raise SecAggError(f"the request does not count {site!r} as a survivor")
    if len(request.survivors) < max(params.threshold, MIN_SURVIVORS):
        raise SecAggError(f"the request counts {len(request.survivors)} survivor(s), fewer than the threshold "
                          f"{params.threshold} or {MIN_SURVIVORS}: a sum of so few would say too much about each")
    roster = {e.site for e in params.roster}
    listed = set(request.survivors) | set(request.missing)
    if listed != roster:
        raise SecAggError(f"the request's lists {sorted(listed)} are not the round's roster {sorted(roster)}")


def answer_request(request: UnmaskRequest, *, site: str, params: SecureParams, round_secret: bytes,
                   self_seed: bytes, federation: str) -> Answer:
    """What a survivor reveals for ``request`` (checked first by :func:`check_request`)."""
    check_request(request, site=site, params=params)
    me = params.entry(site)
    assert me is not None
    shares = {}
    for sender, sealed in sorted(request.shares.items()):
        if sender == site:
            continue
        peer = params.entry(sender)
        if peer is None:
            raise SecAggError(f"the request forwards a share from {sender!r}, who is not on the roster")
        key = share_key(my_secret=round_secret, peer_public=peer.public, my_id=site, peer_id=sender,
                        federation=federation, round_no=request.round)
        try:
            share = Share.from_bytes(SecretBox(key).decrypt(sealed))
        except (CryptoError, ShamirError) as e:
            raise SecAggError(f"the share from {sender!r} does not open: {e}") from None
        if share.x != me.x:
            raise SecAggError(f"the share from {sender!r} is for position {share.x}, this site holds {me.x}")
        shares[sender] = share.to_bytes()
    pair_seeds = {}
    for missing in request.missing:
        peer = params.entry(missing)
        assert peer is not None
        pair_seeds[missing] = pairwise_seed(my_secret=round_secret, peer_public=peer.public, my_id=site,
                                            peer_id=missing, federation=federation, round_no=request.round)
    return Answer(self_seed=self_seed, shares=shares, pair_seeds=pair_seeds)


# ------------------------------------------------------------------------------ the coordinator


def check_answer(answer: UnmaskAnswer, *, round_no: int, survivors: Sequence[str], missing: Sequence[str],
                 params: SecureParams) -> None:
    """Raise :class:`SecAggError` unless ``answer`` answers this round's request as asked: from a
    survivor, a share of each other survivor's seed (no more, no fewer) at its own position, a seed for exactly
    each missing site. Anything else could give the coordinator what it must not hold."""
    site = answer.site
    if answer.round != round_no:
        raise SecAggError(f"answer of {site!r} is for round {answer.round}, the unmasking is of round {round_no}")
    if site not in survivors:
        raise SecAggError(f"answer from {site!r}, which the request does not count as a survivor")
    others = set(survivors) - {site}
    if set(answer.shares) != others:  # the request forwarded one of each; the phase counts on all of them
        raise SecAggError(f"answer of {site!r} holds shares of {sorted(answer.shares)}, the other survivors are "
                          f"{sorted(others)}")
    if sorted(answer.pair_seeds) != sorted(missing):
        raise SecAggError(f"answer of {site!r} names pair seeds with {sorted(answer.pair_seeds)}, "
                          f"the missing sites are {sorted(missing)}")
    me = params.entry(site)
    assert me is not None
    for owner, raw in answer.shares.items():
        try:
            share = Share.from_bytes(raw)
        except ShamirError as e:
            raise SecAggError(f"answer of {site!r}: share of {owner!r}: {e}") from None
        if share.x != me.x:
            raise SecAggError(f"answer of {site!r}: share of {owner!r} is at position {share.x}, not {me.x}")


@dataclass(frozen=True)
class Plan:
    """Whether the answers so far decode the round (``ready``), and if not, what is lacking."""

    ready: bool
    lacking: tuple[str, ...] = ()
    hopeless: bool = False  # no further answer can make it ready (a silent survivor while sites are missing)


def unmask_plan(*, survivors: Sequence[str], missing: Sequence[str], answers: Mapping[str, UnmaskAnswer],
                threshold: int, final: bool = False) -> Plan:
    """Ready when every survivor's seed is known (its answer, or ``threshold`` shares of it) and,
    with sites missing, every survivor answered. ``final``: no more answers will come."""
    lacking = []
    silent = [s for s in survivors if s not in answers]
    if missing and silent:
        lacking += [f"pairwise seeds of {s} with the missing sites (only {s} can name them)" for s in silent]
    for s in silent:
        have = sum(1 for a in answers.values() if s in a.shares)
        if have < threshold:
            lacking.append(f"self-mask seed of {s}: {have} of {threshold} shares")
    return Plan(ready=not lacking, lacking=tuple(lacking), hopeless=bool(lacking) and final)


def unmask_mean(*, masked: Mapping[str, np.ndarray], weights: Mapping[str, int], missing: Sequence[str],
                answers: Mapping[str, UnmaskAnswer], params: SecureParams) -> np.ndarray:
    """The survivors' weighted mean delta (float64), from their masked vectors and the answers."""
    survivors = sorted(masked)
    if len(survivors) < max(params.threshold, MIN_SURVIVORS):
        raise SecAggError(f"{len(survivors)} survivor(s), fewer than the threshold {params.threshold} or "
                          f"{MIN_SURVIVORS}: not decoded")
    plan = unmask_plan(survivors=survivors, missing=missing, answers=answers, threshold=params.threshold)
    if not plan.ready:
        raise SecAggError("cannot unmask: " + "; ".join(plan.lacking))
    strangers = sorted(set(answers) - set(survivors))
    if strangers:
        raise SecAggError(f"answers from sites that are not survivors are refused: {strangers}")
    self_seeds = {}
    for s in survivors:
        if s in answers:
            self_seeds[s] = answers[s].self_seed
            continue
        shares = [Share.from_bytes(a.shares[s]) for _, a in sorted(answers.items()) if s in a.shares][:params.threshold]
        try:
            self_seeds[s] = combine(shares, threshold=params.threshold,
                                    coeffs=lagrange_at_zero([sh.x for sh in shares]))
        except ShamirError as e:
            raise SecAggError(f"shares of {s}'s self-mask seed do not rebuild it: {e}") from None
    dropped = {d: {s: answers[s].pair_seeds[d] for s in survivors} for d in missing} if missing else {}
    total = unmask_sum(masked, self_seeds=self_seeds, dropped_seeds=dropped, fp=params.fixed_point)
    return decode_mean(total, total_weight=sum(weights[s] for s in survivors), fp=params.fixed_point)
