"""Secure aggregation core: a site's masking CPU, the coordinator's unmasking time, bytes per site.

A micro-measure of the pure functions (no broker, no files), one core, printing one JSON object:

* ``mask``: one site of a 10-site round of the default model (7,262 values): 9 key agreements and
  seed derivations, fixed-point encoding, 10 mask expansions; and the Shamir split of its two
  round secrets (self-mask seed, round key) into one share per peer.
* ``unmask``: the coordinator's :func:`recover_and_unmask` with 10 % of the sites dropped: rebuild
  every survivor's self-mask seed and every dropped site's round key from ``t`` shares, derive the
  dropped sites' seeds with their survivor peers, remove all masks. Every site is paired with all
  others up to 100 sites (Bonawitz et al.); at 1,000 sites each is paired with its 40 ring
  neighbours (the sparse graph of SecAgg+, Bell et al.), which is also measured at 100.
  The masked vectors are random ring elements: the work does not depend on their values (the
  tests hold the arithmetic).
* ``bytes``: the masked vector in each ring width, and what secure aggregation adds to a site's
  messages (its shares, sealed to each peer, and its answer in the dropout exchange: one share
  per peer, of the peer's self-mask seed if it reported, of its round key if it dropped). In
  Z_{2^64} the decoded mean is also limited by float64 (about 1e-16 relative).

    .venv/bin/python bench/bench_secagg.py [--repeat 5] [--out bench/results/secagg.json]

``--wired`` measures the protocol as the federation runs it (fednca.wire_secagg,
fednca.secagg_round), with the real messages:

* ``wired_bytes``: at 10 sites, each site's bytes per round: its masked update (with the refill of
  8 signed round keys a daemon sends), the unmask request it receives and its answer, without
  dropouts, with one site missing, and with one survivor silent after masking; a float16 plain
  update beside it, and what the roster adds to the round announcement.
* ``wired_mask``: a site's CPU for one masked update: encode, 9 key agreements, 10 expansions,
  the Shamir split and 9 sealed shares, then signing and sealing the message.
* ``wired_unmask``: the coordinator's :func:`fednca.secagg_round.unmask_mean` (every pair masked,
  as the wired protocol does) at 10, 100 and 1,000 sites, with no site missing and with 10 %
  missing (each survivor names its seed with each missing site).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np
from nacl.bindings import crypto_scalarmult_base

from fednca.fixedpoint import FixedPoint, encode, largest_frac_bits
from fednca.secagg import mask, pairwise_seed, recover_and_unmask
from fednca.shamir import SHARE_BYTES, split

PARAMS = 7262
FED = "bench"
ROUND = 1
MIB = 1024 * 1024
SEAL_OVERHEAD = 16 + 24  # a secretbox per peer: tag and nonce
SEALED_BOX_OVERHEAD = 48  # the dropout answer is sealed to the coordinator


def _median_s(work, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _fp(n: int, bits: int = 32) -> FixedPoint:
    return FixedPoint(bound=0.5, frac_bits=largest_frac_bits(bound=0.5, n_sites=n, max_weight=200,
                                                            ring_bits=bits), ring_bits=bits)


def bench_mask(repeat: int) -> dict[str, float]:
    gen = random.Random(1)
    ids = [f"site-{i:02d}" for i in range(10)]
    sk = {s: gen.randbytes(32) for s in ids}
    pk = {s: crypto_scalarmult_base(sk[s]) for s in ids}
    fp = _fp(10)
    update = np.random.default_rng(1).normal(0, 0.05, PARAMS)
    me = ids[0]

    def one_site() -> None:
        seeds = {p: pairwise_seed(my_secret=sk[me], peer_public=pk[p], my_id=me, peer_id=p,
                                  federation=FED, round_no=ROUND) for p in ids[1:]}
        mask(encode(update, weight=120, fp=fp), site=me, self_seed=gen.randbytes(32), pair_seeds=seeds, fp=fp)

    def shares() -> None:
        for _ in range(2):
            split(gen.randbytes(32), threshold=6, n=9, rand=gen.randbytes)

    return {"mask_ms": 1e3 * _median_s(one_site, repeat), "share_ms": 1e3 * _median_s(shares, repeat)}


def _peers(ids: list[str], k: int | None) -> dict[str, list[str]]:
    n = len(ids)
    if k is None or k >= n - 1:
        return {s: [p for p in ids if p != s] for s in ids}
    half = k // 2
    return {ids[i]: [ids[(i + d) % n] for d in range(-half, half + 1) if d != 0] for i in range(n)}


def bench_unmask(n: int, k: int | None, repeat: int) -> dict[str, float]:
    gen = random.Random(n)
    ids = [f"site-{i:04d}" for i in range(n)]
    peers = _peers(ids, k)
    degree = len(peers[ids[0]])
    t = degree // 2 + 1
    sk = {s: gen.randbytes(32) for s in ids}
    pk = {s: crypto_scalarmult_base(sk[s]) for s in ids}
    dropped = set(gen.sample(ids, max(1, n // 10)))
    survivors = [s for s in ids if s not in dropped]
    fp = _fp(n)
    rng = np.random.default_rng(n)
    masked = {s: rng.integers(0, 2 ** 32, PARAMS, dtype=np.uint32) for s in survivors}

    def answered(secret: bytes) -> list:
        shares = split(secret, threshold=t, n=degree, rand=gen.randbytes)
        return gen.sample(shares, t)  # a different set of holders per secret, as in a real round

    self_shares = {s: answered(gen.randbytes(32)) for s in survivors}
    key_shares = {d: answered(sk[d]) for d in dropped if set(peers[d]) & set(survivors)}
    pairs_removed = sum(len(set(peers[d]) & set(survivors)) for d in key_shares)

    def run() -> None:
        recover_and_unmask(masked, peers=peers, round_keys=pk, self_seed_shares=self_shares,
                           key_shares=key_shares, threshold=t, federation=FED, round_no=ROUND, fp=fp)

    return {"sites": n, "peers_per_site": degree, "threshold": t, "dropped": len(dropped),
            "pair_masks_removed": pairs_removed, "unmask_s": _median_s(run, repeat),
            "site_answer_bytes": degree * SHARE_BYTES + SEALED_BOX_OVERHEAD,
            "site_shares_sent_bytes": degree * (2 * SHARE_BYTES + SEAL_OVERHEAD)}


def bytes_table() -> dict[str, object]:
    out: dict[str, object] = {}
    for bits in (16, 32, 64):
        fp = _fp(10, bits)
        size = PARAMS * bits // 8
        out[f"ring{bits}"] = {"masked_bytes": size, "masked_mib": round(size / MIB, 4),
                              "frac_bits_10_sites": fp.frac_bits,
                              "error_rel_to_bound_10_sites": 2.0 ** -(fp.frac_bits + 1) / fp.bound}
    return out


# ---------------------------------------------------------------------------------- as wired


def _wired_federation(n: int):
    from nacl.public import PrivateKey
    from nacl.signing import SigningKey

    from fednca.wire_secagg import RosterEntry, SecureParams

    rand = random.Random(n)
    rb = lambda k: bytes(rand.getrandbits(8) for _ in range(k))  # noqa: E731
    sites = [f"site-{i:04d}" for i in range(n)]
    secrets = {s: rb(32) for s in sites}
    roster = tuple(RosterEntry(site=s, x=i + 1, key_index=0, public=crypto_scalarmult_base(secrets[s]))
                   for i, s in enumerate(sites))
    params = SecureParams(fixed_point=_fp(n), max_weight=200, threshold=n // 2 + 1, roster=roster)
    signing = {s: SigningKey(rb(32)) for s in sites}
    return sites, secrets, params, signing, (PrivateKey(rb(32)), SigningKey(rb(32))), rb


def wired_bytes(n: int = 10) -> dict[str, object]:
    from fednca import wire
    from fednca.round_keys import make_batch
    from fednca.secagg_round import mask_delta
    from fednca.wire_secagg import (
        make_masked_update, make_unmask_answer, make_unmask_request, open_unmask_request, secagg_field,
    )

    sites, secrets, params, signing, (coord, coord_sign), rb = _wired_federation(n)
    me, seed = sites[0], rb(32)
    row = np.random.default_rng(0).normal(0, 0.01, PARAMS)
    m = mask_delta(row, site=me, samples=100, params=params, round_secret=secrets[me], self_seed=seed,
                   federation=FED, round_no=ROUND, rand=rb)
    _, refill = make_batch(site=me, signing_key=signing[me], start=1, count=8, rand=rb)
    masked = make_masked_update(federation=FED, site=me, round=ROUND, base_sha256="ab" * 32, samples=100, steps=30,
                                partial=False, metrics={"train_loss": 0.5, "dice_global": 0.7}, weight=m.weight,
                                key_index=0, masked=m.masked, shares=m.shares, refill=refill,
                                signing_key=signing[me], coordinator_box=coord.public_key)
    plain = wire.make_update(federation=FED, site=me, round=ROUND, base_sha256="ab" * 32, samples=100, steps=30,
                             partial=False, metrics={"train_loss": 0.5, "dice_global": 0.7},
                             delta={"w": row.astype(np.float32)}, signing_key=signing[me],
                             coordinator_box=coord.public_key)
    out: dict[str, object] = {"sites": n, "masked_update": len(masked), "plain_float16_update": len(plain),
                              "roster_in_announcement": len(secagg_field.format(params))}
    cases = {"no_dropout": ((), sites[1:]), "one_missing": (sites[-1:], sites[1:-1]),
             "one_silent_survivor": ((), sites[1:])}
    for case, (missing, others) in cases.items():
        survivors = tuple(sorted([me, *others]))
        request = make_unmask_request(federation=FED, site=me, round=ROUND, survivors=survivors,
                                      missing=tuple(missing), shares={o: m.shares[0] for o in others},
                                      signing_key=coord_sign)
        open_unmask_request(request, coordinator_verify_key=coord_sign.verify_key, federation=FED, site=me)
        pair = {d: rb(32) for d in missing}
        answer = make_unmask_answer(federation=FED, site=me, round=ROUND, self_seed=seed,
                                    shares={o: bytes(SHARE_BYTES) for o in others}, pair_seeds=pair,
                                    signing_key=signing[me], coordinator_box=coord.public_key)
        total = len(masked) + len(request) + len(answer)
        out[case] = {"request": len(request), "answer": len(answer), "site_total": total,
                     "site_total_mib": round(total / MIB, 4)}
    return out


def wired_mask(repeat: int, n: int = 10) -> dict[str, float]:
    from fednca.secagg_round import mask_delta
    from fednca.wire_secagg import make_masked_update

    sites, secrets, params, signing, (coord, _), rb = _wired_federation(n)
    row = np.random.default_rng(1).normal(0, 0.01, PARAMS)

    def work() -> None:
        m = mask_delta(row, site=sites[0], samples=100, params=params, round_secret=secrets[sites[0]],
                       self_seed=rb(32), federation=FED, round_no=ROUND, rand=rb)
        make_masked_update(federation=FED, site=sites[0], round=ROUND, base_sha256="ab" * 32, samples=100, steps=30,
                           partial=False, metrics={}, weight=m.weight, key_index=0, masked=m.masked, shares=m.shares,
                           refill=(), signing_key=signing[sites[0]], coordinator_box=coord.public_key)

    return {"sites": n, "seconds_median": round(_median_s(work, repeat), 5)}


def wired_unmask(n: int, missing_fraction: float, repeat: int) -> dict[str, float]:
    from types import SimpleNamespace

    from fednca.secagg_round import unmask_mean
    from fednca.wire_secagg import UnmaskAnswer

    rng = np.random.default_rng(n)
    sites = [f"site-{i:04d}" for i in range(n)]
    missing = sites[: int(n * missing_fraction)]
    survivors = sites[len(missing):]
    fp = _fp(n)
    # the roster's 300-site cap of the announcement does not bind the arithmetic measured here
    params = SimpleNamespace(fixed_point=fp, threshold=n // 2 + 1)
    masked = {s: rng.integers(0, 2**32, PARAMS, dtype=np.uint64).astype(np.uint32) for s in survivors}
    answers = {s: UnmaskAnswer(federation=FED, site=s, round=ROUND, self_seed=rng.bytes(32), shares={},
                               pair_seeds={d: rng.bytes(32) for d in missing}) for s in survivors}
    seconds = _median_s(lambda: unmask_mean(masked=masked, weights={s: 100 for s in survivors}, missing=missing,
                                            answers=answers, params=params), repeat)  # type: ignore[arg-type]
    return {"sites": n, "missing": len(missing), "seconds_median": round(seconds, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--wired", action="store_true", help="the protocol as the federation runs it (see above)")
    args = ap.parse_args()
    if args.wired:
        result = {"params": PARAMS, "wired_bytes": wired_bytes(), "wired_mask": wired_mask(args.repeat),
                  "wired_unmask": [wired_unmask(n, f, max(1, args.repeat if n < 1000 else 1))
                                   for n in (10, 100, 1000) for f in (0.0, 0.1)]}
        text = json.dumps(result, indent=1)
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return
    result = {"params": PARAMS, "mask_10_sites": bench_mask(args.repeat), "bytes": bytes_table(),
              "unmask": [bench_unmask(10, None, args.repeat), bench_unmask(100, None, args.repeat),
                         bench_unmask(100, 40, args.repeat), bench_unmask(1000, 40, max(1, args.repeat // 2))]}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
