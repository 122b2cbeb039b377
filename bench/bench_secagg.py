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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = {"params": PARAMS, "mask_10_sites": bench_mask(args.repeat), "bytes": bytes_table(),
              "unmask": [bench_unmask(10, None, args.repeat), bench_unmask(100, None, args.repeat),
                         bench_unmask(100, 40, args.repeat), bench_unmask(1000, 40, max(1, args.repeat // 2))]}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
