"""A site's update (docs/wire.md): signed with the site's key, then sealed to the coordinator.

An update opens in two steps so the coordinator can answer a stale update with a receipt:
:func:`verify_update` (unseal, verify against the enrolled key of the topic's site: an
authenticated header) then :func:`check_update` (federation, round, base model, tensors);
:func:`open_update` does both. A refusal after the signature carries the authenticated header.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey

from . import wire_q8
from .keys import Registry, key_id
from .quantise import Quantised, quantise
from .tensorcodec import (
    Document, Entry, Field, Reason, WireError, format_fields, hex_field, id_field, int_field,
    metrics_field, parse_fields, read_document, word_field, write_document,
)
from .wire_envelope import (
    MAX_MESSAGE_BYTES, PREFIX, ROUND, SEAL_BYTES, SIGNATURE_BYTES, UPDATE, UPDATE_ID, VERSION, check_tensors,
    failer, float32, open_sealed, seal_signed, verify,
)

UPDATE_DTYPES = {"float16": np.float16, "float32": np.float32}
# How a delta may travel: the float dtypes, or 8 bits per value with a scale per tensor (fednca.wire_q8).
UPDATE_ENCODINGS = ("float16", "float32", "q8")


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
    dtype: str  # "float16", "float32" or "q8", as it travelled
    delta: Mapping[str, np.ndarray]  # local minus global, float32, read-only


@dataclass(frozen=True)
class VerifiedUpdate:
    """An update whose seal and signature are good; round, base model and tensors not yet checked."""

    header: UpdateHeader
    document: Document


UPDATE_FIELDS: dict[str, Field] = {
    "federation": id_field, "site": id_field, "round": ROUND, "base_sha256": hex_field(64),
    "update_id": UPDATE_ID, "site_key": hex_field(16), "samples": int_field(1, 10**9),
    "steps": int_field(1, 10**9), "partial": word_field({"true": True, "false": False}),
    "metrics": metrics_field,
}

def max_update_bytes(shapes: Mapping[str, Sequence[int]]) -> int:
    """A size limit for updates of a model with these shapes: a float32 delta plus headroom."""
    params = sum(int(np.prod(s)) for s in shapes.values())
    return PREFIX.size + SEAL_BYTES + SIGNATURE_BYTES + 8 + 4 * params + 256 * len(shapes) + 4096


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
    delta: Mapping[str, Any] | Quantised,
    signing_key: SigningKey,
    coordinator_box: PublicKey,
    dtype: str = "float16",
    update_id: str | None = None,
) -> bytes:
    """A site's update: signed with its key, then sealed to the coordinator's box key.

    ``delta`` is local minus global per tensor; it travels as ``dtype`` (float16, float32 or q8).
    A value that float16 cannot hold raises ``non_finite`` (send float32 instead). For q8,
    ``delta`` may already be quantised (:func:`fednca.quantise.quantise_with_feedback`, a site
    that keeps its residual); float tensors are quantised here without feedback.
    """
    if dtype not in UPDATE_ENCODINGS:
        raise ValueError(f"dtype must be one of {', '.join(UPDATE_ENCODINGS)}, got {dtype!r}")
    if dtype == "q8":
        arrays = wire_q8.pack(delta if isinstance(delta, Quantised) else _quantised(delta))
    else:
        if isinstance(delta, Quantised):
            raise ValueError(f"a quantised delta travels as q8, not {dtype}")
        with np.errstate(over="ignore"):  # overflow to infinity is refused just below
            arrays = {name: a.astype(UPDATE_DTYPES[dtype]) for name, a in float32(delta, "delta").items()}
    for name, a in arrays.items():
        if a.dtype != np.int8 and not np.isfinite(a).all():
            raise WireError(Reason.NON_FINITE, f"delta {name}: values beyond the {dtype} range; send float32")
    fields = dict(federation=federation, site=site, round=round, base_sha256=base_sha256,
                  update_id=secrets.token_hex(16) if update_id is None else update_id,
                  site_key=key_id(signing_key.verify_key), samples=samples, steps=steps, partial=partial,
                  metrics=metrics)
    return seal_signed(UPDATE, write_document(arrays, format_fields(fields, UPDATE_FIELDS, "update")), signing_key,
                       coordinator_box)



def _quantised(delta: Mapping[str, Any]) -> Quantised:
    values, scales = {}, {}
    for name, a in float32(delta, "delta").items():
        values[name], scales[name] = quantise(a)
    return Quantised(values=values, scales=scales)


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
    body, verify_key, kid = open_sealed(
        payload, UPDATE, topic_site=topic_site, coordinator_keys=coordinator_keys, registry=registry,
        max_bytes=max_bytes,
        explain=lambda prefix, signature, body: _explain_bad_signature(prefix, signature, body, topic_site, registry),
    )
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
        if verify(registry.verify_key(owner), prefix, body, signature):  # type: ignore[arg-type]
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
    header, fail = verified.header, failer(verified.header)
    if header.federation != federation:
        raise fail(Reason.WRONG_FEDERATION, f"update is for federation {header.federation!r}, not {federation!r}")
    if round is not None and header.round != round:
        raise fail(Reason.STALE_ROUND, f"update is for round {header.round}; the open round is {round}")
    if base_sha256 is not None and header.base_sha256 != base_sha256:
        raise fail(Reason.WRONG_BASE_MODEL, f"update was trained from model {header.base_sha256[:16]}…, "
                   f"round {header.round} trains from {base_sha256[:16]}…")
    doc = verified.document
    if wire_q8.is_q8(doc) and not wire_q8.NAMES <= shapes.keys():
        delta = _read_only(wire_q8.unpack(doc, shapes, fail).dequantised())
        return Update(header=header, dtype="q8", delta=delta)
    delta = check_tensors(doc, shapes, fail)
    return Update(header=header, dtype=_entry_dtype(doc.entries), delta=delta)


def _read_only(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    for a in arrays.values():
        a.flags.writeable = False
    return arrays


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
