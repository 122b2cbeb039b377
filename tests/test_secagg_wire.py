"""The secure-aggregation messages (fednca.wire_secagg), round keys, and one round's arithmetic
(fednca.secagg_round) on both sides, without a broker."""

from __future__ import annotations

import random

import numpy as np
import pytest
from nacl.bindings import crypto_scalarmult_base
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fednca.fixedpoint import FixedPoint, clip, error_bound
from fednca.keys import Registry
from fednca.round_keys import RoundKeyBook, RoundKeyError, make_batch
from fednca.rounds_vocab import Reason, RoundReason
from fednca.secagg import SecAggError
from fednca.secagg_round import answer_request, check_answer, mask_delta, unmask_mean, unmask_plan
from fednca.tensorcodec import WireError
from fednca.wire_secagg import (
    MASKED, UNMASK_ANSWER, UNMASK_REQUEST, RosterEntry, SecureParams, check_masked, kind_of, make_masked_update,
    make_unmask_answer, make_unmask_request, open_unmask_answer, open_unmask_request, secagg_field, verify_masked,
)

FED = "fed"
N_VALUES = 50
COORD_SIGN, COORD_BOX = SigningKey(bytes(range(32))), PrivateKey(bytes(range(1, 33)))


def _rand(seed: int):
    r = random.Random(seed)
    return lambda n: bytes(r.getrandbits(8) for _ in range(n))


class Federation:
    """n sites with signing keys and one round key each, and the round's parameters."""

    def __init__(self, n: int, *, threshold: int = 2, seed: int = 0) -> None:
        rand = _rand(seed)
        self.sites = [f"site-{i:02d}" for i in range(n)]
        self.signing = {s: SigningKey(rand(32)) for s in self.sites}
        self.registry = Registry(sites={s: k.verify_key for s, k in self.signing.items()})
        self.secret = {s: rand(32) for s in self.sites}
        roster = tuple(RosterEntry(site=s, x=i + 1, key_index=0, public=crypto_scalarmult_base(self.secret[s]))
                       for i, s in enumerate(self.sites))
        self.params = SecureParams(fixed_point=FixedPoint(bound=0.5, frac_bits=20), max_weight=200,
                                   threshold=threshold, roster=roster)
        self.rand = rand


def masked_payload(fed: Federation, site: str, row: np.ndarray, samples: int, round_no: int = 3) -> bytes:
    m = mask_delta(row, site=site, samples=samples, params=fed.params, round_secret=fed.secret[site],
                   self_seed=fed.rand(32), federation=FED, round_no=round_no, rand=fed.rand)
    return make_masked_update(federation=FED, site=site, round=round_no, base_sha256="ab" * 32, samples=samples,
                              steps=5, partial=False, metrics={"train_loss": 0.5}, weight=m.weight, key_index=0,
                              masked=m.masked, shares=m.shares, refill=(), signing_key=fed.signing[site],
                              coordinator_box=COORD_BOX.public_key)


def test_masked_update_round_trip_and_checks():
    fed = Federation(3)
    row = np.linspace(-0.2, 0.2, N_VALUES)
    payload = masked_payload(fed, "site-01", row, samples=7)
    assert kind_of(payload) == MASKED and payload[:16].startswith(b"FNCA\x01S\x00\x00")
    got = verify_masked(payload, topic_site="site-01", coordinator_keys=COORD_BOX, registry=fed.registry)
    check_masked(got, params=fed.params, n_values=N_VALUES)
    assert got.header.site == "site-01" and got.weight == 7 and got.masked.dtype == np.dtype("<u4")
    assert len(got.shares) == 2 and got.header.samples == 7
    # 4 bytes per value: the size of a float32 update, about twice a float16 one
    assert N_VALUES * 4 < len(payload) < N_VALUES * 4 + 2048
    with pytest.raises(WireError) as e:
        check_masked(got, params=fed.params, n_values=N_VALUES + 1)
    assert e.value.reason == Reason.BAD_SHAPE and e.value.header.site == "site-01"


def test_masked_update_tamper_and_misuse_are_refused():
    fed = Federation(3)
    payload = masked_payload(fed, "site-01", np.zeros(N_VALUES), samples=3)

    def reason(data: bytes, **kw) -> str:
        args = dict(topic_site="site-01", coordinator_keys=COORD_BOX, registry=fed.registry) | kw
        with pytest.raises(WireError) as e:
            verify_masked(data, **args)
        return e.value.reason

    flipped = bytearray(payload)
    flipped[200] ^= 1
    assert reason(bytes(flipped)) == Reason.BAD_SEAL
    assert reason(payload, topic_site="site-02") == Reason.BAD_SIGNATURE  # signed by another site's key
    assert reason(payload, topic_site="stranger") == Reason.UNKNOWN_SITE
    assert reason(payload, coordinator_keys=PrivateKey.generate()) == Reason.WRONG_KEY
    assert reason(payload, max_bytes=100) == Reason.TOO_LARGE
    assert reason(payload[:10]) == Reason.MALFORMED
    as_update = payload[:5] + b"U" + payload[6:]
    assert reason(as_update) == Reason.MALFORMED  # another kind
    other = Federation(3, seed=1)  # a roster without this site's round key
    got = verify_masked(payload, topic_site="site-01", coordinator_keys=COORD_BOX, registry=fed.registry)
    roster = tuple(RosterEntry(site=e.site, x=e.x, key_index=4, public=e.public) for e in other.params.roster)
    wrong_key = SecureParams(fixed_point=fed.params.fixed_point, max_weight=200, threshold=2, roster=roster)
    with pytest.raises(WireError) as e:
        check_masked(got, params=wrong_key, n_values=N_VALUES)
    assert e.value.reason == RoundReason.NOT_ON_ROSTER


def test_params_field_round_trip_and_overflow_refused():
    fed = Federation(4)
    text = secagg_field.format(fed.params)
    assert secagg_field.parse(text) == fed.params
    with pytest.raises(ValueError, match="overflow"):
        SecureParams(fixed_point=FixedPoint(bound=1.0, frac_bits=30), max_weight=200, threshold=2,
                     roster=fed.params.roster)
    with pytest.raises(ValueError, match="threshold"):
        SecureParams(fixed_point=fed.params.fixed_point, max_weight=200, threshold=5, roster=fed.params.roster)


def test_request_and_answer_round_trip_and_tamper():
    fed = Federation(3)
    request = make_unmask_request(federation=FED, site="site-00", round=3, survivors=("site-00", "site-01"),
                                  missing=("site-02",), shares={"site-01": bytes(76)}, signing_key=COORD_SIGN)
    assert kind_of(request) == UNMASK_REQUEST
    got = open_unmask_request(request, coordinator_verify_key=COORD_SIGN.verify_key, federation=FED, site="site-00")
    assert got.survivors == ("site-00", "site-01") and got.missing == ("site-02",) and got.shares["site-01"] == bytes(76)
    bad = bytearray(request)
    bad[-3] ^= 1
    with pytest.raises(WireError) as e:
        open_unmask_request(bytes(bad), coordinator_verify_key=COORD_SIGN.verify_key, federation=FED, site="site-00")
    assert e.value.reason == Reason.BAD_SIGNATURE
    with pytest.raises(WireError) as e:
        open_unmask_request(request, coordinator_verify_key=COORD_SIGN.verify_key, federation=FED, site="site-01")
    assert e.value.reason == Reason.SITE_MISMATCH
    answer = make_unmask_answer(federation=FED, site="site-01", round=3, self_seed=bytes(32), shares={},
                                pair_seeds={"site-02": bytes(32)}, signing_key=fed.signing["site-01"],
                                coordinator_box=COORD_BOX.public_key)
    assert kind_of(answer) == UNMASK_ANSWER
    opened = open_unmask_answer(answer, topic_site="site-01", coordinator_keys=COORD_BOX, registry=fed.registry,
                                federation=FED)
    assert opened.pair_seeds == {"site-02": bytes(32)} and opened.self_seed == bytes(32)
    with pytest.raises(WireError) as e:
        open_unmask_answer(answer, topic_site="site-00", coordinator_keys=COORD_BOX, registry=fed.registry,
                           federation=FED)
    assert e.value.reason == Reason.BAD_SIGNATURE


def run_round(fed: Federation, rows: dict[str, np.ndarray], samples: dict[str, int], *, missing: set[str],
              silent: set[str], round_no: int = 3) -> np.ndarray:
    """Sites mask, the coordinator collects, forwards shares, takes answers, unmasks; all through the wire."""
    seeds = {s: fed.rand(32) for s in fed.sites}
    updates = {}
    for s in fed.sites:
        if s in missing:
            continue
        m = mask_delta(rows[s], site=s, samples=samples[s], params=fed.params, round_secret=fed.secret[s],
                       self_seed=seeds[s], federation=FED, round_no=round_no, rand=fed.rand)
        payload = make_masked_update(federation=FED, site=s, round=round_no, base_sha256="ab" * 32,
                                     samples=samples[s], steps=1, partial=False, metrics={}, weight=m.weight,
                                     key_index=0, masked=m.masked, shares=m.shares, refill=(),
                                     signing_key=fed.signing[s], coordinator_box=COORD_BOX.public_key)
        updates[s] = verify_masked(payload, topic_site=s, coordinator_keys=COORD_BOX, registry=fed.registry)
    survivors = tuple(sorted(updates))
    answers = {}
    for s in survivors:
        if s in silent:
            continue
        shares = {o: updates[o].shares[[p.site for p in fed.params.peers(o)].index(s)] for o in survivors if o != s}
        request = open_unmask_request(
            make_unmask_request(federation=FED, site=s, round=round_no, survivors=survivors,
                                missing=tuple(sorted(missing)), shares=shares, signing_key=COORD_SIGN),
            coordinator_verify_key=COORD_SIGN.verify_key, federation=FED, site=s)
        a = answer_request(request, site=s, params=fed.params, round_secret=fed.secret[s], self_seed=seeds[s],
                           federation=FED)
        payload = make_unmask_answer(federation=FED, site=s, round=round_no, self_seed=a.self_seed, shares=a.shares,
                                     pair_seeds=a.pair_seeds, signing_key=fed.signing[s],
                                     coordinator_box=COORD_BOX.public_key)
        answers[s] = open_unmask_answer(payload, topic_site=s, coordinator_keys=COORD_BOX, registry=fed.registry,
                                        federation=FED)
        check_answer(answers[s], round_no=round_no, survivors=survivors, missing=tuple(sorted(missing)),
                     params=fed.params)
    return unmask_mean(masked={s: u.masked for s, u in updates.items()}, weights={s: u.weight for s, u in updates.items()},
                       missing=tuple(sorted(missing)), answers=answers, params=fed.params)


@pytest.mark.parametrize("trial", range(6))
def test_unmasked_mean_equals_fedavg_within_the_fixed_point_bound_with_random_dropouts(trial):
    rng = np.random.default_rng(trial)
    fed = Federation(6, threshold=3, seed=trial)
    rows = {s: rng.normal(0, 0.2, N_VALUES) for s in fed.sites}
    samples = {s: int(rng.integers(1, 400)) for s in fed.sites}
    order = list(fed.sites)
    rng.shuffle(order)
    missing = set(order[: trial % 3])  # never sent an update
    # a survivor dies between masking and answering: only decodable when nobody is missing
    silent = set(order[3:4]) if not missing else set()
    mean = run_round(fed, rows, samples, missing=missing, silent=silent)
    survivors = [s for s in fed.sites if s not in missing]
    w = np.array([min(samples[s], 200) for s in survivors], dtype=np.float64)
    want = sum(wi * clip(rows[s], fed.params.fixed_point) for wi, s in zip(w, survivors)) / w.sum()
    bound = error_bound(fed.params.fixed_point)  # 2^-21 = 4.8e-7 absolute, 9.5e-7 of the bound 0.5
    assert np.max(np.abs(mean - want)) <= bound
    assert bound / fed.params.fixed_point.bound < 1e-6


def test_a_silent_survivor_while_a_site_is_missing_cannot_be_decoded():
    fed = Federation(4, threshold=2)
    plan = unmask_plan(survivors=("site-00", "site-01", "site-02"), missing=("site-03",), answers={},
                       threshold=2, final=True)
    assert not plan.ready and plan.hopeless and any("pairwise seeds of site-00" in x for x in plan.lacking)
    rows = {s: np.zeros(N_VALUES) for s in fed.sites}
    with pytest.raises(SecAggError, match="pairwise seeds of site-02"):
        run_round(fed, rows, {s: 5 for s in fed.sites}, missing={"site-03"}, silent={"site-02"})


def test_an_honest_site_refuses_a_request_that_lists_a_site_on_both_sides():
    fed = Federation(3)
    payload = make_unmask_request(federation=FED, site="site-00", round=3, survivors=("site-00", "site-01", "site-02"),
                                  missing=("site-01",), shares={}, signing_key=COORD_SIGN)
    request = open_unmask_request(payload, coordinator_verify_key=COORD_SIGN.verify_key, federation=FED, site="site-00")
    with pytest.raises(SecAggError, match="both survivor and missing"):
        answer_request(request, site="site-00", params=fed.params, round_secret=fed.secret["site-00"],
                       self_seed=bytes(32), federation=FED)


def test_privacy_one_masked_vector_is_uniform_and_the_others_answers_do_not_open_it():
    fed = Federation(4, threshold=3)
    row = np.full(20000, 0.25)  # a constant update: its encoding is one repeated value
    payload = masked_payload(fed, "site-00", row, samples=100)
    got = verify_masked(payload, topic_site="site-00", coordinator_keys=COORD_BOX, registry=fed.registry)
    # uniform over Z_2^32: each of 16 buckets of the top 4 bits holds ~1/16 (chi-square, 15 dof, p < 1e-6 at 50)
    counts = np.bincount((got.masked >> 28).astype(np.int64), minlength=16)
    chi2 = float(((counts - 1250.0) ** 2 / 1250.0).sum())
    assert chi2 < 50
    # the coordinator's unmasking refuses a single survivor's vector with its own seed only
    with pytest.raises(SecAggError):
        unmask_mean(masked={"site-00": got.masked}, weights={"site-00": 100}, missing=(),
                    answers={}, params=fed.params)


def test_round_key_batches_are_signed_and_used_once():
    fed = Federation(2)
    secrets, public = make_batch(site="site-00", signing_key=fed.signing["site-00"], start=0, count=3, rand=fed.rand)
    assert crypto_scalarmult_base(secrets[1]) == public[1].public
    book = RoundKeyBook().add(public, fed.registry)
    assert book.next_key("site-00").index == 0 and book.unused("site-00") == 3
    book = book.mark_used({"site-00": 0})
    assert book.next_key("site-00").index == 1
    assert RoundKeyBook.from_json(book.to_json()) == book
    assert book.add(public[:1], fed.registry).unused("site-00") == 2  # a spent index is never taken again
    forged = public[2].__class__(site="site-01", index=9, public=public[2].public, signature=public[2].signature)
    with pytest.raises(RoundKeyError, match="not signed"):
        book.add([forged], fed.registry)


def test_a_site_refuses_to_answer_when_fewer_than_the_threshold_survive():
    fed = Federation(3, threshold=3)
    payload = make_unmask_request(federation=FED, site="site-00", round=3, survivors=("site-00", "site-01"),
                                  missing=("site-02",), shares={}, signing_key=COORD_SIGN)
    request = open_unmask_request(payload, coordinator_verify_key=COORD_SIGN.verify_key, federation=FED, site="site-00")
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        answer_request(request, site="site-00", params=fed.params, round_secret=fed.secret["site-00"],
                       self_seed=bytes(32), federation=FED)


def test_a_lone_survivor_is_never_unmasked_even_with_a_threshold_of_one():
    # threshold 1 is what a configured `threshold: 1`, or a roster of one site, gives
    fed = Federation(2, threshold=1)
    payload = make_unmask_request(federation=FED, site="site-00", round=3, survivors=("site-00",),
                                  missing=("site-01",), shares={}, signing_key=COORD_SIGN)
    request = open_unmask_request(payload, coordinator_verify_key=COORD_SIGN.verify_key, federation=FED, site="site-00")
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        answer_request(request, site="site-00", params=fed.params, round_secret=fed.secret["site-00"],
                       self_seed=bytes(32), federation=FED)
    alone = Federation(1, threshold=1)
    rows = {"site-00": np.linspace(-0.2, 0.2, N_VALUES)}
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        run_round(alone, rows, {"site-00": 10}, missing=set(), silent=set())


def test_a_masked_update_with_a_scalar_shares_tensor_is_refused_not_raised():
    from fednca.keys import key_id
    from fednca.tensorcodec import format_fields, write_document
    from fednca.wire_envelope import seal_signed
    from fednca.wire_secagg import MASKED_FIELDS
    fed = Federation(3)
    fields = dict(federation=FED, site="site-01", round=3, base_sha256="ab" * 32, update_id="cd" * 16,
                  site_key=key_id(fed.signing["site-01"].verify_key), samples=3, steps=1, partial=False, metrics={},
                  weight=3, ring_bits=32, key_index=0, refill=())
    tensors = {"masked": np.zeros(4 * N_VALUES, np.int8), "shares": np.array(7, dtype=np.int8)}  # shape ()
    body = write_document(tensors, format_fields(fields, MASKED_FIELDS, "masked update"))
    payload = seal_signed(MASKED, body, fed.signing["site-01"], COORD_BOX.public_key)
    with pytest.raises(WireError) as e:
        verify_masked(payload, topic_site="site-01", coordinator_keys=COORD_BOX, registry=fed.registry)
    assert e.value.reason == Reason.BAD_SHAPE


def test_an_answer_missing_a_share_is_refused():
    # The unmasking phase counts an answer as holding a share of every other survivor's seed: one
    # that holds fewer would let it decide "ready" when unmask_mean cannot decode.
    from fednca.shamir import Share
    from fednca.wire_secagg import UnmaskAnswer
    fed = Federation(3)
    mine = Share(x=1, y=5).to_bytes()  # site-00 holds position 1
    survivors = ("site-00", "site-01", "site-02")
    full = UnmaskAnswer(federation=FED, site="site-00", round=3, self_seed=bytes(32),
                        shares={"site-01": mine, "site-02": mine}, pair_seeds={})
    check_answer(full, round_no=3, survivors=survivors, missing=(), params=fed.params)
    short = UnmaskAnswer(federation=FED, site="site-00", round=3, self_seed=bytes(32),
                         shares={"site-01": mine}, pair_seeds={})
    with pytest.raises(SecAggError, match="other survivors"):
        check_answer(short, round_no=3, survivors=survivors, missing=(), params=fed.params)
