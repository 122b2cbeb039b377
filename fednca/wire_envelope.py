"""The envelope every federation message shares (docs/wire.md): prefix, size limit, key id,
signature, and the tensor checks; :mod:`fednca.wire` describes the layout.

The messages themselves live beside it: a site's update in :mod:`fednca.wire_update`, the
coordinator's round announcement and receipt in :mod:`fednca.wire_round`. This module knows no
header field: it opens the envelope in the order that keeps a hostile payload cheap to refuse
(size, prefix, key id, then the signature) and hands back the document.
"""

from __future__ import annotations

import struct
from typing import Any, Mapping, Sequence

import numpy as np
from nacl.exceptions import BadSignatureError, CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey, VerifyKey

from .keys import Registry, key_id_bytes
from .tensorcodec import DTYPES, FLOAT_DTYPES, Document, Reason, WireError, hex_field, int_field, malformed, read_document

MAGIC = b"FNCA"
VERSION = 1
ANNOUNCEMENT, UPDATE, RECEIPT = b"A", b"U", b"R"
LARGE_MODEL = b"M"  # a whole large model, flat (fednca.wire_large)
MASKED, UNMASK_REQUEST, UNMASK_ANSWER = b"S", b"Q", b"N"  # secure aggregation (fednca.wire_secagg)
KIND_NAMES = {
    ANNOUNCEMENT: "round announcement", UPDATE: "update", RECEIPT: "receipt", LARGE_MODEL: "large model",
    MASKED: "masked update", UNMASK_REQUEST: "unmask request", UNMASK_ANSWER: "unmask answer",
}
PREFIX = struct.Struct("<4sBcH8s")  # 16 bytes
SIGNATURE_BYTES = 64
SEAL_BYTES = 48  # ephemeral X25519 public key (32) + Poly1305 tag (16)
MAX_MESSAGE_BYTES = 1 << 20  # mosquitto's max_packet_size in our broker config
MAX_RECEIPT_BYTES = 4096

# Header fields that more than one message carries.
ROUND = int_field(0, 2**31 - 1)
UPDATE_ID = hex_field(32)


def make_prefix(kind: bytes, key: VerifyKey | PublicKey) -> bytes:
    """The 16-byte prefix of a message of ``kind`` for the holder of ``key`` (its id is signed too)."""
    return PREFIX.pack(MAGIC, VERSION, kind, 0, key_id_bytes(key))


def float32(tensors: Mapping[str, Any], what: str) -> dict[str, np.ndarray]:
    """Tensors to send, as float32; NaN or infinity is refused before anything is signed."""
    arrays = {name: np.asarray(t, dtype=np.float32) for name, t in tensors.items()}
    for name, a in arrays.items():
        if not np.isfinite(a).all():
            raise WireError(Reason.NON_FINITE, f"{what} {name}: holds NaN or infinity")
    return arrays


def open_prefix(payload: bytes, kind: bytes, max_bytes: int) -> tuple[memoryview, bytes, bytes]:
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


def pick(keys: Any, kid: bytes, what: str) -> Any:
    """The key among ``keys`` (one key or a sequence) whose id is ``kid``."""
    for key in [keys] if isinstance(keys, (PrivateKey, VerifyKey)) else keys:
        public = key.public_key if isinstance(key, PrivateKey) else key
        if key_id_bytes(public) == kid:
            return key
    raise WireError(Reason.WRONG_KEY, f"made for {what} key {kid.hex()}, which this receiver does not hold")


def verify(key: VerifyKey, prefix: bytes, body: memoryview, signature: bytes) -> bool:
    """Whether ``signature`` is ``key``'s over ``prefix || body`` (a bool: callers explain the refusal)."""
    try:
        key.verify(prefix + body, signature)
    except BadSignatureError:
        return False
    return True


def seal_signed(kind: bytes, body: bytes, signing_key: SigningKey, box: PublicKey) -> bytes:
    """A site's message: prefix, then the seal to ``box`` of the signature over prefix || body and body."""
    prefix = make_prefix(kind, box)
    return prefix + SealedBox(box).encrypt(signing_key.sign(prefix + body).signature + body)


def open_sealed(
    payload: bytes, kind: bytes, *, topic_site: str, coordinator_keys: Any, registry: Registry, max_bytes: int,
    explain: Any = None,
) -> tuple[memoryview, VerifyKey, bytes]:
    """Open a site's sealed message: size and prefix, the box key its id names, the seal, then the
    signature of ``topic_site``'s enrolled key; the signed body, that key and the box key id.
    ``explain(prefix, signature, body)`` may turn a bad signature into a more precise refusal."""
    view, prefix, kid = open_prefix(payload, kind, max_bytes)
    box = pick(coordinator_keys, kid, "coordinator box")
    verify_key = registry.verify_key(topic_site)
    if verify_key is None:
        raise WireError(Reason.UNKNOWN_SITE, f"site {topic_site!r} is not enrolled")
    try:
        plain = SealedBox(box).decrypt(bytes(view[PREFIX.size :]))
    except CryptoError:
        raise WireError(Reason.BAD_SEAL, f"{KIND_NAMES[kind]} does not open with coordinator box key {kid.hex()}") from None
    if len(plain) < SIGNATURE_BYTES:
        raise malformed(f"sealed content of {len(plain)} bytes is too short to hold a signature")
    signature, body = plain[:SIGNATURE_BYTES], memoryview(plain)[SIGNATURE_BYTES:]
    if not verify(verify_key, prefix, body, signature):
        if explain is not None:
            raise explain(prefix, signature, body)
        raise WireError(Reason.BAD_SIGNATURE, f"{KIND_NAMES[kind]} is not signed by the enrolled key of site {topic_site!r}")
    return body, verify_key, kid


def open_signed(payload: bytes, kind: bytes, keys: Any, max_bytes: int) -> tuple[Document, str]:
    view, prefix, kid = open_prefix(payload, kind, max_bytes)
    key = pick(keys, kid, "coordinator signing")
    if len(view) < PREFIX.size + SIGNATURE_BYTES:
        raise malformed(f"{KIND_NAMES[kind]} of {len(view)} bytes is too short to hold a signature")
    signature = bytes(view[PREFIX.size : PREFIX.size + SIGNATURE_BYTES])
    body = view[PREFIX.size + SIGNATURE_BYTES :]
    if not verify(key, prefix, body, signature):
        raise WireError(Reason.BAD_SIGNATURE, f"{KIND_NAMES[kind]} signature does not verify with key {kid.hex()}")
    return read_document(body), kid.hex()


def check_tensors(doc: Document, expected: Mapping[str, Sequence[int]], fail: Any) -> dict[str, np.ndarray]:
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
    if any(e.dtype not in FLOAT_DTYPES for e in doc.entries):
        raise fail(Reason.BAD_DTYPE, "model tensors must be F16 or F32")
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


def failer(header: Any) -> Any:
    """A WireError factory that attaches an authenticated ``header`` to every refusal."""
    return lambda reason, what: WireError(reason, what, header=header)
