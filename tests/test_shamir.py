"""Shamir sharing of 32-byte secrets: any t shares recover, t - 1 do not, shares parse strictly."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from fednca.shamir import (PRIME, SHARE_BYTES, Share, ShamirError, combine, interpolate, split)


def _rand(seed: int):
    gen = random.Random(seed)
    return lambda n: gen.randbytes(n)


def _is_probable_prime(n: int) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47):
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_field_is_prime_and_holds_every_32_byte_secret() -> None:
    assert _is_probable_prime(PRIME)
    assert PRIME > 2 ** 256
    assert not _is_probable_prime(2 ** 256 + 295)  # the check itself can say no


@settings(max_examples=40, deadline=None)
@given(secret=st.binary(min_size=32, max_size=32), n=st.integers(1, 12), data=st.data())
def test_any_t_shares_recover_the_secret(secret: bytes, n: int, data: st.DataObject) -> None:
    t = data.draw(st.integers(1, n))
    shares = split(secret, threshold=t, n=n, rand=_rand(n * 31 + t))
    subset = data.draw(st.permutations(shares)).__getitem__(slice(0, t))
    assert combine(subset, threshold=t) == secret
    assert combine(shares, threshold=t) == secret


def test_t_minus_one_shares_give_a_wrong_value_and_are_refused() -> None:
    secret = bytes(range(32))
    shares = split(secret, threshold=3, n=5, rand=_rand(1))
    for pair in ([shares[0], shares[1]], [shares[2], shares[4]], [shares[1], shares[3]]):
        assert interpolate(pair) != int.from_bytes(secret, "big")
    with pytest.raises(ShamirError, match="need 3 shares, have 2"):
        combine(shares[:2], threshold=3)


def test_t_minus_one_shares_are_consistent_with_any_secret() -> None:
    # For two different secrets, the same two shares x=1,2 can occur: with t=3 the third point is
    # free, so the y values of t-1 shares carry no information. Shown by construction: given the
    # shares of one secret, the polynomial through them and (0, other) exists.
    shares = split(b"\x01" * 32, threshold=3, n=3, rand=_rand(2))
    other = int.from_bytes(b"\x02" * 32, "big")
    forged = [shares[0], shares[1]]
    # the polynomial through (0, other), (1, y1), (2, y2) gives a valid third share
    xs, ys = [0, 1, 2], [other, forged[0].y, forged[1].y]

    def at(x: int) -> int:
        total = 0
        for k in range(3):
            num, den = 1, 1
            for m in range(3):
                if m != k:
                    num = num * (x - xs[m]) % PRIME
                    den = den * (xs[k] - xs[m]) % PRIME
            total += ys[k] * num * pow(den, -1, PRIME)
        return total % PRIME

    third = Share(x=3, y=at(3))
    assert combine([*forged, third], threshold=3) == b"\x02" * 32


def test_share_bytes_round_trip_and_strict_parse() -> None:
    share = split(b"\xff" * 32, threshold=2, n=3, rand=_rand(3))[2]
    raw = share.to_bytes()
    assert len(raw) == SHARE_BYTES == 36
    assert Share.from_bytes(raw) == share
    with pytest.raises(ShamirError):
        Share.from_bytes(raw[:-1])
    with pytest.raises(ShamirError):
        Share.from_bytes(b"\x02" + raw[1:])
    with pytest.raises(ShamirError):
        Share.from_bytes(raw[:1] + b"\x00\x00" + raw[3:])  # x = 0 would be the secret itself
    with pytest.raises(ShamirError):
        Share.from_bytes(raw[:3] + PRIME.to_bytes(33, "big"))


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ShamirError):
        split(b"short", threshold=1, n=1, rand=_rand(4))
    with pytest.raises(ShamirError):
        split(bytes(32), threshold=4, n=3, rand=_rand(4))
    with pytest.raises(ShamirError):
        combine([Share(x=1, y=1), Share(x=1, y=2)], threshold=2)


def test_a_bent_share_gives_a_wrong_secret() -> None:
    shares = split(bytes(32), threshold=2, n=2, rand=_rand(5))
    bent = Share(x=2, y=(shares[1].y + 12345) % PRIME)
    # a share that is off by k moves the secret by a nonzero multiple of k: never the true one
    assert combine([shares[0], bent], threshold=2) != bytes(32)
