"""Which sites connect through which regional broker: ``regions.json`` in the federation folder.

A region is a mosquitto near a group of sites, bridged to the central broker
(:mod:`fednca_broker.bridge`). The file records, per region, the address its sites are told, what
its mosquitto binds, the central broker's address as the region reaches it, the folder of its
files, and its sites. A site belongs to at most one region; a site in none connects to the
central broker. The central broker's ACL (one block per bridge) and each region's files are
written from this record together with the site registry, so they always agree with it.

The operations are pure (a :class:`Regions` in, a new one out); :func:`read_regions` and
:func:`write_regions` are the only I/O, the write atomic like the registry's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fednca.atomic import write_text
from fednca.errors import FedNCAError
from fednca.topics import check_id

from .bridge import bridge_user

FILE_NAME = "regions.json"
_VERSION = 1


class RegionError(FedNCAError):
    """A region or an assignment that cannot be made; the message says which and why."""


@dataclass(frozen=True)
class Region:
    name: str
    url: str  # what its sites connect to: mqtt://HOST:PORT or mqtts://HOST:PORT
    address: str  # what its mosquitto binds
    port: int
    central: str  # the central broker's URL as the regional broker reaches it
    folder: str  # absolute: its mosquitto.conf, passwd, acl, certificates, persistence
    tls_names: tuple[str, ...] = ()  # non-empty: a TLS listener whose certificate names these
    sites: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_id(self.name, what="region")
        for site in self.sites:
            check_id(site, what="site")
        if list(self.sites) != sorted(set(self.sites)):
            raise RegionError(f"region {self.name!r}: sites must be sorted and distinct")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "tls_names": list(self.tls_names), "sites": list(self.sites)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Region":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RegionError(f"region entry has unknown keys {unknown}")
        values = dict(data)
        values["tls_names"] = tuple(values.get("tls_names", ()))
        values["sites"] = tuple(values.get("sites", ()))
        return cls(**values)


@dataclass(frozen=True)
class Regions:
    """Every region of a federation, by name."""

    regions: Mapping[str, Region] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for name, region in self.regions.items():
            if name != region.name:
                raise RegionError(f"region {name!r} is filed under another name ({region.name!r})")
            for site in region.sites:
                if site in seen:
                    raise RegionError(f"site {site!r} is in two regions: {seen[site]!r} and {name!r}")
                seen[site] = name

    def region_of(self, site: str) -> str | None:
        return next((r.name for r in self.regions.values() if site in r.sites), None)

    def put(self, region: Region) -> "Regions":
        """``region`` added or replaced (its sites taken out of any other region: a move)."""
        moved = set(region.sites)
        others = {n: dataclasses.replace(r, sites=tuple(s for s in r.sites if s not in moved))
                  for n, r in self.regions.items() if n != region.name}  # fmt: skip
        return Regions(regions={**others, region.name: region})

    def assign(self, name: str, *, add: Iterable[str] = (), remove: Iterable[str] = ()) -> "Regions":
        """Region ``name`` with ``add`` joined (moved from any other region) and ``remove`` left."""
        if name not in self.regions:
            raise RegionError(f"no region {name!r}; known: {', '.join(sorted(self.regions)) or 'none'}")
        region = self.regions[name]
        gone = set(remove)
        sites = tuple(sorted((set(region.sites) | set(add)) - gone))
        return self.put(dataclasses.replace(region, sites=sites))

    def drop_site(self, site: str) -> "Regions":
        """``site`` out of whichever region held it (revocation)."""
        return Regions(regions={n: dataclasses.replace(r, sites=tuple(s for s in r.sites if s != site))
                                for n, r in self.regions.items()})  # fmt: skip

    def bridges(self, enrolled: Iterable[str]) -> dict[str, tuple[str, ...]]:
        """Region -> its enrolled sites: what the central broker's ACL grants each bridge."""
        known = set(enrolled)
        return {n: tuple(s for s in r.sites if s in known) for n, r in sorted(self.regions.items())}

    @property
    def users(self) -> frozenset[str]:
        """The bridges' accounts on the central broker."""
        return frozenset(bridge_user(n) for n in self.regions)


def path_in(folder: Path) -> Path:
    return folder / FILE_NAME


def password_path(folder: Path, region: str) -> Path:
    """The password of ``region``'s bridge account (0600, beside the coordinator's)."""
    return folder / "secrets" / f"{bridge_user(region)}-mqtt-password"


def read_regions(folder: Path) -> Regions:
    """The federation's regions (none when the file does not exist)."""
    path = path_in(folder)
    if not path.exists():
        return Regions()
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("version") != _VERSION or not isinstance(data.get("regions"), list):
            raise RegionError("expected {\"version\": 1, \"regions\": [...]}")
        return Regions(regions={r.name: r for r in map(Region.from_dict, data["regions"])})
    except (ValueError, TypeError, FedNCAError) as e:
        raise RegionError(f"{path}: {e}") from None


def write_regions(folder: Path, regions: Regions) -> None:
    body = {"version": _VERSION, "regions": [r.to_dict() for _, r in sorted(regions.regions.items())]}
    write_text(path_in(folder), json.dumps(body, indent=1, sort_keys=True) + "\n", mode=0o640)
