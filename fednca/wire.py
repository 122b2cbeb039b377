"""The federation's messages: round announcements, updates and receipts (docs/wire.md).

Every message starts with a 16-byte prefix::

    magic "FNCA" | version u8 | kind u8 ("A", "U" or "R") | flags u16 = 0 | key id (8 bytes)

    announcement, receipt:  prefix | Ed25519 signature (64) | document
    update:                 prefix | SealedBox(Ed25519 signature (64) | document)

The signature covers ``prefix || document``, so the kind, the version and the key id are signed
too. The key id names the key the receiver needs: the coordinator's signing key for announcements
and receipts, the coordinator's box key an update is sealed to. The document is a safetensors
document (:mod:`fednca.tensorcodec`) whose string metadata holds the header fields.

Opening a message checks, in order: size (before anything else), prefix, key id, seal, signature,
then the document and its fields, then what the receiver expects. Every refusal is one
:class:`WireError` with a stable :class:`Reason`; refusals after the signature carry the
authenticated header. An update opens in two steps so the coordinator can answer a stale update
with a receipt: :func:`verify_update` (authenticated header) then :func:`check_update` (round,
base model, tensors); :func:`open_update` does both.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from .config import ModelConfig, TrainConfig
from .errors import ConfigError
from .keys import Registry, key_id, key_id_bytes
from .tensorcodec import (
    DTYPES, Document, Entry, Field, Reason, WireError, code_field, config_field, format_fields, hex_field, id_field,
    int_field, malformed, metrics_field, model_sha256, parse_fields, read_document, word_field, write_document,
)

__all__ = [
    "Announcement", "AnnouncementHeader", "Receipt", "Reason", "Update", "UpdateHeader", "VerifiedUpdate",
    "WireError", "check_update", "make_announcement", "make_receipt", "make_update", "max_update_bytes",
    "model_sha256", "open_announcement", "open_receipt", "open_update", "verify_update",
]

MAGIC = b"FNCA"
VERSION = 1
ANNOUNCEMENT, UPDATE, RECEIPT = b"A", b"U", b"R"
KIND_NAMES = {ANNOUNCEMENT: "round announcement", UPDATE: "update", RECEIPT: "receipt"}
PREFIX = struct.Struct("<4sBcH8s")  # 16 bytes
SIGNATURE_BYTES = 64
SEAL_BYTES = 48  # ephemeral X25519 public key (32) + Poly1305 tag (16)
MAX_MESSAGE_BYTES = 1 << 20  # mosquitto's max_packet_size in our broker config
MAX_RECEIPT_BYTES = 4096
UPDATE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass(frozen=True)
class UpdateHeader:
    federation: str
    site: str
    round: int
    base_sha256: str  # model_sha256 of the global model it was trained from
    update_id: str  # 32 hex digits, random
    site_key: str  # key id of the site's signing key
    coordinator_key: str  # key id of the coordinator box key it was sealed to
    samples: int
    steps: int
    partial: bool  # the deadline came before the planned steps
    metrics: Mapping[str, float]
    version: int = VERSION


@dataclass(frozen=True)
class Update:
    header: UpdateHeader
    dtype: str  # "float16" or "float32", as it travelled
    delta: Mapping[str, np.ndarray]  # local minus global, float32, read-only


@dataclass(frozen=True)
class VerifiedUpdate:
    """An update whose seal and signature are good; round, base model and tensors not yet checked."""

    header: UpdateHeader
    document: Document


@dataclass(frozen=True)
class AnnouncementHeader:
    federation: str
    round: int
    deadline: int  # unix seconds
    quorum: int
    train: TrainConfig
    model: ModelConfig
    model_sha256: str
    key_id: str  # the coordinator signing key's id
    version: int = VERSION


@dataclass(frozen=True)
class Announcement:
    header: AnnouncementHeader
    tensors: Mapping[str, np.ndarray]  # the global model, float32, read-only


@dataclass(frozen=True)
class Receipt:
    federation: str
    site: str
    round: int
    update_id: str
    accepted: bool
    reason: str  # "" when accepted, else a reason code
    key_id: str
    version: int = VERSION


ROUND = int_field(0, 2**31 - 1)
UPDATE_ID = hex_field(32)
UPDATE_FIELDS: dict[str, Field] = {
    "federation": id_field, "site": id_field, "round": ROUND, "base_sha256": hex_field(64),
    "update_id": UPDATE_ID, "site_key": hex_field(16), "samples": int_field(1, 10**9),
    "steps": int_field(1, 10**9), "partial": word_field({"true": True, "false": False}),
    "metrics": metrics_field,
}
ANNOUNCEMENT_FIELDS: dict[str, Field] = {
    "federation": id_field, "round": ROUND, "deadline": int_field(0, 2**40), "quorum": int_field(1, 10**6),
    "train": config_field(TrainConfig), "model": config_field(ModelConfig), "model_sha256": hex_field(64),
}
RECEIPT_FIELDS: dict[str, Field] = {
    "federation": id_field, "site": id_field, "round": ROUND, "update_id": UPDATE_ID,
    "verdict": word_field({"accepted": "accepted", "rejected": "rejected"}), "reason": code_field,
}


def max_update_bytes(shapes: Mapping[str, Sequence[int]]) -> int:
    """A size limit for updates of a model with these shapes: a float32 delta plus headroom."""
    params = sum(int(np.prod(s)) for s in shapes.values())
    return PREFIX.size + SEAL_BYTES + SIGNATURE_BYTES + 8 + 4 * params + 256 * len(shapes) + 4096


# ------------------------------------------------------------------------------------ encoding


def _prefix(kind: bytes, key: VerifyKey | PublicKey) -> bytes:
    return PREFIX.pack(MAGIC, VERSION, kind, 0, key_id_bytes(key))


def _float32(tensors: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    arrays = {name: np.asarray(t, dtype=np.float32) for name, t in tensors.items()}
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            raise WireError(Reason.NON_FINITE, f"{what} {name}: holds NaN or infinity")
    return arrays


def make_announcement(
    *,
    federation: str,
    round: int,
    deadline: int,
    quorum: int,
    train: TrainConfig,
    model: ModelConfig,
    tensors: Mapping[str, Any],
    signing_key: SigningKey,
) -> bytes:
    """A signed round announcement carrying the global model as float32."""
    arrays = _float32(tensors, "tensor")
    fields = dict(federation=federation, round=round, deadline=deadline, quorum=quorum, train=train,
                  model=model, model_sha256=model_sha256(arrays))
    prefix = _prefix(ANNOUNCEMENT, signing_key.verify_key)
    body = write_document(arrays, format_fields(fields, ANNOUNCEMENT_FIELDS, "announcement"))
    return prefix + signing_key.sign(prefix + body).signature + body


def make_update(
    *,
    federation: str,
    site: str,
    round: int,
    base_sha256: str,
    samples: int,
    steps: int,
    partial: bool,
    metrics: Mapping[str, float],
    delta: Mapping[str, Any],
    signing_key: SigningKey,
    coordinator_box: PublicKey,
    dtype: str = "float16",
    update_id: str | None = None,
) -> bytes:
    """A site's update: signed with its key, then sealed to the coordinator's box key.

    ``delta`` is local minus global per tensor; it travels as ``dtype`` (float16 or float32).
    A value that float16 cannot hold raises ``non_finite`` (send float32 instead).
    """
    if dtype not in UPDATE_DTYPES:
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    with np.errstate(over="ignore"):  # overflow to infinity is refused just below
        arrays = {name: a.astype(UPDATE_DTYPES[dtype]) for name, a in _float32(delta, "delta").items()}
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            raise WireError(Reason.NON_FINITE, f"delta {name}: values beyond the {dtype} range; send float32")
    fields = dict(federation=federation, site=site, round=round, base_sha256=base_sha256,
                  update_id=secrets.token_hex(16) if update_id is None else update_id,
                  site_key=key_id(signing_key.verify_key), samples=samples, steps=steps, partial=partial,
                  metrics=metrics)
    prefix = _prefix(UPDATE, coordinator_box)
    body = write_document(arrays, format_fields(fields, UPDATE_FIELDS, "update"))
    signature = signing_key.sign(prefix + body).signature
    return prefix + SealedBox(coordinator_box).encrypt(signature + body)


def make_receipt(
    *, federation: str, site: str, round: int, update_id: str, reason: str | None, signing_key: SigningKey
) -> bytes:
    """A signed receipt: ``reason`` None means accepted, else the reason code of the refusal."""
    fields = dict(federation=federation, site=site, round=round, update_id=update_id,
                  verdict="accepted" if reason is None else "rejected", reason=str(reason or ""))
    prefix = _prefix(RECEIPT, signing_key.verify_key)
    body = write_document({}, format_fields(fields, RECEIPT_FIELDS, "receipt"))
    return prefix + signing_key.sign(prefix + body).signature + body


# ------------------------------------------------------------------------------------ decoding


def _open_prefix(payload: bytes, kind: bytes, max_bytes: int) -> tuple[memoryview, bytes, bytes]:
    """Size and prefix checks; returns (whole message view, prefix bytes, key id bytes)."""
    if len(payload) > max_bytes:
        raise WireError(Reason.TOO_LARGE, f"{KIND_NAMES[kind]} of {len(payload)} bytes exceeds the limit of {max_bytes}")
    # Tensors come back as views into the payload: make sure nobody else can change it.
    view = memoryview(payload if isinstance(payload, bytes) else bytes(payload))
    if len(view) < PREFIX.size:
        raise malformed(f"{len(view)} bytes is shorter than the {PREFIX.size}-byte prefix")
    prefix = bytes(view[: PREFIX.size])
    magic, version, got, flags, kid = PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise malformed("not a FedNCA message (bad magic)")
    if version != VERSION:
        raise WireError(Reason.BAD_VERSION, f"protocol version {version}; this receiver speaks {VERSION}")
    if got != kind:
        raise malformed(f"expected a {KIND_NAMES[kind]}, got kind {got!r}")
    if flags:
        raise malformed(f"unknown flags {flags:#06x}")
    return view, prefix, kid


def _pick(keys: Any, kid: bytes, what: str) -> Any:
    """The key among ``keys`` (one key or a sequence) whose id is ``kid``."""
    for key in [keys] if isinstance(keys, (PrivateKey, VerifyKey)) else keys:
        public = key.public_key if isinstance(key, PrivateKey) else key
        if key_id_bytes(public) == kid:
            return key
    raise WireError(Reason.WRONG_KEY, f"made for {what} key {kid.hex()}, which this receiver does not hold")


def _verify(key: VerifyKey, prefix: bytes, body: memoryview, signature: bytes) -> bool:
    try:
        key.verify(prefix + body, signature)
    except BadSignatureError:
        return False
    return True


def _open_signed(payload: bytes, kind: bytes, keys: Any, max_bytes: int) -> tuple[Document, str]:
    view, prefix, kid = _open_prefix(payload, kind, max_bytes)
    key = _pick(keys, kid, "coordinator signing")
    if len(view) < PREFIX.size + SIGNATURE_BYTES:
        raise malformed(f"{KIND_NAMES[kind]} of {len(view)} bytes is too short to hold a signature")
    signature = bytes(view[PREFIX.size : PREFIX.size + SIGNATURE_BYTES])
    body = view[PREFIX.size + SIGNATURE_BYTES :]
    if not _verify(key, prefix, body, signature):
        raise WireError(Reason.BAD_SIGNATURE, f"{KIND_NAMES[kind]} signature does not verify with key {kid.hex()}")
    return read_document(body), kid.hex()


def _check_tensors(doc: Document, expected: Mapping[str, Sequence[int]], fail: Any) -> dict[str, np.ndarray]:
    """Names and shapes must equal ``expected``, one dtype, all finite; float32 views by name."""
    got = {e.name: e.shape for e in doc.entries}
    if got.keys() != expected.keys():
        extra, missing = sorted(got.keys() - expected.keys()), sorted(expected.keys() - got.keys())
        raise fail(Reason.BAD_SHAPE, f"tensor names differ from the model's (unexpected {extra[:3]}, missing {missing[:3]})")
    for name, shape in got.items():
        if shape != tuple(expected[name]):
            raise fail(Reason.BAD_SHAPE, f"tensor {name} has shape {shape}, the model's is {tuple(expected[name])}")
    if len({e.dtype for e in doc.entries}) > 1:
        raise fail(Reason.BAD_DTYPE, "tensors mix F16 and F32")
    if not doc.entries:
        return {}
    dt = DTYPES[doc.entries[0].dtype]
    flat = np.frombuffer(doc.data, dt)
    if not np.isfinite(flat).all():
        bad = next(e.name for e in doc.entries if not np.isfinite(doc.array(e)).all())
        raise fail(Reason.NON_FINITE, f"tensor {bad} holds NaN or infinity")
    if dt.itemsize != 4:
        flat = flat.astype(np.float32)
        flat.flags.writeable = False
    step = dt.itemsize
    return {e.name: flat[e.begin // step : e.end // step].reshape(e.shape) for e in doc.entries}


def _failer(header: Any) -> Any:
    return lambda reason, what: WireError(reason, what, header=header)


def _entry_dtype(entries: Sequence[Entry]) -> str:
    return "float16" if entries and entries[0].dtype == "F16" else "float32"


def verify_update(
    payload: bytes,
    *,
    topic_site: str,
    coordinator_keys: PrivateKey | Sequence[PrivateKey],
    registry: Registry,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> VerifiedUpdate:
    """Unseal with the coordinator box key the prefix names, verify with ``topic_site``'s enrolled key.

    ``coordinator_keys`` are the box keys still accepted (the current one, and during a rotation
    the previous one); an update sealed to any other key is ``wrong_key``.
    """
    view, prefix, kid = _open_prefix(payload, UPDATE, max_bytes)
    box = _pick(coordinator_keys, kid, "coordinator box")
    verify_key = registry.verify_key(topic_site)
    if verify_key is None:
        raise WireError(Reason.UNKNOWN_SITE, f"site {topic_site!r} is not enrolled")
    try:
        plain = SealedBox(box).decrypt(bytes(view[PREFIX.size :]))
    except CryptoError:
        raise WireError(Reason.BAD_SEAL, f"update does not open with coordinator box key {kid.hex()}") from None
    if len(plain) < SIGNATURE_BYTES:
        raise malformed(f"sealed content of {len(plain)} bytes is too short to hold a signature")
    signature, body = plain[:SIGNATURE_BYTES], memoryview(plain)[SIGNATURE_BYTES:]
    if not _verify(verify_key, prefix, body, signature):
        raise _explain_bad_signature(prefix, signature, body, topic_site, registry)
    doc = read_document(body)
    header = UpdateHeader(**parse_fields(doc.metadata, UPDATE_FIELDS, "update"), coordinator_key=kid.hex())
    if header.site != topic_site:
        raise WireError(Reason.SITE_MISMATCH, f"update names site {header.site!r} but came from {topic_site!r}",
                        header=header)
    if header.site_key != key_id(verify_key):
        raise WireError(Reason.MALFORMED, f"update names signing key {header.site_key}, "
                        f"but verified with {key_id(verify_key)}", header=header)
    return VerifiedUpdate(header=header, document=doc)


def _explain_bad_signature(
    prefix: bytes, signature: bytes, body: memoryview, topic_site: str, registry: Registry
) -> WireError:
    """Why an update does not verify with the topic site's key: another site's, an unknown key, or forged."""
    default = WireError(Reason.BAD_SIGNATURE, f"update is not signed by the enrolled key of site {topic_site!r}")
    try:
        meta = read_document(body).metadata
    except WireError:
        return default
    claimed_site, claimed_key = meta.get("site"), meta.get("site_key")
    enrolled = key_id(registry.verify_key(topic_site))  # type: ignore[arg-type]
    if claimed_site == topic_site and claimed_key != enrolled and registry.site_of_key(str(claimed_key)) is None:
        return WireError(Reason.WRONG_KEY, f"update of site {topic_site!r} is signed with key {str(claimed_key)[:16]!r}, "
                         f"not its enrolled key {enrolled}")
    owner = registry.site_of_key(str(claimed_key))
    if owner is not None and owner == claimed_site != topic_site:
        if _verify(registry.verify_key(owner), prefix, body, signature):  # type: ignore[arg-type]
            return WireError(Reason.SITE_MISMATCH, f"update of site {owner!r} was published as site {topic_site!r}")
    return default


def check_update(
    verified: VerifiedUpdate,
    *,
    federation: str,
    round: int | None,
    base_sha256: str | None,
    shapes: Mapping[str, Sequence[int]],
) -> Update:
    """Federation, round, base model, tensor names, shapes, dtype and values of a verified update.

    ``round`` or ``base_sha256`` None leaves that check to the caller, e.g. a round policy that
    tells an update for an older round from one for a round not yet opened.
    """
    header, fail = verified.header, _failer(verified.header)
    if header.federation != federation:
        raise fail(Reason.WRONG_FEDERATION, f"update is for federation {header.federation!r}, not {federation!r}")
    if round is not None and header.round != round:
        raise fail(Reason.STALE_ROUND, f"update is for round {header.round}; the open round is {round}")
    if base_sha256 is not None and header.base_sha256 != base_sha256:
        raise fail(Reason.WRONG_BASE_MODEL, f"update was trained from model {header.base_sha256[:16]}…, "
                   f"round {header.round} trains from {base_sha256[:16]}…")
    delta = _check_tensors(verified.document, shapes, fail)
    return Update(header=header, dtype=_entry_dtype(verified.document.entries), delta=delta)


def open_update(
    payload: bytes,
    *,
    topic_site: str,
    coordinator_keys: PrivateKey | Sequence[PrivateKey],
    registry: Registry,
    federation: str,
    round: int,
    base_sha256: str,
    shapes: Mapping[str, Sequence[int]],
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Update:
    """:func:`verify_update` then :func:`check_update`."""
    verified = verify_update(payload, topic_site=topic_site, coordinator_keys=coordinator_keys,
                             registry=registry, max_bytes=max_bytes)
    return check_update(verified, federation=federation, round=round, base_sha256=base_sha256, shapes=shapes)


def open_announcement(
    payload: bytes,
    *,
    coordinator_verify_key: VerifyKey | Sequence[VerifyKey],
    federation: str,
    shapes: Mapping[str, Sequence[int]] | None = None,
    min_round: int | None = None,
    max_bytes: int = MAX_MESSAGE_BYTES,
) -> Announcement:
    """A verified round announcement and its float32 global model.

    ``shapes`` default to those of the announced model configuration. ``min_round`` refuses an
    older announcement (a broker replaying a stale retained message) as ``stale_round``.
    """
    doc, kid = _open_signed(payload, ANNOUNCEMENT, coordinator_verify_key, max_bytes)
    header = AnnouncementHeader(**parse_fields(doc.metadata, ANNOUNCEMENT_FIELDS, "announcement"), key_id=kid)
    fail = _failer(header)
    if header.federation != federation:
        raise fail(Reason.WRONG_FEDERATION, f"announcement is for federation {header.federation!r}, not {federation!r}")
    if min_round is not None and header.round < min_round:
        raise fail(Reason.STALE_ROUND, f"announcement of round {header.round} is older than round {min_round}")
    if any(e.dtype != "F32" for e in doc.entries):
        raise fail(Reason.BAD_DTYPE, "the global model must travel as F32")
    if shapes is None:
        shapes = _model_shapes(header.model, fail)
    tensors = _check_tensors(doc, shapes, fail)
    if model_sha256(tensors) != header.model_sha256:
        raise fail(Reason.MALFORMED, "model_sha256 does not match the announced tensors")
    return Announcement(header=header, tensors=tensors)


def _model_shapes(cfg: ModelConfig, fail: Any) -> dict[str, tuple[int, ...]]:
    from .config import tensor_shapes

    try:
        return tensor_shapes(cfg)
    except ConfigError as e:
        raise fail(Reason.MALFORMED, f"announced model configuration: {e}") from None


def open_receipt(
    payload: bytes,
    *,
    coordinator_verify_key: VerifyKey | Sequence[VerifyKey],
    federation: str,
    topic_site: str,
    max_bytes: int = MAX_RECEIPT_BYTES,
) -> Receipt:
    """A verified receipt for ``topic_site``'s update; ``header`` of a refusal is the Receipt."""
    doc, kid = _open_signed(payload, RECEIPT, coordinator_verify_key, max_bytes)
    if doc.entries:
        raise malformed("a receipt carries no tensors")
    fields = parse_fields(doc.metadata, RECEIPT_FIELDS, "receipt")
    verdict = fields.pop("verdict")
    if (verdict == "accepted") != (fields["reason"] == ""):
        raise malformed("a receipt has a reason code exactly when it is a rejection")
    receipt = Receipt(**fields, accepted=verdict == "accepted", key_id=kid)
    if receipt.federation != federation:
        raise WireError(Reason.WRONG_FEDERATION, f"receipt is for federation {receipt.federation!r}", header=receipt)
    if receipt.site != topic_site:
        raise WireError(Reason.SITE_MISMATCH, f"receipt for site {receipt.site!r} came on the topic of "
                        f"{topic_site!r}", header=receipt)
    return receipt
