"""Round keys for secure aggregation: X25519 key pairs a site uses once each, signed by its identity.

Why round keys and not one X25519 key per site: a site's answer to an unmask request reveals its
self-mask seed and its pairwise seeds with the sites that went missing, and the coordinator keeps
the masked vectors. Were the X25519 key long-lived, a device stolen later would give, with those
stored vectors, every pairwise seed of every past round, and so every past update. A round key is
erased by the site once its round is over; what a thief finds opens no round already aggregated.

* A site makes a **batch** of round key pairs (:func:`make_batch`): secrets stay on the device
  (``round-keys.key``, 0600), the public halves are signed with its Ed25519 signing key over
  ``"fednca-round-key/1" | site | index | public key`` (each part length-prefixed), so neither the
  broker nor anyone holding the file can substitute a key.
* The operator hands the signed public batch to the coordinator at enrolment
  (``fednca coordinator round-keys``; a site already enrolled keeps its identity). Each masked update
  refills the batch with a few new signed public keys, so it never runs out.
* The coordinator keeps every site's signed public round keys in a :class:`RoundKeyBook` (a JSON
  file beside the registry); each round's roster takes, for each site, the lowest index above the
  one it used last (:meth:`RoundKeyBook.next_key`), so a key is never used twice.

Pure apart from :func:`read_book`, :func:`write_book`, :func:`read_secrets` and :func:`write_secrets`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

from nacl.bindings import crypto_scalarmult_base
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .atomic import write_bytes
from .errors import FedNCAError
from .keys import Registry
from .tensorcodec import loads_strict

ROUND_KEYS_SECRET_FILE = "round-keys.key"
ROUND_KEYS_PUBLIC_FILE = "round-keys.pub"
BOOK_FORMAT = "fednca-round-keys/1"
SECRETS_FORMAT = "fednca-round-key-secrets/1"
BATCH_FORMAT = "fednca-round-key-batch/1"
KEY_BYTES = 32
MAX_INDEX = 2**31 - 1
MAX_KEYS_PER_SITE = 4096
_CONTEXT = b"fednca-round-key/1"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX128 = re.compile(r"[0-9a-f]{128}")
_MAX_FILE = 8 << 20

Rand = Callable[[int], bytes]


class RoundKeyError(FedNCAError, ValueError):
    """A round key, batch, book or secrets file is malformed, or a signature does not verify."""


@dataclass(frozen=True)
class SignedRoundKey:
    """The public half of one round key of ``site``, numbered ``index``, signed by the site."""

    site: str
    index: int
    public: bytes
    signature: bytes

    def __post_init__(self) -> None:
        if not 0 <= self.index <= MAX_INDEX:
            raise RoundKeyError(f"round key index must be in 0..{MAX_INDEX}, got {self.index}")
        if len(self.public) != KEY_BYTES or len(self.signature) != 64:
            raise RoundKeyError("a round key is 32 bytes and its signature 64")

    def verify(self, key: VerifyKey) -> None:
        """Raise :class:`RoundKeyError` unless ``key`` (the site's signing key) signed it."""
        try:
            key.verify(signed_text(self.site, self.index, self.public), self.signature)
        except BadSignatureError:
            raise RoundKeyError(f"round key {self.index} of site {self.site!r} is not signed by its "
                                "enrolled signing key") from None

    def to_text(self) -> str:
        """``index:public hex:signature hex``, the form updates and files carry."""
        return f"{self.index}:{self.public.hex()}:{self.signature.hex()}"

    @classmethod
    def from_text(cls, site: str, text: str) -> "SignedRoundKey":
        parts = text.split(":")
        if len(parts) != 3 or not re.fullmatch(r"0|[1-9][0-9]{0,9}", parts[0]):
            raise RoundKeyError(f"round key {text[:40]!r}: expected index:public:signature")
        if not _HEX64.fullmatch(parts[1]) or not _HEX128.fullmatch(parts[2]):
            raise RoundKeyError(f"round key {parts[0]}: public key or signature is not lowercase hex")
        return cls(site=site, index=int(parts[0]), public=bytes.fromhex(parts[1]), signature=bytes.fromhex(parts[2]))


def signed_text(site: str, index: int, public: bytes) -> bytes:
    parts = (_CONTEXT, site.encode(), index.to_bytes(4, "big"), public)
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def make_batch(*, site: str, signing_key: SigningKey, start: int, count: int,
               rand: Rand) -> tuple[dict[int, bytes], list[SignedRoundKey]]:
    """``count`` new round keys numbered from ``start``: (index -> secret, signed public halves)."""
    if count < 1 or start < 0 or start + count - 1 > MAX_INDEX:
        raise RoundKeyError(f"cannot make {count} round keys from index {start}")
    secrets, public = {}, []
    for index in range(start, start + count):
        secret = rand(KEY_BYTES)
        if len(secret) != KEY_BYTES:
            raise RoundKeyError("rand returned the wrong number of bytes")
        pk = crypto_scalarmult_base(secret)
        secrets[index] = secret
        sig = signing_key.sign(signed_text(site, index, pk)).signature
        public.append(SignedRoundKey(site=site, index=index, public=pk, signature=sig))
    return secrets, public


# ------------------------------------------------------------------------------ the coordinator's book


@dataclass(frozen=True)
class RoundKeyBook:
    """Every site's signed public round keys, and the index each used last (immutable)."""

    keys: Mapping[str, Mapping[int, SignedRoundKey]] = field(default_factory=dict)
    used: Mapping[str, int] = field(default_factory=dict)

    def add(self, entries: Iterable[SignedRoundKey], registry: Registry) -> "RoundKeyBook":
        """A book with ``entries`` added, each verified against its site's enrolled signing key.

        A key already held under the same index is kept (a refill sent twice adds nothing); an
        index at or below the one used last is ignored: it can never be chosen again."""
        keys = {site: dict(held) for site, held in self.keys.items()}
        for entry in entries:
            verify_key = registry.verify_key(entry.site)
            if verify_key is None:
                raise RoundKeyError(f"round keys of site {entry.site!r}, which is not enrolled")
            entry.verify(verify_key)
            held = keys.setdefault(entry.site, {})
            if entry.index <= self.used.get(entry.site, -1) or entry.index in held:
                continue
            if len(held) >= MAX_KEYS_PER_SITE:
                raise RoundKeyError(f"site {entry.site!r} already has {MAX_KEYS_PER_SITE} unused round keys")
            held[entry.index] = entry
        return RoundKeyBook(keys=keys, used=dict(self.used))

    def next_key(self, site: str) -> SignedRoundKey | None:
        """The key ``site`` uses in the next round it is on the roster of, or None if it has none left."""
        last = self.used.get(site, -1)
        left = [i for i in self.keys.get(site, {}) if i > last]
        return self.keys[site][min(left)] if left else None

    def unused(self, site: str) -> int:
        last = self.used.get(site, -1)
        return sum(1 for i in self.keys.get(site, {}) if i > last)

    def mark_used(self, chosen: Mapping[str, int]) -> "RoundKeyBook":
        """A book where each site's keys up to ``chosen[site]`` are spent (and dropped)."""
        used = dict(self.used)
        for site, index in chosen.items():
            used[site] = max(used.get(site, -1), index)
        keys = {site: {i: e for i, e in held.items() if i > used.get(site, -1)} for site, held in self.keys.items()}
        return RoundKeyBook(keys=keys, used=used)

    def to_json(self) -> str:
        sites = {s: sorted(e.to_text() for e in held.values()) for s, held in sorted(self.keys.items())}
        return json.dumps({"format": BOOK_FORMAT, "sites": sites, "used": dict(sorted(self.used.items()))},
                          indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str = "round-key book") -> "RoundKeyBook":
        data = _document(text, where=where, format=BOOK_FORMAT, fields=("sites", "used"))
        if not isinstance(data["sites"], dict) or not isinstance(data["used"], dict):
            raise RoundKeyError(f"{where}: sites and used must be objects")
        keys: dict[str, dict[int, SignedRoundKey]] = {}
        for site, entries in data["sites"].items():
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise RoundKeyError(f"{where}: sites.{site} must be a list of round keys")
            keys[site] = {}
            for text in entries:
                entry = SignedRoundKey.from_text(site, text)
                keys[site][entry.index] = entry
        used = {}
        for site, index in data["used"].items():
            if type(index) is not int or not -1 <= index <= MAX_INDEX:
                raise RoundKeyError(f"{where}: used.{site} must be an index")
            used[site] = index
        return cls(keys=keys, used=used)


def batch_to_json(site: str, entries: Iterable[SignedRoundKey]) -> str:
    """The file an operator hands over at enrolment (``round-keys.pub``)."""
    return json.dumps({"format": BATCH_FORMAT, "site": site, "keys": [e.to_text() for e in entries]}, indent=1) + "\n"


def batch_from_json(text: str, *, where: str = "round-key batch") -> list[SignedRoundKey]:
    data = _document(text, where=where, format=BATCH_FORMAT, fields=("site", "keys"))
    if not isinstance(data["site"], str) or not isinstance(data["keys"], list):
        raise RoundKeyError(f"{where}: site must be a string and keys a list")
    return [SignedRoundKey.from_text(data["site"], str(e)) for e in data["keys"]]


def _document(text: str, *, where: str, format: str, fields: tuple[str, str]) -> dict:
    """A JSON object of exactly ``format`` and ``fields``, or a RoundKeyError naming ``where``."""
    try:
        data = loads_strict(text)
    except ValueError as e:
        raise RoundKeyError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or set(data) != {"format", *fields} or data["format"] != format:
        raise RoundKeyError(f"{where}: must be an object with format {format!r}, {fields[0]} and {fields[1]}")
    return data


def _read(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_FILE + 1)
    except OSError as e:
        raise RoundKeyError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > _MAX_FILE:
        raise RoundKeyError(f"{path}: larger than {_MAX_FILE} bytes")
    return data.decode("utf-8", errors="replace")


def read_book(path: str | os.PathLike) -> RoundKeyBook:
    """The book at ``path``; an empty one when the file does not exist (no site sent keys yet)."""
    path = Path(path)
    if not path.exists():
        return RoundKeyBook()
    return RoundKeyBook.from_json(_read(path), where=str(path))


def write_book(path: str | os.PathLike, book: RoundKeyBook) -> None:
    write_bytes(path, book.to_json().encode(), mode=0o644)


# ------------------------------------------------------------------------------ a site's secrets


def secrets_to_json(secrets: Mapping[int, bytes]) -> str:
    return json.dumps({"format": SECRETS_FORMAT, "keys": {str(i): s.hex() for i, s in sorted(secrets.items())}}) + "\n"


def read_secrets(path: str | os.PathLike) -> dict[int, bytes]:
    """A site's round key secrets (index -> 32 bytes); empty when the file does not exist.

    Refused when group or world can read it, as every private key file of the project."""
    path = Path(path)
    if not path.exists():
        return {}
    if path.stat().st_mode & 0o077:
        raise RoundKeyError(f"{path}: round key secrets are readable by group or others; chmod 600 {path}")
    try:
        data = loads_strict(_read(path))
    except ValueError as e:
        raise RoundKeyError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != SECRETS_FORMAT or not isinstance(data.get("keys"), dict):
        raise RoundKeyError(f"{path}: not a {SECRETS_FORMAT} file")
    out = {}
    for index, secret in data["keys"].items():
        if not re.fullmatch(r"0|[1-9][0-9]{0,9}", index) or not isinstance(secret, str) or not _HEX64.fullmatch(secret):
            raise RoundKeyError(f"{path}: entry {index[:16]!r} is not index: 64 hex digits")
        out[int(index)] = bytes.fromhex(secret)
    return out


def write_secrets(path: str | os.PathLike, secrets: Mapping[int, bytes]) -> None:
    write_bytes(path, secrets_to_json(secrets).encode(), mode=0o600)
