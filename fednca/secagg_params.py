"""What a secure round announces (the optional ``secagg`` field of the round announcement): the
fixed-point encoding, the weight cap, the Shamir threshold and the roster.

The roster lists every site expected in the round, sorted by id, with its position ``x`` (the x
of the shares it holds, so both sides agree on it without sending names) and the index and public
half of the round key it masks with (:mod:`fednca.round_keys`). It is signed with the rest of the
announcement. It travels as compact JSON in the announcement's metadata, whose header holds at
most 64 KiB: hence :data:`MAX_ROSTER`. A parameter set that could overflow the ring is refused
when it is built or parsed (:func:`fednca.fixedpoint.check_range`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .fixedpoint import FixedPoint, FixedPointRangeError, check_range
from .tensorcodec import Field, id_field, loads_strict

MAX_ROSTER = 300  # the roster rides in the announcement's metadata (64 KiB in all)



@dataclass(frozen=True)
class RosterEntry:
    """A site expected in the round: its share position ``x`` and the round key it masks with."""

    site: str
    x: int
    key_index: int
    public: bytes


@dataclass(frozen=True)
class SecureParams:
    """What a secure round announces: the encoding, the weight cap, the threshold and the roster."""

    fixed_point: FixedPoint
    max_weight: int
    threshold: int
    roster: tuple[RosterEntry, ...]

    def __post_init__(self) -> None:
        n = len(self.roster)
        if not 1 <= n <= MAX_ROSTER:
            raise ValueError(f"the roster must hold 1 to {MAX_ROSTER} sites, got {n}")
        if [e.x for e in self.roster] != list(range(1, n + 1)):
            raise ValueError("roster positions must be 1..n in order")
        sites = [e.site for e in self.roster]
        if sites != sorted(set(sites)):
            raise ValueError("roster sites must be distinct and sorted")
        if not 1 <= self.threshold <= n:
            raise ValueError(f"threshold {self.threshold} is not within 1..{n}")
        if not 1 <= self.max_weight <= 10**6:
            raise ValueError(f"max_weight {self.max_weight} is not within 1..1000000")
        try:
            check_range(self.fixed_point, n_sites=n, max_weight=self.max_weight)
        except FixedPointRangeError as e:
            raise ValueError(str(e)) from None

    def entry(self, site: str) -> RosterEntry | None:
        return next((e for e in self.roster if e.site == site), None)

    def peers(self, site: str) -> list[RosterEntry]:
        """The roster without ``site``, in roster order: the order of an update's sealed shares."""
        return [e for e in self.roster if e.site != site]

    def to_dict(self) -> dict[str, Any]:
        fp = self.fixed_point
        return {"bound": fp.bound, "frac_bits": fp.frac_bits, "ring_bits": fp.ring_bits, "max_weight": self.max_weight,
                "threshold": self.threshold, "roster": [[e.site, e.key_index, e.public.hex()] for e in self.roster]}


def _parse_params(raw: str) -> SecureParams:
    data = loads_strict(raw)
    if not isinstance(data, dict) or set(data) != {"bound", "frac_bits", "ring_bits", "max_weight", "threshold", "roster"}:
        raise ValueError("must be an object with bound, frac_bits, ring_bits, max_weight, threshold and roster")
    for name in ("frac_bits", "ring_bits", "max_weight", "threshold"):
        if type(data[name]) is not int:
            raise ValueError(f"{name} must be an integer")
    if type(data["bound"]) not in (int, float) or not isinstance(data["roster"], list):
        raise ValueError("bound must be a number and roster a list")
    entries = []
    for x, item in enumerate(data["roster"], start=1):
        if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str) or type(item[1]) is not int
                or not isinstance(item[2], str) or not re.fullmatch(r"[0-9a-f]{64}", item[2])):
            raise ValueError(f"roster entry {x} must be [site, key index, 64 hex digits]")
        entries.append(RosterEntry(site=id_field.parse(item[0]), x=x, key_index=item[1], public=bytes.fromhex(item[2])))
    try:
        fp = FixedPoint(bound=float(data["bound"]), frac_bits=data["frac_bits"], ring_bits=data["ring_bits"])
    except FixedPointRangeError as e:
        raise ValueError(str(e)) from None
    return SecureParams(fixed_point=fp, max_weight=data["max_weight"], threshold=data["threshold"], roster=tuple(entries))


def _format_params(params: Any) -> str:
    if not isinstance(params, SecureParams):
        raise ValueError("must be SecureParams")
    return json.dumps(params.to_dict(), sort_keys=True, separators=(",", ":"))


secagg_field = Field(parse=_parse_params, format=_format_params, max_len=60 << 10)
