"""Pairwise masking and the coordinator's unmasking for secure aggregation (pure, no I/O).

The scheme is the one of Bonawitz et al. (CCS 2017), with the sparse peer graph of SecAgg+
(Bell et al., CCS 2020) left to the caller: a site masks against the peers it is given.

* Seeds: ``seed_ij = BLAKE2b-256(X25519(sk_i, pk_j), federation, round, lower id, higher id)``.
  Both sites of a pair derive the same seed without a message; the round and federation in the
  derivation make every round's masks fresh even when the keys are reused.
* Masks: a seed expands to the vector length by the ChaCha20 (IETF) keystream of libsodium,
  read as little-endian ring elements; expansion is deterministic, so a seed stands for a mask.
* Site i sends ``y_i = x_i + PRG(b_i) + sum_{j > i} PRG(seed_ij) - sum_{j < i} PRG(seed_ij)``
  (ids ordered as strings, arithmetic modulo 2^k). Over all sites the pairwise terms cancel.
* The coordinator adds the survivors' ``y_i``, removes the self-masks ``PRG(b_i)`` of the
  survivors and, for each dropped site d, the unmatched pairwise terms between d and each
  survivor. It must never hold both the self-mask seed of a site and that site's pairwise seeds:
  :func:`unmask_sum` refuses a site that is both survivor and dropped, and
  :func:`recover_and_unmask` refuses shares that would give such a pair.

Invariant: nothing here mutates its inputs; every refusal is a :class:`SecAggError`.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from nacl.bindings import crypto_aead_chacha20poly1305_ietf_encrypt, crypto_scalarmult, crypto_scalarmult_base
from nacl.encoding import RawEncoder
from nacl.exceptions import CryptoError
from nacl.hash import blake2b

from .errors import FedNCAError
from .fixedpoint import FixedPoint, ring_sum
from .shamir import Share, ShamirError, combine, lagrange_at_zero

SEED_BYTES = 32
_PERSON_PAIR = b"fednca-secagg-pw"  # 16 bytes: BLAKE2b personalisation, one per use
_PERSON_SHARE = b"fednca-secagg-sh"  # the key that seals a pair's shares, kept apart from the mask seed
_NONCE_PAIR = b"pairwise-msk"       # 12 bytes: ChaCha20-IETF nonce, keeps the two mask kinds apart
_NONCE_SELF = b"selfmask-msk"


class SecAggError(FedNCAError):
    """Root of secure-aggregation refusals."""


class MissingSecretsError(SecAggError):
    """Something needed to unmask is missing; ``missing`` names each item (site and what)."""

    def __init__(self, missing: Sequence[str]) -> None:
        self.missing = tuple(missing)
        super().__init__("cannot unmask, missing: " + "; ".join(self.missing))


class NotEnoughSharesError(MissingSecretsError):
    """Fewer than the threshold of shares arrived for a secret the unmasking needs."""


def _framed(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def pairwise_seed(*, my_secret: bytes, peer_public: bytes, my_id: str, peer_id: str,
                  federation: str, round_no: int) -> bytes:
    """The seed both sites of a pair derive from key agreement; symmetric in the pair."""
    if my_id == peer_id:
        raise SecAggError(f"site {my_id} has no pairwise seed with itself")
    try:
        shared = crypto_scalarmult(my_secret, peer_public)
    except (CryptoError, TypeError, ValueError) as exc:  # wrong length or a low-order point
        raise SecAggError(f"key agreement of {my_id} with {peer_id} failed: {exc}") from None
    lo, hi = sorted((my_id, peer_id))
    data = _framed(federation.encode(), round_no.to_bytes(8, "big"), lo.encode(), hi.encode(), shared)
    return blake2b(data, digest_size=SEED_BYTES, person=_PERSON_PAIR, encoder=RawEncoder)


def share_key(*, my_secret: bytes, peer_public: bytes, my_id: str, peer_id: str,
              federation: str, round_no: int) -> bytes:
    """The SecretBox key that seals the shares one site of a pair holds for the other.

    It comes from the same key agreement as :func:`pairwise_seed` under another personalisation,
    so revealing a pair's mask seed (as a survivor does for a missing peer) opens no share."""
    if my_id == peer_id:
        raise SecAggError(f"site {my_id} has no share key with itself")
    try:
        shared = crypto_scalarmult(my_secret, peer_public)
    except (CryptoError, TypeError, ValueError) as exc:
        raise SecAggError(f"key agreement of {my_id} with {peer_id} failed: {exc}") from None
    lo, hi = sorted((my_id, peer_id))
    data = _framed(federation.encode(), round_no.to_bytes(8, "big"), lo.encode(), hi.encode(), shared)
    return blake2b(data, digest_size=SEED_BYTES, person=_PERSON_SHARE, encoder=RawEncoder)


def expand(seed: bytes, *, length: int, fp: FixedPoint, nonce: bytes = _NONCE_PAIR) -> np.ndarray:
    """``length`` uniform ring elements from ``seed`` (ChaCha20 keystream; one key, one use)."""
    if len(seed) != SEED_BYTES:
        raise SecAggError(f"seed must be {SEED_BYTES} bytes, got {len(seed)}")
    nbytes = length * fp.dtype.itemsize
    stream = crypto_aead_chacha20poly1305_ietf_encrypt(bytes(nbytes), None, nonce, seed)[:nbytes]
    return np.frombuffer(stream, dtype=fp.dtype)


def self_mask(seed: bytes, *, length: int, fp: FixedPoint) -> np.ndarray:
    return expand(seed, length=length, fp=fp, nonce=_NONCE_SELF)


def mask(encoded: np.ndarray, *, site: str, self_seed: bytes, pair_seeds: Mapping[str, bytes],
         fp: FixedPoint) -> np.ndarray:
    """A site's masked vector: encoding + self-mask + signed pairwise masks (a new array)."""
    n = encoded.shape[0]
    out = encoded.astype(fp.dtype, copy=True)
    out += self_mask(self_seed, length=n, fp=fp)
    for peer, seed in pair_seeds.items():
        if peer == site:
            raise SecAggError(f"site {site} is listed as its own peer")
        if site < peer:
            out += expand(seed, length=n, fp=fp)
        else:
            out -= expand(seed, length=n, fp=fp)
    return out


def unmask_sum(masked: Mapping[str, np.ndarray], *, self_seeds: Mapping[str, bytes],
               dropped_seeds: Mapping[str, Mapping[str, bytes]], fp: FixedPoint) -> np.ndarray:
    """Ring sum of the survivors' encodings, from their masked vectors and the recovered seeds.

    ``masked``: survivor -> masked vector. ``self_seeds``: survivor -> self-mask seed, one for
    every survivor and none else. ``dropped_seeds``: dropped site -> (survivor -> the pair's seed),
    covering every survivor the dropped site was paired with (the caller's peer graph; with all
    pairs, every survivor). Anything missing is named in a :class:`MissingSecretsError`.
    """
    if not masked:
        raise SecAggError("no masked vectors to sum")
    survivors = set(masked)
    both = sorted(survivors & set(dropped_seeds))
    if both:
        raise SecAggError(f"sites both survivor and dropped (would unmask them): {both}")
    extra = sorted(set(self_seeds) - survivors)
    if extra:
        raise SecAggError(f"self-mask seeds of sites that did not report are refused: {extra}")
    missing = [f"self-mask seed of {s}" for s in sorted(survivors - set(self_seeds))]
    for d in sorted(dropped_seeds):
        unknown = sorted(set(dropped_seeds[d]) - survivors)
        if unknown:
            raise SecAggError(f"pairwise seeds of dropped {d} with non-survivors {unknown}")
    if missing:
        raise MissingSecretsError(missing)
    lengths = {v.shape for v in masked.values()}
    if len(lengths) != 1:
        raise SecAggError(f"masked vectors differ in shape: {sorted(lengths)}")
    n = next(iter(masked.values())).shape[0]
    total = ring_sum(list(masked.values()), fp)
    for s in sorted(survivors):
        total -= self_mask(self_seeds[s], length=n, fp=fp)
    for d, seeds in sorted(dropped_seeds.items()):
        for s, seed in sorted(seeds.items()):
            # survivor s added +PRG if s < d, -PRG if s > d; undo it
            if s < d:
                total -= expand(seed, length=n, fp=fp)
            else:
                total += expand(seed, length=n, fp=fp)
    return total


def recover_and_unmask(masked: Mapping[str, np.ndarray], *, peers: Mapping[str, Sequence[str]],
                       round_keys: Mapping[str, bytes], self_seed_shares: Mapping[str, Sequence[Share]],
                       key_shares: Mapping[str, Sequence[Share]], threshold: int,
                       federation: str, round_no: int, fp: FixedPoint) -> np.ndarray:
    """The coordinator's whole unmasking: rebuild secrets from shares, then :func:`unmask_sum`.

    ``peers``: site -> the sites it masked against (the round's peer graph, symmetric).
    ``round_keys``: site -> its round X25519 public key. ``self_seed_shares``: survivor -> the
    shares of its self-mask seed that the answering survivors returned; ``key_shares``: dropped
    site -> the shares of its round X25519 secret key. Fewer than ``threshold`` shares for any
    needed secret is refused, naming every one that falls short; a share for a secret that must
    stay hidden (a dropped site's self-mask seed, a survivor's key) is refused outright.
    """
    survivors = set(masked)
    unknown = sorted(survivors - set(peers))
    if unknown:
        raise SecAggError(f"masked vectors from sites outside the round: {unknown}")
    dropped = set(peers) - survivors
    wrong = sorted(set(key_shares) & survivors) + sorted(set(self_seed_shares) & dropped)
    if wrong:
        raise SecAggError(f"shares refused, they would unmask a single site: {wrong}")
    need_keys = sorted(d for d in dropped if survivors & set(peers[d]))
    missing = []
    for s in sorted(survivors):
        have = len(self_seed_shares.get(s, ()))
        if have < threshold:
            missing.append(f"self-mask seed of {s}: {have} of {threshold} shares")
    for d in need_keys:
        have = len(key_shares.get(d, ()))
        if have < threshold:
            missing.append(f"round key of dropped {d}: {have} of {threshold} shares")
    if missing:
        raise NotEnoughSharesError(missing)
    coeff_cache: dict[tuple[int, ...], list[int]] = {}

    def rebuild(shares: Sequence[Share]) -> bytes:
        chosen = list(shares)[:threshold]
        xs = tuple(sh.x for sh in chosen)
        if xs not in coeff_cache:
            coeff_cache[xs] = lagrange_at_zero(xs)
        try:
            return combine(chosen, threshold=threshold, coeffs=coeff_cache[xs])
        except ShamirError as exc:
            raise SecAggError(f"shares do not rebuild a secret: {exc}") from None

    self_seeds = {s: rebuild(self_seed_shares[s]) for s in sorted(survivors)}
    dropped_seeds: dict[str, dict[str, bytes]] = {}
    for d in need_keys:
        secret = rebuild(key_shares[d])
        if crypto_scalarmult_base(secret) != round_keys[d]:
            raise SecAggError(f"shares of {d}'s round key do not match its public key")
        dropped_seeds[d] = {
            s: pairwise_seed(my_secret=secret, peer_public=round_keys[s], my_id=d, peer_id=s,
                             federation=federation, round_no=round_no)
            for s in sorted(survivors & set(peers[d]))}
    return unmask_sum(masked, self_seeds=self_seeds, dropped_seeds=dropped_seeds, fp=fp)
