"""Large models and sparse updates on the wire: the flat and top-k layouts (docs/wire.md).

The NCA's messages carry one tensor per model tensor; a UNet of millions of parameters has too
many tensors for the document's table and is far larger than mosquitto's packet limit. This
module carries such models in the same signed (and, for updates, sealed) envelope, with the same
checks, in three layouts that name no model tensor at all (the receiver knows the names and
shapes, as for q8):

    flat.values    F32 or F16  [N]   every model tensor, flat, tensors in sorted name order
    topk.index     I32         [k]   strictly increasing positions in that flat order, 0 <= i < N
    topk.values    F32 or F16  [k]   the delta's values at those positions; every other value is 0

A site's update is an ordinary update (kind ``U``, the same header fields, signed then sealed,
opened by :func:`fednca.wire_update.verify_update`) whose tensors are ``flat.values`` (a dense
delta, float32 or float16) or the ``topk`` pair (the k largest magnitudes of the delta, as the
compressed baselines of the FedNCA paper send them: uplink only). The coordinator's whole model
goes down as kind ``M``: signed, not sealed, ``flat.values`` in float32 with the federation, the
round and the model's sha256 in the header.

Every size limit comes from the model's shapes before anything is opened; every refusal is a
:class:`~fednca.tensorcodec.WireError` with a stable reason, as for the NCA's messages.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from .keys import Registry, key_id
from .tensorcodec import (
    Document, Field, Reason, WireError, format_fields, hex_field, id_field, model_sha256, parse_fields,
    write_document,
)
from .wire_envelope import (
    LARGE_MODEL, PREFIX, ROUND, SEAL_BYTES, SIGNATURE_BYTES, UPDATE, failer, float32, make_prefix, open_signed,
    seal_signed,
)
from .wire_update import UPDATE_FIELDS, Update, verify_update

FLAT = "flat.values"
TOPK_INDEX, TOPK_VALUES = "topk.index", "topk.values"
ENCODINGS = ("float32", "float16", "topk")
MAX_PARAMETERS = 2**31 - 1  # positions travel as int32
_OVERHEAD = PREFIX.size + SEAL_BYTES + SIGNATURE_BYTES + 8 + 4096  # prefix, seal, signature, table

MODEL_FIELDS: dict[str, Field] = {"federation": id_field, "round": ROUND, "model_sha256": hex_field(64)}


@dataclass(frozen=True)
class Uplink:
    """How a site sends its delta: dense float32 or float16, or the top ``fraction`` of its values.

    ``fraction`` is the share of values kept by ``topk`` (0.25 and 0.01 in the paper); ``dtype``
    is how the kept values travel.
    """

    encoding: str = "float32"
    fraction: float = 1.0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {self.encoding!r}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be float32 or float16, got {self.dtype!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")

    @property
    def label(self) -> str:
        """``float32``, ``float16`` or ``top1%``."""
        return f"top{self.fraction * 100:g}%" if self.encoding == "topk" else self.encoding


@dataclass(frozen=True)
class LargeModel:
    federation: str
    round: int
    model_sha256: str
    tensors: Mapping[str, np.ndarray]  # float32, read-only


def parameters(shapes: Mapping[str, Sequence[int]]) -> int:
    """The number of values of a model with these shapes (refused past int32 positions)."""
    n = sum(math.prod(s) for s in shapes.values())
    if n > MAX_PARAMETERS:
        raise ValueError(f"{n} parameters; the large layouts hold at most {MAX_PARAMETERS}")
    return n


def max_bytes(shapes: Mapping[str, Sequence[int]]) -> int:
    """The largest message of any layout for a model of these shapes: at most two 4-byte numbers
    per value (a top-k of everything), plus the envelope and a small table."""
    return _OVERHEAD + 8 * parameters(shapes)


# -------------------------------------------------------------------------------- flat order


def flatten(tensors: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], what: str) -> np.ndarray:
    """Every tensor of ``shapes`` (names and shapes checked), float32, flat, in sorted name order."""
    if tensors.keys() != shapes.keys():
        raise ValueError(f"{what}: tensor names differ from the model's")
    arrays = float32(tensors, what)
    for name, shape in shapes.items():
        if arrays[name].shape != tuple(shape):
            raise ValueError(f"{what} {name}: shape {arrays[name].shape}, the model's is {tuple(shape)}")
    names = sorted(shapes)
    return np.concatenate([arrays[n].reshape(-1) for n in names]) if names else np.zeros(0, np.float32)


def unflatten(flat: np.ndarray, shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """The inverse of :func:`flatten`: read-only float32 views by name."""
    out, offset = {}, 0
    for name in sorted(shapes):
        size = math.prod(shapes[name])
        view = flat[offset : offset + size].reshape(tuple(shapes[name]))
        view.flags.writeable = False
        out[name] = view
        offset += size
    return out


def top_k(flat: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The positions (increasing, int32) and values of the ``ceil(fraction * N)`` largest magnitudes."""
    k = min(flat.size, max(1, math.ceil(fraction * flat.size))) if flat.size else 0
    if k >= flat.size:
        index = np.arange(flat.size, dtype=np.int64)
    else:
        index = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
    return index.astype(np.int32), flat[index]


# ------------------------------------------------------------------------------------ update


def make_large_update(
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
    shapes: Mapping[str, Sequence[int]],
    uplink: Uplink,
    signing_key: SigningKey,
    coordinator_box: PublicKey,
    update_id: str | None = None,
) -> bytes:
    """A site's update of a large model, in ``uplink``'s layout, signed then sealed.

    A value that float16 cannot hold is refused (``non_finite``), as for the NCA's updates.
    """
    flat = flatten(delta, shapes, "delta")
    dtype = np.float16 if uplink.dtype == "float16" else np.float32
    if uplink.encoding == "topk":
        index, values = top_k(flat, uplink.fraction)
        arrays = {TOPK_INDEX: index, TOPK_VALUES: _cast(values, dtype)}
    else:
        arrays = {FLAT: _cast(flat, np.float16 if uplink.encoding == "float16" else np.float32)}
    fields = dict(federation=federation, site=site, round=round, base_sha256=base_sha256,
                  update_id=secrets.token_hex(16) if update_id is None else update_id,
                  site_key=key_id(signing_key.verify_key), samples=samples, steps=steps, partial=partial,
                  metrics=metrics)
    body = write_document(arrays, format_fields(fields, UPDATE_FIELDS, "update"))
    return seal_signed(UPDATE, body, signing_key, coordinator_box)


def _cast(values: np.ndarray, dtype: Any) -> np.ndarray:
    with np.errstate(over="ignore"):
        out = values.astype(dtype)
    if not np.isfinite(out).all():
        raise WireError(Reason.NON_FINITE, f"delta: values beyond the {np.dtype(dtype).name} range; send float32")
    return out


def open_large_update(
    payload: bytes,
    *,
    topic_site: str,
    coordinator_keys: PrivateKey | Sequence[PrivateKey],
    registry: Registry,
    federation: str,
    round: int,
    base_sha256: str,
    shapes: Mapping[str, Sequence[int]],
) -> Update:
    """Open a large update (size from ``shapes``, seal, signature, header, then the layout) and
    return its dense float32 delta by tensor name; ``Update.dtype`` names the layout it came in."""
    verified = verify_update(payload, topic_site=topic_site, coordinator_keys=coordinator_keys,
                             registry=registry, max_bytes=max_bytes(shapes))
    header, fail = verified.header, failer(verified.header)
    if header.federation != federation:
        raise fail(Reason.WRONG_FEDERATION, f"update is for federation {header.federation!r}, not {federation!r}")
    if header.round != round:
        raise fail(Reason.STALE_ROUND, f"update is for round {header.round}; the open round is {round}")
    if header.base_sha256 != base_sha256:
        raise fail(Reason.WRONG_BASE_MODEL, f"update was trained from model {header.base_sha256[:16]}…, "
                   f"round {header.round} trains from {base_sha256[:16]}…")
    flat, layout = read_layout(verified.document, parameters(shapes), fail)
    return Update(header=header, dtype=layout, delta=unflatten(flat, shapes))


def read_layout(doc: Document, n: int, fail: Any) -> tuple[np.ndarray, str]:
    """The dense float32 values of a flat or top-k document for a model of ``n`` values, and the
    layout's name (``float32``, ``float16``, ``topk``, ``topk-float16``)."""
    entries = {e.name: e for e in doc.entries}
    if entries.keys() == {FLAT}:
        values = _values(doc, entries[FLAT], n, fail)
        return values, "float32" if entries[FLAT].dtype == "F32" else "float16"
    if entries.keys() != {TOPK_INDEX, TOPK_VALUES}:
        raise fail(Reason.BAD_SHAPE, f"a large update holds [{FLAT!r}] or [{TOPK_INDEX!r}, {TOPK_VALUES!r}], "
                   f"got {sorted(entries)[:4]}")
    index_entry, value_entry = entries[TOPK_INDEX], entries[TOPK_VALUES]
    if index_entry.dtype != "I32":
        raise fail(Reason.BAD_DTYPE, f"{TOPK_INDEX} must be I32, got {index_entry.dtype}")
    k = index_entry.shape[0] if len(index_entry.shape) == 1 else -1
    if k < 0 or k > n:
        raise fail(Reason.BAD_SHAPE, f"{TOPK_INDEX} has shape {index_entry.shape}; the model holds {n} values")
    values = _values(doc, value_entry, k, fail)
    index = doc.array(index_entry)
    if k and (int(index[0]) < 0 or int(index[-1]) >= n):
        raise fail(Reason.MALFORMED, f"a position of {TOPK_INDEX} is outside 0..{n - 1}")
    if k > 1 and not (np.diff(index) > 0).all():
        raise fail(Reason.MALFORMED, f"the positions of {TOPK_INDEX} must be strictly increasing")
    dense = np.zeros(n, np.float32)
    dense[index] = values
    return dense, "topk" if value_entry.dtype == "F32" else "topk-float16"


def _values(doc: Document, entry: Any, n: int, fail: Any) -> np.ndarray:
    if entry.dtype not in ("F32", "F16"):
        raise fail(Reason.BAD_DTYPE, f"{entry.name} must be F32 or F16, got {entry.dtype}")
    if entry.shape != (n,):
        raise fail(Reason.BAD_SHAPE, f"{entry.name} has shape {entry.shape}; the model needs ({n},)")
    values = doc.array(entry)
    if not np.isfinite(values).all():
        raise fail(Reason.NON_FINITE, f"{entry.name} holds NaN or infinity")
    return values.astype(np.float32)


# ------------------------------------------------------------------------------------- model


def make_large_model(
    *, federation: str, round: int, tensors: Mapping[str, Any], shapes: Mapping[str, Sequence[int]],
    signing_key: SigningKey,
) -> bytes:
    """The coordinator's whole model for ``round``, float32, flat, signed (kind ``M``)."""
    flat = flatten(tensors, shapes, "model")
    fields = {"federation": federation, "round": round, "model_sha256": model_sha256(unflatten(flat, shapes))}
    prefix = make_prefix(LARGE_MODEL, signing_key.verify_key)
    body = write_document({FLAT: flat}, format_fields(fields, MODEL_FIELDS, "large model"))
    return prefix + signing_key.sign(prefix + body).signature + body


def open_large_model(
    payload: bytes, *, coordinator_keys: VerifyKey | Sequence[VerifyKey], federation: str,
    shapes: Mapping[str, Sequence[int]],
) -> LargeModel:
    """Open a large model: size, prefix, key, signature, header, tensors, then its sha256."""
    doc, _ = open_signed(payload, LARGE_MODEL, coordinator_keys, max_bytes(shapes))
    header = parse_fields(doc.metadata, MODEL_FIELDS, "large model")
    fail = failer(header)
    if header["federation"] != federation:
        raise fail(Reason.WRONG_FEDERATION, f"model is for federation {header['federation']!r}, not {federation!r}")
    entries = {e.name: e for e in doc.entries}
    if entries.keys() != {FLAT} or entries[FLAT].dtype != "F32":
        raise fail(Reason.BAD_SHAPE, f"a large model holds exactly {FLAT!r} as F32")
    tensors = unflatten(_values(doc, entries[FLAT], parameters(shapes), fail), shapes)
    if model_sha256(tensors) != header["model_sha256"]:
        raise fail(Reason.MALFORMED, "the model's tensors do not give its signed model_sha256")
    return LargeModel(federation=header["federation"], round=header["round"], model_sha256=header["model_sha256"],
                      tensors=tensors)
