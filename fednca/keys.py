"""Keys of a federation: site identities, the coordinator's keys and the site registry.

* A site holds one Ed25519 signing key (its identity); it signs every update.
* The coordinator holds an X25519 key pair (updates are sealed to it) and an Ed25519 signing key
  (it signs every round announcement and receipt).
* A key id is the first 8 bytes of the sha256 of a public key, written as 16 hex digits. It travels
  in every message so that keys can be rotated: a receiver names the key it lacks instead of
  reporting a bare failure.
* The registry is the coordinator's list of enrolled sites: site id -> Ed25519 verify key.

Key files are one line, ``<label> <64 hex digits>``; the label says what the key is, so a public
key cannot be loaded as a private one nor an X25519 key as an Ed25519 one. Private key files are
written atomically with mode 0600 in a 0700 folder and refused on load when group or world can
read them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from .atomic import write_bytes, write_text
from .errors import FedNCAError
from .tensorcodec import loads_strict
from .topics import TopicError, check_id

KEY_ID_BYTES = 8

SIGNING_KEY_FILE = "signing.key"
SIGNING_PUB_FILE = "signing.pub"
BOX_KEY_FILE = "box.key"
BOX_PUB_FILE = "box.pub"

_LABELS = {
    SIGNING_KEY_FILE: "fednca-ed25519-secret",
    SIGNING_PUB_FILE: "fednca-ed25519-public",
    BOX_KEY_FILE: "fednca-x25519-secret",
    BOX_PUB_FILE: "fednca-x25519-public",
}
_HEX64 = re.compile(r"[0-9a-f]{64}")
_MAX_KEY_FILE = 256
_MAX_REGISTRY_FILE = 4 << 20
REGISTRY_FORMAT = "fednca-registry/1"


class KeyFileError(FedNCAError):
    """A key file or key folder is missing, malformed or too open; the message names the path."""


class RegistryError(FedNCAError):
    """The site registry file is malformed; the message names the file and the entry."""


def key_id_bytes(key: VerifyKey | PublicKey | bytes) -> bytes:
    """The 8-byte fingerprint of a public key (Ed25519 verify key or X25519 public key)."""
    return hashlib.sha256(bytes(key)).digest()[:KEY_ID_BYTES]


def key_id(key: VerifyKey | PublicKey | bytes) -> str:
    """The fingerprint of a public key as 16 hex digits, e.g. ``3f2a9c0e11d4b7a8``."""
    return key_id_bytes(key).hex()


@dataclass(frozen=True)
class SiteKeys:
    """A site's identity: its Ed25519 signing key."""

    signing: SigningKey

    @property
    def verify_key(self) -> VerifyKey:
        return self.signing.verify_key

    @property
    def key_id(self) -> str:
        return key_id(self.signing.verify_key)

    @classmethod
    def generate(cls) -> "SiteKeys":
        return cls(signing=SigningKey.generate())


@dataclass(frozen=True)
class CoordinatorPublicKeys:
    """What a site is given at enrolment: the coordinator's verify key and box (sealing) key."""

    verify: VerifyKey
    box: PublicKey

    @property
    def verify_id(self) -> str:
        return key_id(self.verify)

    @property
    def box_id(self) -> str:
        return key_id(self.box)


@dataclass(frozen=True)
class CoordinatorKeys:
    """The coordinator's Ed25519 signing key and X25519 private key."""

    signing: SigningKey
    box: PrivateKey

    @property
    def public(self) -> CoordinatorPublicKeys:
        return CoordinatorPublicKeys(verify=self.signing.verify_key, box=self.box.public_key)

    @classmethod
    def generate(cls) -> "CoordinatorKeys":
        return cls(signing=SigningKey.generate(), box=PrivateKey.generate())


# ----------------------------------------------------------------------------------------- files


def _key_line(name: str, raw: bytes) -> str:
    return f"{_LABELS[name]} {raw.hex()}\n"


def _parse_key_line(path: Path, text: str, label: str) -> bytes:
    found, _, value = text.strip().partition(" ")
    if found != label:
        raise KeyFileError(f"{path}: not a {label} file (it starts with {found[:40]!r})")
    if not _HEX64.fullmatch(value):
        raise KeyFileError(f"{path}: the key must be 64 lowercase hex digits after the label")
    return bytes.fromhex(value)


def _read_key_file(path: Path, kind: str, *, private: bool) -> bytes:
    """The 32 key bytes of a key file of ``kind`` (one of the file names above)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot open ({e.strerror}; run as the key's owner?)") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if private and st.st_mode & 0o077:
            raise KeyFileError(
                f"{path}: private key is readable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"fix it with: chmod 600 {path}"
            )
        data = f.read(_MAX_KEY_FILE + 1)
    if len(data) > _MAX_KEY_FILE:
        raise KeyFileError(f"{path}: too long for a key file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a text key file") from None
    return _parse_key_line(path, text, _LABELS[kind])


def _prepare_folder(folder: Path, names: list[str], *, force: bool) -> None:
    if folder.exists():
        if not folder.is_dir():
            raise KeyFileError(f"{folder}: exists and is not a folder")
        mode = stat.S_IMODE(folder.stat().st_mode)
        if mode & 0o077:
            raise KeyFileError(f"{folder}: key folder is open to group or others (mode {mode:04o}); "
                               f"fix it with: chmod 700 {folder}")
    else:
        folder.mkdir(mode=0o700, parents=True)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
    if not force:
        present = [n for n in names if (folder / n).exists()]
        if present:
            raise KeyFileError(f"{folder / present[0]}: already exists; refusing to replace a key "
                               "(move it away first, or pass --force)")


def _write_pair(folder: Path, secret_name: str, public_name: str, secret: bytes, public: bytes) -> None:
    write_text(folder / secret_name, _key_line(secret_name, secret), mode=0o600)
    write_text(folder / public_name, _key_line(public_name, public), mode=0o644)


def write_site_keys(folder: str | os.PathLike, keys: SiteKeys, *, force: bool = False) -> None:
    folder = Path(folder)
    _prepare_folder(folder, [SIGNING_KEY_FILE, SIGNING_PUB_FILE], force=force)
    _write_pair(folder, SIGNING_KEY_FILE, SIGNING_PUB_FILE, bytes(keys.signing), bytes(keys.verify_key))


def write_coordinator_keys(folder: str | os.PathLike, keys: CoordinatorKeys, *, force: bool = False) -> None:
    folder = Path(folder)
    _prepare_folder(folder, [SIGNING_KEY_FILE, SIGNING_PUB_FILE, BOX_KEY_FILE, BOX_PUB_FILE], force=force)
    pub = keys.public
    _write_pair(folder, SIGNING_KEY_FILE, SIGNING_PUB_FILE, bytes(keys.signing), bytes(pub.verify))
    _write_pair(folder, BOX_KEY_FILE, BOX_PUB_FILE, bytes(keys.box), bytes(pub.box))


def _read_signing(folder: Path) -> SigningKey:
    signing = SigningKey(_read_key_file(folder / SIGNING_KEY_FILE, SIGNING_KEY_FILE, private=True))
    pub_path = folder / SIGNING_PUB_FILE
    if pub_path.exists() and read_verify_key(pub_path) != signing.verify_key:
        raise KeyFileError(f"{pub_path}: does not match {SIGNING_KEY_FILE} in the same folder")
    return signing


def read_site_keys(folder: str | os.PathLike) -> SiteKeys:
    return SiteKeys(signing=_read_signing(Path(folder)))


def read_coordinator_keys(folder: str | os.PathLike) -> CoordinatorKeys:
    folder = Path(folder)
    box = PrivateKey(_read_key_file(folder / BOX_KEY_FILE, BOX_KEY_FILE, private=True))
    pub_path = folder / BOX_PUB_FILE
    if pub_path.exists() and read_box_public_key(pub_path) != box.public_key:
        raise KeyFileError(f"{pub_path}: does not match {BOX_KEY_FILE} in the same folder")
    return CoordinatorKeys(signing=_read_signing(folder), box=box)


def read_verify_key(path: str | os.PathLike) -> VerifyKey:
    """An Ed25519 public key file (``signing.pub`` of a site or of the coordinator), any file name."""
    return VerifyKey(_read_key_file(Path(path), SIGNING_PUB_FILE, private=False))


def verify_key_from_text(text: str) -> VerifyKey:
    """A site's Ed25519 public key given as a ``signing.pub`` file or as its 64 lowercase hex digits."""
    if Path(text).is_file():
        return read_verify_key(text)
    if _HEX64.fullmatch(text):
        return VerifyKey(bytes.fromhex(text))
    raise KeyFileError(f"site key {text!r}: neither a signing.pub file nor 64 lowercase hex digits")


def read_box_public_key(path: str | os.PathLike) -> PublicKey:
    """An X25519 public key file (the coordinator's ``box.pub``), any file name."""
    return PublicKey(_read_key_file(Path(path), BOX_PUB_FILE, private=False))


def read_coordinator_public(folder: str | os.PathLike) -> CoordinatorPublicKeys:
    """The coordinator's two public keys from a folder holding ``signing.pub`` and ``box.pub``."""
    folder = Path(folder)
    return CoordinatorPublicKeys(
        verify=read_verify_key(folder / SIGNING_PUB_FILE), box=read_box_public_key(folder / BOX_PUB_FILE)
    )


# -------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Registry:
    """Enrolled sites: site id -> Ed25519 verify key. Immutable; enrol/revoke return a new one."""

    sites: Mapping[str, VerifyKey] = field(default_factory=dict)

    def __post_init__(self) -> None:
        by_id: dict[str, str] = {}
        for site, key in self.sites.items():
            try:
                check_id(site, what="site")
            except TopicError as e:
                raise RegistryError(str(e)) from None
            kid = key_id(key)
            if kid in by_id:
                raise RegistryError(f"sites {by_id[kid]!r} and {site!r} share one key ({kid}); each site needs its own")
            by_id[kid] = site
        object.__setattr__(self, "sites", dict(self.sites))
        object.__setattr__(self, "_by_key_id", by_id)

    def verify_key(self, site: str) -> VerifyKey | None:
        return self.sites.get(site)

    def site_of_key(self, kid: str) -> str | None:
        """The site enrolled with the key whose id is ``kid``, if any."""
        return self._by_key_id.get(kid)  # type: ignore[attr-defined]

    def enrol(self, site: str, key: VerifyKey) -> "Registry":
        return Registry(sites={**self.sites, site: key})

    def revoke(self, site: str) -> "Registry":
        if site not in self.sites:
            raise RegistryError(f"site {site!r} is not enrolled")
        return Registry(sites={s: k for s, k in self.sites.items() if s != site})

    def to_json(self) -> str:
        sites = {s: bytes(k).hex() for s, k in sorted(self.sites.items())}
        return json.dumps({"format": REGISTRY_FORMAT, "sites": sites}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, where: str = "registry") -> "Registry":
        try:
            data = loads_strict(text)
        except ValueError as e:
            raise RegistryError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or set(data) != {"format", "sites"}:
            raise RegistryError(f"{where}: must be an object with exactly the fields 'format' and 'sites'")
        if data["format"] != REGISTRY_FORMAT:
            raise RegistryError(f"{where}: format must be {REGISTRY_FORMAT!r}, got {data['format']!r}")
        if not isinstance(data["sites"], dict):
            raise RegistryError(f"{where}: 'sites' must map site ids to hex keys")
        sites = {}
        for site, hexkey in data["sites"].items():
            if not isinstance(hexkey, str) or not _HEX64.fullmatch(hexkey):
                raise RegistryError(f"{where}: sites.{site}: the key must be 64 lowercase hex digits")
            sites[site] = VerifyKey(bytes.fromhex(hexkey))
        try:
            return cls(sites=sites)
        except RegistryError as e:
            raise RegistryError(f"{where}: {e}") from None


def read_registry(path: str | os.PathLike) -> Registry:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_REGISTRY_FILE + 1)
    except FileNotFoundError:
        raise RegistryError(f"{path}: no such registry file") from None
    except OSError as e:
        raise RegistryError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > _MAX_REGISTRY_FILE:
        raise RegistryError(f"{path}: larger than {_MAX_REGISTRY_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise RegistryError(f"{path}: not UTF-8 text") from None
    return Registry.from_json(text, where=str(path))


def write_registry(path: str | os.PathLike, registry: Registry) -> None:
    write_bytes(path, registry.to_json().encode(), mode=0o644)
