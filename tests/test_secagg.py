"""Secure aggregation core: fixed point in the ring, pairwise masks, dropouts, refusals, privacy."""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from nacl.bindings import crypto_scalarmult_base

from fednca.fixedpoint import (FixedPoint, FixedPointRangeError, check_range, clip, decode_mean, encode,
                               error_bound, largest_frac_bits, ring_sum)
from fednca.secagg import (MissingSecretsError, NotEnoughSharesError, SecAggError, expand, mask,
                           pairwise_seed, recover_and_unmask, self_mask, unmask_sum)
from fednca.shamir import Share, split

FED = "clinics"
ROUND = 7
PARAMS = 7262


@dataclass(frozen=True)
class Round:
    """A simulated round: every site's keys, self-mask seed, encoding, masked vector and shares."""

    ids: list[str]
    sk: dict[str, bytes]
    pk: dict[str, bytes]
    self_seed: dict[str, bytes]
    updates: dict[str, np.ndarray]
    weights: dict[str, int]
    masked: dict[str, np.ndarray]
    seed_shares: dict[str, list[Share]]  # site -> its self-seed's shares, x = roster position
    key_shares: dict[str, list[Share]]   # site -> its round key's shares
    fp: FixedPoint
    threshold: int


def make_round(*, n: int, threshold: int, length: int, seed: int, fp: FixedPoint,
               scale: float = 0.05) -> Round:
    gen = random.Random(seed)
    rng = np.random.default_rng(seed)
    rand = lambda k: gen.randbytes(k)  # noqa: E731
    ids = [f"site-{i:02d}" for i in range(n)]
    sk = {s: rand(32) for s in ids}
    pk = {s: crypto_scalarmult_base(sk[s]) for s in ids}
    self_seed = {s: rand(32) for s in ids}
    updates = {s: rng.normal(0.0, scale, length) for s in ids}
    weights = {s: int(rng.integers(1, 200)) for s in ids}
    masked = {}
    for s in ids:
        pairs = {p: pairwise_seed(my_secret=sk[s], peer_public=pk[p], my_id=s, peer_id=p,
                                  federation=FED, round_no=ROUND) for p in ids if p != s}
        enc = encode(updates[s], weight=weights[s], fp=fp)
        masked[s] = mask(enc, site=s, self_seed=self_seed[s], pair_seeds=pairs, fp=fp)
    seed_shares = {s: split(self_seed[s], threshold=threshold, n=n, rand=rand) for s in ids}
    key_shares = {s: split(sk[s], threshold=threshold, n=n, rand=rand) for s in ids}
    return Round(ids, sk, pk, self_seed, updates, weights, masked, seed_shares, key_shares, fp, threshold)


def unmask(r: Round, survivors: list[str], answering: list[str]) -> np.ndarray:
    """What the coordinator does: the answering survivors return, for each survivor, their share
    of its self-mask seed and, for each dropped site, their share of its round key."""
    pos = {s: i for i, s in enumerate(r.ids)}
    dropped = [s for s in r.ids if s not in survivors]
    return recover_and_unmask(
        {s: r.masked[s] for s in survivors},
        peers={s: [p for p in r.ids if p != s] for s in r.ids}, round_keys=r.pk,
        self_seed_shares={s: [r.seed_shares[s][pos[a]] for a in answering] for s in survivors},
        key_shares={d: [r.key_shares[d][pos[a]] for a in answering] for d in dropped},
        threshold=r.threshold, federation=FED, round_no=ROUND, fp=r.fp)


def plain_mean(r: Round, survivors: list[str]) -> np.ndarray:
    w = sum(r.weights[s] for s in survivors)
    return sum(r.weights[s] * clip(r.updates[s], r.fp) for s in survivors) / w


def chi_square_bytes(vec: np.ndarray) -> float:
    counts = np.bincount(np.frombuffer(vec.tobytes(), dtype=np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


# 255 degrees of freedom: mean 255, sd 22.6; 400 is ~6 sd above (p < 1e-9)
CHI2_LIMIT = 400.0


# -- fixed point -------------------------------------------------------------------------------

def test_overflow_condition_is_checked_with_a_clear_error() -> None:
    fp = FixedPoint(bound=1.0, frac_bits=20)
    check_range(fp, n_sites=10, max_weight=204)  # 10 * 204 * 2^20 < 2^31
    with pytest.raises(FixedPointRangeError, match=r"overflow: n_sites 10 \* max_weight 205"):
        check_range(fp, n_sites=10, max_weight=205)
    f = largest_frac_bits(bound=0.5, n_sites=10, max_weight=200)
    check_range(FixedPoint(bound=0.5, frac_bits=f), n_sites=10, max_weight=200)
    with pytest.raises(FixedPointRangeError):
        check_range(FixedPoint(bound=0.5, frac_bits=f + 1), n_sites=10, max_weight=200)


def test_error_bound_meets_one_in_a_million_of_the_bound_at_ten_sites() -> None:
    f = largest_frac_bits(bound=0.5, n_sites=10, max_weight=200)
    fp = FixedPoint(bound=0.5, frac_bits=f)
    assert error_bound(fp) / fp.bound <= 10 * 200 / 2 ** 31 < 1e-6


def test_encode_clips_wraps_and_decodes_a_weighted_mean() -> None:
    fp = FixedPoint(bound=1.0, frac_bits=16)
    a, b = np.array([0.5, -0.25, 3.0, -7.0]), np.array([-0.5, 0.75, 0.0, 0.125])
    ea, eb = encode(a, weight=3, fp=fp), encode(b, weight=1, fp=fp)
    assert ea.dtype == np.uint32 and ea[1] == 2 ** 32 - 3 * 2 ** 14  # negative wraps around
    got = decode_mean(ring_sum([ea, eb], fp), total_weight=4, fp=fp)
    want = (3 * clip(a, fp) + clip(b, fp)) / 4
    assert np.max(np.abs(got - want)) <= error_bound(fp)
    assert got[2] == pytest.approx(3 / 4) and got[3] == pytest.approx((-3 + 0.125) / 4)
    with pytest.raises(FixedPointRangeError, match="non-finite"):
        encode(np.array([np.nan]), weight=1, fp=fp)


# -- masks -------------------------------------------------------------------------------------

def test_pairwise_seed_is_shared_and_bound_to_round_and_federation() -> None:
    r = make_round(n=2, threshold=1, length=4, seed=1, fp=FixedPoint(bound=1.0, frac_bits=16))
    a, b = r.ids
    ab = pairwise_seed(my_secret=r.sk[a], peer_public=r.pk[b], my_id=a, peer_id=b, federation=FED, round_no=1)
    ba = pairwise_seed(my_secret=r.sk[b], peer_public=r.pk[a], my_id=b, peer_id=a, federation=FED, round_no=1)
    assert ab == ba and len(ab) == 32
    assert ab != pairwise_seed(my_secret=r.sk[a], peer_public=r.pk[b], my_id=a, peer_id=b,
                               federation=FED, round_no=2)
    assert ab != pairwise_seed(my_secret=r.sk[a], peer_public=r.pk[b], my_id=a, peer_id=b,
                               federation="other", round_no=1)
    with pytest.raises(SecAggError, match="key agreement"):
        pairwise_seed(my_secret=r.sk[a], peer_public=bytes(32), my_id=a, peer_id=b, federation=FED, round_no=1)


def test_expansion_is_deterministic_and_seed_specific() -> None:
    fp = FixedPoint(bound=1.0, frac_bits=16)
    s = bytes(range(32))
    assert np.array_equal(expand(s, length=PARAMS, fp=fp), expand(s, length=PARAMS, fp=fp))
    assert not np.array_equal(expand(s, length=PARAMS, fp=fp), self_mask(s, length=PARAMS, fp=fp))
    assert not np.array_equal(expand(s, length=8, fp=fp), expand(bytes(32), length=8, fp=fp))


def test_without_dropouts_the_masks_cancel_exactly() -> None:
    fp = FixedPoint(bound=1.0, frac_bits=20)
    r = make_round(n=5, threshold=3, length=300, seed=2, fp=fp)
    plain = ring_sum([encode(r.updates[s], weight=r.weights[s], fp=fp) for s in r.ids], fp)
    got = unmask_sum(r.masked, self_seeds=r.self_seed, dropped_seeds={}, fp=fp)
    assert np.array_equal(got, plain)
    assert not np.array_equal(ring_sum(list(r.masked.values()), fp), plain)  # self-masks stay until removed


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 8), seed=st.integers(0, 2 ** 31), data=st.data())
def test_unmasked_sum_equals_plaintext_fedavg_with_random_dropouts(n: int, seed: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    fp = FixedPoint(bound=0.2, frac_bits=largest_frac_bits(bound=0.2, n_sites=n, max_weight=200))
    r = make_round(n=n, threshold=t, length=64, seed=seed, fp=fp)
    survivors = sorted(data.draw(st.sets(st.sampled_from(r.ids), min_size=max(t, 1))))
    answering = data.draw(st.permutations(survivors))[:data.draw(st.integers(t, len(survivors)))]
    total = unmask(r, survivors, answering)
    got = decode_mean(total, total_weight=sum(r.weights[s] for s in survivors), fp=fp)
    assert np.max(np.abs(got - plain_mean(r, survivors))) <= error_bound(fp)
    assert error_bound(fp) / fp.bound <= n * 200 / 2 ** 31


def test_full_model_with_two_dropouts_meets_the_relative_error_goal() -> None:
    fp = FixedPoint(bound=0.5, frac_bits=largest_frac_bits(bound=0.5, n_sites=10, max_weight=200))
    r = make_round(n=10, threshold=6, length=PARAMS, seed=3, fp=fp, scale=0.2)
    survivors = r.ids[:3] + r.ids[4:9]
    got = decode_mean(unmask(r, survivors, survivors[:6]), fp=fp,
                      total_weight=sum(r.weights[s] for s in survivors))
    want = plain_mean(r, survivors)
    assert np.max(np.abs(got - want)) <= error_bound(fp)
    assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-6


# -- refusals ----------------------------------------------------------------------------------

def test_fewer_than_t_shares_are_refused_naming_each_secret() -> None:
    fp = FixedPoint(bound=1.0, frac_bits=16)
    r = make_round(n=5, threshold=3, length=16, seed=4, fp=fp)
    survivors = r.ids[:4]
    with pytest.raises(NotEnoughSharesError) as err:
        unmask(r, survivors, survivors[:2])
    assert "self-mask seed of site-00: 2 of 3 shares" in err.value.missing
    assert "round key of dropped site-04: 2 of 3 shares" in err.value.missing
    assert len(err.value.missing) == 5


def test_a_missing_self_seed_is_named_and_a_dropped_self_seed_refused() -> None:
    fp = FixedPoint(bound=1.0, frac_bits=16)
    r = make_round(n=3, threshold=2, length=16, seed=5, fp=fp)
    masked = {s: r.masked[s] for s in r.ids[:2]}
    with pytest.raises(MissingSecretsError, match="self-mask seed of site-01"):
        unmask_sum(masked, self_seeds={"site-00": r.self_seed["site-00"]}, dropped_seeds={}, fp=fp)
    with pytest.raises(SecAggError, match="did not report"):
        unmask_sum(masked, self_seeds=r.self_seed, dropped_seeds={}, fp=fp)


def test_a_late_update_of_a_dropped_site_cannot_be_unmasked() -> None:
    """Once a site's round key is rebuilt (it was declared missing), its update is refused:
    with its self-mask seed as well, the coordinator could read it alone."""
    fp = FixedPoint(bound=1.0, frac_bits=16)
    r = make_round(n=4, threshold=2, length=16, seed=6, fp=fp)
    pos = {s: i for i, s in enumerate(r.ids)}
    late = "site-03"
    with pytest.raises(SecAggError, match="would unmask a single site"):
        recover_and_unmask(r.masked, peers={s: [p for p in r.ids if p != s] for s in r.ids},
                           round_keys=r.pk,
                           self_seed_shares={s: [r.seed_shares[s][pos[a]] for a in r.ids[:2]] for s in r.ids},
                           key_shares={late: [r.key_shares[late][pos[a]] for a in r.ids[:2]]},
                           threshold=2, federation=FED, round_no=ROUND, fp=fp)
    with pytest.raises(SecAggError, match="both survivor and dropped"):
        unmask_sum(r.masked, self_seeds=r.self_seed, dropped_seeds={late: {}}, fp=fp)


# -- privacy -----------------------------------------------------------------------------------

def test_a_masked_vector_looks_uniform_and_differs_from_its_encoding() -> None:
    fp = FixedPoint(bound=0.5, frac_bits=largest_frac_bits(bound=0.5, n_sites=10, max_weight=200))
    r = make_round(n=3, threshold=2, length=PARAMS, seed=7, fp=fp)
    for s in r.ids:
        enc = encode(r.updates[s], weight=r.weights[s], fp=fp)
        assert chi_square_bytes(r.masked[s]) < CHI2_LIMIT
        assert chi_square_bytes(enc) > CHI2_LIMIT  # the test can tell an update from noise
        assert np.mean(r.masked[s] == enc) < 0.001


def test_what_the_coordinator_can_remove_leaves_each_survivor_masked() -> None:
    """After a dropout the coordinator holds the survivors' self-mask seeds and the dropped site's
    pairwise seeds; removing all of that from one survivor's vector still leaves the pairwise
    masks with the other survivors, so no single update appears."""
    fp = FixedPoint(bound=0.5, frac_bits=largest_frac_bits(bound=0.5, n_sites=10, max_weight=200))
    r = make_round(n=4, threshold=2, length=PARAMS, seed=8, fp=fp)
    dropped, survivors = "site-03", r.ids[:3]
    for s in survivors:
        peeled = r.masked[s] - self_mask(r.self_seed[s], length=PARAMS, fp=fp)
        seed = pairwise_seed(my_secret=r.sk[dropped], peer_public=r.pk[s], my_id=dropped, peer_id=s,
                             federation=FED, round_no=ROUND)
        peeled = peeled - expand(seed, length=PARAMS, fp=fp)  # s < dropped: s had added it
        enc = encode(r.updates[s], weight=r.weights[s], fp=fp)
        assert chi_square_bytes(peeled) < CHI2_LIMIT
        assert np.mean(peeled == enc) < 0.001
    # and without the self-mask seeds, even every pairwise seed of a site leaves it masked
    s = survivors[0]
    peeled = r.masked[s].copy()
    for p in r.ids[1:]:
        peeled -= expand(pairwise_seed(my_secret=r.sk[s], peer_public=r.pk[p], my_id=s, peer_id=p,
                                       federation=FED, round_no=ROUND), length=PARAMS, fp=fp)
    assert chi_square_bytes(peeled) < CHI2_LIMIT
    # the control: with both, the single update appears, which is why the two are never both rebuilt
    both = peeled - self_mask(r.self_seed[s], length=PARAMS, fp=fp)
    assert np.array_equal(both, encode(r.updates[s], weight=r.weights[s], fp=fp))
