"""Shamir secret sharing of 32-byte secrets, threshold t of n, over the prime field GF(2^256 + 297).

Secure aggregation shares two kinds of 32-byte secrets per round: a site's self-mask seed and its
round X25519 secret key. Any ``t`` shares give the secret back; ``t - 1`` shares are consistent
with every secret (the polynomial's other coefficients are uniform), so they reveal nothing.

Why this field: 2^256 + 297 is the smallest prime above 2^256, so every 32-byte string is a field
element and no secret needs splitting; an element is written in 33 bytes. A share on the wire is
``version (1) | x (2, big endian, 1..65535) | y (33, big endian)``, 36 bytes in all. The x of a
share is the 1-based position of the holder in the round's roster, fixed by the coordinator's
signed roster, so the two sides agree on it without sending names.

Randomness is passed in (``rand(n) -> n bytes``), so tests are deterministic and the device uses
``nacl.utils.random``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from .errors import FedNCAError

PRIME = 2 ** 256 + 297
SECRET_BYTES = 32
ELEMENT_BYTES = 33
SHARE_VERSION = 1
SHARE_BYTES = 1 + 2 + ELEMENT_BYTES
MAX_SHARES = 65535

Rand = Callable[[int], bytes]


class ShamirError(FedNCAError, ValueError):
    """Bad parameters, a malformed share, or shares that cannot give a secret back."""


@dataclass(frozen=True)
class Share:
    """One point (x, y) of the sharing polynomial; x in 1..65535, y in the field."""

    x: int
    y: int

    def __post_init__(self) -> None:
        if not 1 <= self.x <= MAX_SHARES:
            raise ShamirError(f"share x must be in 1..{MAX_SHARES}, got {self.x}")
        if not 0 <= self.y < PRIME:
            raise ShamirError("share y is not a field element")

    def to_bytes(self) -> bytes:
        return bytes([SHARE_VERSION]) + self.x.to_bytes(2, "big") + self.y.to_bytes(ELEMENT_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Share":
        """Strict parse: exact length, known version, x and y in range, else :class:`ShamirError`."""
        if len(data) != SHARE_BYTES:
            raise ShamirError(f"share must be {SHARE_BYTES} bytes, got {len(data)}")
        if data[0] != SHARE_VERSION:
            raise ShamirError(f"unknown share version {data[0]}")
        return cls(x=int.from_bytes(data[1:3], "big"), y=int.from_bytes(data[3:], "big"))


def _random_element(rand: Rand) -> int:
    """Uniform field element by rejection: 257 random bits are below PRIME about half the time."""
    while True:
        raw = rand(ELEMENT_BYTES)
        if len(raw) != ELEMENT_BYTES:
            raise ShamirError("rand returned the wrong number of bytes")
        value = int.from_bytes(raw, "big") & ((1 << 257) - 1)
        if value < PRIME:
            return value


def split(secret: bytes, *, threshold: int, n: int, rand: Rand) -> list[Share]:
    """Shares x = 1..n of ``secret``; any ``threshold`` of them recover it."""
    if len(secret) != SECRET_BYTES:
        raise ShamirError(f"secret must be {SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= n <= MAX_SHARES:
        raise ShamirError(f"need 1 <= threshold <= n <= {MAX_SHARES}, got t={threshold} n={n}")
    coeffs = [int.from_bytes(secret, "big")] + [_random_element(rand) for _ in range(threshold - 1)]
    shares = []
    for x in range(1, n + 1):
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append(Share(x=x, y=y))
    return shares


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """Coefficients l_k with f(0) = sum l_k * f(x_k) for any polynomial of degree < len(xs).

    They depend only on which holders answered, so when many secrets are recovered from the same
    holders (the usual case) they are computed once: O(t^2) once, then O(t) per secret.
    """
    if len(set(xs)) != len(xs):
        raise ShamirError("duplicate share x")
    coeffs = []
    for k, xk in enumerate(xs):
        num, den = 1, 1
        for m, xm in enumerate(xs):
            if m != k:
                num = num * (-xm) % PRIME
                den = den * (xk - xm) % PRIME
        coeffs.append(num * pow(den, -1, PRIME) % PRIME)
    return coeffs


def interpolate(shares: Sequence[Share], coeffs: Sequence[int] | None = None) -> int:
    """f(0) of the polynomial through ``shares`` (no threshold check: a building block)."""
    if coeffs is None:
        coeffs = lagrange_at_zero([s.x for s in shares])
    return sum(c * s.y for c, s in zip(coeffs, shares)) % PRIME


def combine(shares: Iterable[Share], *, threshold: int, coeffs: Sequence[int] | None = None) -> bytes:
    """The secret from at least ``threshold`` shares (the first ``threshold`` are used).

    Fewer shares are refused with :class:`ShamirError`: interpolating them would silently give a
    wrong secret. A result that is not a 32-byte value means the shares were not of one secret.
    """
    chosen = list(shares)[:threshold] if threshold >= 1 else []
    if threshold < 1 or len(chosen) < threshold:
        raise ShamirError(f"need {threshold} shares, have {len(chosen)}")
    value = interpolate(chosen, coeffs)
    if value >= 2 ** (8 * SECRET_BYTES):
        raise ShamirError("shares are inconsistent: they do not interpolate to a 32-byte secret")
    return value.to_bytes(SECRET_BYTES, "big")
