"""The byte layer of the wire: safetensors documents, their typed metadata fields, the model
hash, and the one wire error.

A message body is a safetensors document: an 8-byte little-endian header length N, N bytes of
JSON (``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}, ...}``, padded with
spaces to a multiple of 8), then the tensors' bytes, back to back, little-endian.

:func:`write_document` writes one canonical form (keys sorted, compact JSON, tensors in name
order), so the same content always gives the same bytes; the ``safetensors`` library's own writer
orders metadata by a per-process random hash. Any safetensors reader reads our documents.

:func:`read_document` is a strict, bounded reader for bytes from the network: the header length is
checked against the bytes that are there, the JSON must be an object without duplicate keys, only
float16, float32, int8 (the values of a quantised delta, :mod:`fednca.wire_q8`) and int32 (the
positions of a sparse delta, :mod:`fednca.wire_large`) are known, and the tensors must tile the data area exactly (no gaps, no
overlap, no trailing bytes). It returns views into the buffer; it copies nothing but the header.
Every failure is a :class:`WireError`; nothing else escapes.

Header fields travel as strings in the metadata; a :class:`Field` says how one is written and
read back (strictly: type, length, range), and :func:`parse_fields` wants exactly the known set.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from .errors import ConfigError, FedNCAError
from .rounds_vocab import Reason  # the codes a refusal carries, shared with the round policy
from .topics import check_id

DTYPES: dict[str, np.dtype] = {"F16": np.dtype("<f2"), "F32": np.dtype("<f4"), "I8": np.dtype("i1"),
                              "I32": np.dtype("<i4")}  # I32: positions of a sparse delta (fednca.wire_large)
FLOAT_DTYPES = ("F16", "F32")  # what a tensor of model values (weights or a plain delta) may be
MAX_HEADER_BYTES = 64 << 10
MAX_TENSORS = 256
MAX_NDIM = 8
MAX_DIM = 1 << 31
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
_ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})


class WireError(FedNCAError):
    """A message was refused. ``reason`` is a stable :class:`Reason`; the text names the field.

    ``header`` is the message's authenticated header when the refusal came after the signature
    was verified (so the coordinator can answer a stale update with a receipt), else None.
    """

    def __init__(self, reason: Reason, what: str, *, header: Any = None) -> None:
        super().__init__(f"{reason.value}: {what}")
        self.reason = reason
        self.what = what
        self.header = header


def malformed(what: str) -> WireError:
    return WireError(Reason.MALFORMED, what)


@dataclass(frozen=True)
class Entry:
    """One tensor of a document: its bytes are ``data[begin:end]``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class Document:
    metadata: dict[str, str]
    entries: tuple[Entry, ...]  # in data order
    data: memoryview

    def array(self, entry: Entry) -> np.ndarray:
        """A read-only view of one tensor (no copy)."""
        dt = DTYPES[entry.dtype]
        count = (entry.end - entry.begin) // dt.itemsize
        return np.frombuffer(self.data, dt, count, entry.begin).reshape(entry.shape)


# ------------------------------------------------------------------------------------- writing


def write_document(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """The canonical safetensors bytes of float16/float32/int8 ``tensors`` with string ``metadata``."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    parts: list[Any] = []
    offset = 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        code = {"float16": "F16", "float32": "F32", "int8": "I8", "int32": "I32"}.get(array.dtype.name)
        if code is None or not NAME_PATTERN.fullmatch(name):
            raise ValueError(f"tensor {name!r}: needs a plain name and dtype float16, float32 or int8, got {array.dtype}")
        array = np.asarray(array, dtype=DTYPES[code], order="C")  # keeps 0-d arrays 0-d
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        parts.append(array.tobytes() if array.ndim == 0 else memoryview(array).cast("B"))
        offset += array.nbytes
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    encoded = text.encode("ascii")
    encoded += b" " * (-len(encoded) % 8)
    return b"".join([struct.pack("<Q", len(encoded)), encoded, *parts])


# ------------------------------------------------------------------------------------- reading


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key[:64]!r} appears twice in an object")
        result[key] = value
    return result


def _no_constants(name: str) -> Any:
    raise ValueError(f"constant {name} is not allowed")


def loads_strict(text: str) -> Any:
    """JSON without duplicate keys, NaN or Infinity; any failure is a ValueError."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def strict_json(text: str, what: str) -> Any:
    try:
        return loads_strict(text)
    except ValueError as e:  # JSONDecodeError, the hooks above, integers too long to convert
        raise malformed(f"{what}: not valid JSON ({str(e)[:80]})") from None


def _int_list(value: Any, what: str, *, max_len: int) -> list[int]:
    if not isinstance(value, list) or len(value) > max_len:
        raise malformed(f"{what}: must be a list of at most {max_len} integers")
    for v in value:
        if type(v) is not int or not 0 <= v <= MAX_DIM * 8:
            raise malformed(f"{what}: {str(v)[:32]} is not a non-negative integer in range")
    return value


def _entry(name: str, spec: Any) -> Entry:
    if not NAME_PATTERN.fullmatch(name):
        raise malformed(f"tensor name {name[:64]!r} is not allowed")
    if not isinstance(spec, dict) or set(spec) != _ENTRY_KEYS:
        raise malformed(f"tensor {name}: must have exactly dtype, shape and data_offsets")
    dtype = spec["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise WireError(Reason.BAD_DTYPE, f"tensor {name}: dtype {str(dtype)[:16]!r} is not F16, F32, I8 or I32")
    shape = tuple(_int_list(spec["shape"], f"tensor {name} shape", max_len=MAX_NDIM))
    if any(d > MAX_DIM for d in shape):
        raise malformed(f"tensor {name}: a dimension is larger than {MAX_DIM}")
    offsets = _int_list(spec["data_offsets"], f"tensor {name} data_offsets", max_len=2)
    if len(offsets) != 2:
        raise malformed(f"tensor {name}: data_offsets must be [begin, end]")
    begin, end = offsets
    if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise malformed(f"tensor {name}: data_offsets [{begin}, {end}] do not fit shape {shape} of {dtype}")
    return Entry(name=name, dtype=dtype, shape=shape, begin=begin, end=end)


def read_document(body: bytes | memoryview) -> Document:
    """Parse a safetensors document strictly; views into ``body``, never copies of the tensors."""
    view = memoryview(body)
    if len(view) < 8:
        raise malformed(f"document of {len(view)} bytes is shorter than its 8-byte header length")
    n = int.from_bytes(view[:8], "little")
    if n > len(view) - 8 or n > MAX_HEADER_BYTES:
        raise malformed(f"header length {n} exceeds the {len(view) - 8} bytes present (or {MAX_HEADER_BYTES})")
    try:
        text = bytes(view[8 : 8 + n]).decode("utf-8")
    except UnicodeDecodeError:
        raise malformed("document header is not UTF-8") from None
    header = strict_json(text, "document header")
    if not isinstance(header, dict):
        raise malformed("document header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise malformed("__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise malformed(f"{len(header)} tensors; at most {MAX_TENSORS} are allowed")
    entries = sorted((_entry(name, spec) for name, spec in header.items()), key=lambda e: (e.begin, e.end))
    data = view[8 + n :]
    position = 0
    for e in entries:
        if e.begin != position:
            raise malformed(f"tensor {e.name}: starts at {e.begin}, expected {position} (gap or overlap)")
        position = e.end
    if position != len(data):
        raise malformed(f"tensors cover {position} bytes but the data area holds {len(data)}")
    return Document(metadata=metadata, entries=tuple(entries), data=data)


# ------------------------------------------------------------------------------ metadata fields


@dataclass(frozen=True)
class Field:
    """A header field: ``parse`` turns the metadata string into a value or raises ValueError."""

    parse: Callable[[str], Any]
    format: Callable[[Any], str]
    max_len: int = 128


def _format_int(value: Any) -> str:
    return str(value) if type(value) is int else repr(value)


def int_field(lo: int, hi: int) -> Field:
    def parse(raw: str) -> int:
        if not re.fullmatch(r"0|-?[1-9][0-9]{0,18}", raw):
            raise ValueError(f"{raw[:24]!r} is not a decimal integer")
        value = int(raw)
        if not lo <= value <= hi:
            raise ValueError(f"{value} is outside [{lo}, {hi}]")
        return value

    return Field(parse=parse, format=_format_int, max_len=20)


def hex_field(digits: int) -> Field:
    def parse(raw: str) -> str:
        if not re.fullmatch(f"[0-9a-f]{{{digits}}}", raw):
            raise ValueError(f"must be {digits} lowercase hex digits")
        return raw

    return Field(parse=parse, format=str, max_len=digits)


def word_field(words: Mapping[str, Any]) -> Field:
    """One of a few words, each standing for a value (``"true"`` -> True)."""

    def parse(raw: str) -> Any:
        if raw not in words:
            raise ValueError(f"must be one of {', '.join(words)}")
        return words[raw]

    def format(value: Any) -> str:
        return next((w for w, v in words.items() if type(v) is type(value) and v == value), repr(value))

    return Field(parse=parse, format=format, max_len=max(map(len, words)))


def _parse_id(raw: str) -> str:
    return check_id(raw, what="id")  # TopicError is a ValueError


id_field = Field(parse=_parse_id, format=str, max_len=63)


def _parse_code(raw: str) -> str:
    if raw and not re.fullmatch(r"[a-z][a-z0-9_]{0,31}", raw):
        raise ValueError("must be empty or a reason code like 'stale_round'")
    return raw


code_field = Field(parse=_parse_code, format=str, max_len=32)

MAX_METRICS = 4
_METRIC_NAME = re.compile(r"[a-z][a-z0-9_]{0,15}")


def _parse_metrics(raw: str) -> dict[str, float]:
    data = loads_strict(raw)
    if not isinstance(data, dict) or len(data) > MAX_METRICS:
        raise ValueError(f"must be an object of at most {MAX_METRICS} numbers")
    for name, value in data.items():
        if not _METRIC_NAME.fullmatch(name):
            raise ValueError(f"metric name {name[:32]!r} must be lowercase letters, digits and '_'")
        if type(value) not in (int, float) or not math.isfinite(value):
            raise ValueError(f"metric {name} must be a finite number")
    return {name: float(value) for name, value in data.items()}


def _format_metrics(metrics: Any) -> str:
    """Compact JSON; values keep 7 significant digits (float32 precision), which bounds the size."""
    rounded = {str(k): float(f"{float(v):.7g}") for k, v in dict(metrics).items()}
    return json.dumps(rounded, sort_keys=True, separators=(",", ":"), allow_nan=False)


metrics_field = Field(parse=_parse_metrics, format=_format_metrics, max_len=256)


def config_field(cls: Any) -> Field:
    """A frozen configuration dataclass with ``to_dict``/``from_dict``, as compact JSON."""

    def parse(raw: str) -> Any:
        data = loads_strict(raw)
        if not isinstance(data, dict):
            raise ValueError("must be a JSON object")
        for name, value in data.items():
            items = value if isinstance(value, list) else [value]
            if len(items) > 8 or not all(type(v) in (str, int, float, bool) for v in items):
                raise ValueError(f"{name} must be a plain value or a short list of them")
            if any(type(v) in (int, float) and not -1e6 <= v <= 1e6 for v in items):
                raise ValueError(f"{name} is out of range")
        try:
            return cls.from_dict(data)
        except (ConfigError, TypeError) as e:
            raise ValueError(str(e)) from None

    def format(value: Any) -> str:
        if not isinstance(value, cls):
            raise ValueError(f"must be a {cls.__name__}")
        return json.dumps(value.to_dict(), sort_keys=True, separators=(",", ":"))

    return Field(parse=parse, format=format, max_len=2048)


def parse_fields(metadata: Mapping[str, str], spec: Mapping[str, Field], what: str) -> dict[str, Any]:
    """Exactly the fields of ``spec``, each parsed; any failure is ``malformed`` naming the field."""
    if metadata.keys() != spec.keys():
        missing, unknown = sorted(spec.keys() - metadata.keys()), sorted(metadata.keys() - spec.keys())
        raise malformed(f"{what}: missing fields {missing[:4]}, unknown fields {[u[:32] for u in unknown[:4]]}")
    values = {}
    for name, field in spec.items():
        raw = metadata[name]
        if len(raw) > field.max_len:
            raise malformed(f"{what} field {name}: longer than {field.max_len} characters")
        try:
            values[name] = field.parse(raw)
        except ValueError as e:
            raise malformed(f"{what} field {name}: {e}") from None
    return values


def format_fields(values: Mapping[str, Any], spec: Mapping[str, Field], what: str) -> dict[str, str]:
    """The metadata strings of ``values``, checked by reading them back as a receiver will."""
    metadata = {}
    for name, field in spec.items():
        try:
            metadata[name] = field.format(values[name])
        except (ValueError, TypeError) as e:
            raise malformed(f"{what} field {name}: {e}") from None
    parse_fields(metadata, spec, what)
    return metadata


# ------------------------------------------------------------------------------------ the hash

_HASH_TAG = b"fednca-model/1\n"


def model_sha256(tensors: Mapping[str, Any]) -> str:
    """The canonical sha256 (hex) of a tensor dict, as float32.

    Over a tag, then for each name in sorted order: the UTF-8 name's length (u32 LE) and bytes,
    the number of dimensions (u32 LE), each dimension (u64 LE), and the values as float32
    little-endian in C order. Accepts numpy arrays or anything numpy can view (CPU tensors).
    """
    h = hashlib.sha256(_HASH_TAG)
    for name in sorted(tensors):
        array = np.asarray(tensors[name], dtype="<f4", order="C")
        raw = name.encode("utf-8")
        h.update(struct.pack(f"<I{len(raw)}sI{array.ndim}Q", len(raw), raw, array.ndim, *array.shape))
        h.update(array.tobytes() if array.ndim == 0 else memoryview(array).cast("B"))
    return h.hexdigest()
