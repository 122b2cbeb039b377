"""The ``q8`` tensor layout: a quantised delta (:mod:`fednca.quantise`) inside a wire document.

A q8 document holds exactly two tensors instead of one per model tensor:

    q8.values   I8   [N]   every model tensor's int8 values, flat, tensors in sorted name order
    q8.scales   F32  [T]   one scale per model tensor, same order

N is the model's parameter count and T its number of tensors, both known to the receiver from
the model's shapes, so nothing else needs describing. One flat tensor instead of one per model
tensor saves most of the safetensors table (80 bytes per tensor): for the default model's 14
tensors the table is 1,120 bytes, against 152 for these two, and the 968 bytes saved are about an
eighth of its 7,918-byte q8 update.

Reading is as strict as for float tensors: exactly these two names, these dtypes and lengths;
every scale finite and at least 0; every value in -127..127 (int8's -128 never travels); the
dequantised values finite. Every refusal is a :class:`~fednca.tensorcodec.WireError` made by the
caller's ``fail`` (so it carries the authenticated header).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from .quantise import LEVELS, Quantised
from .tensorcodec import Document, Reason

VALUES = "q8.values"
SCALES = "q8.scales"
NAMES = frozenset({VALUES, SCALES})


def is_q8(doc: Document) -> bool:
    """Whether the document's tensors are the q8 layout (by their names)."""
    return {e.name for e in doc.entries} == NAMES


def pack(q: Quantised) -> dict[str, np.ndarray]:
    """The two tensors that carry ``q``, in sorted tensor name order."""
    names = sorted(q.values)
    values = np.concatenate([np.asarray(q.values[n], np.int8).reshape(-1) for n in names]) if names else \
        np.zeros(0, np.int8)
    scales = np.array([q.scales[n] for n in names], dtype=np.float32)
    return {VALUES: values, SCALES: scales}


def unpack(doc: Document, expected: Mapping[str, Sequence[int]], fail: Any) -> Quantised:
    """The quantised delta of a q8 document, split by the model's ``expected`` shapes."""
    entries = {e.name: e for e in doc.entries}
    if entries.keys() != NAMES:
        raise fail(Reason.BAD_SHAPE, f"a q8 delta holds exactly {sorted(NAMES)}, got {sorted(entries)[:4]}")
    names = sorted(expected)
    sizes = [math.prod(expected[n]) for n in names]
    v, s = entries[VALUES], entries[SCALES]
    if v.dtype != "I8" or s.dtype != "F32":
        raise fail(Reason.BAD_DTYPE, f"q8 values must be I8 and scales F32, got {v.dtype} and {s.dtype}")
    if v.shape != (sum(sizes),) or s.shape != (len(names),):
        raise fail(Reason.BAD_SHAPE, f"q8 tensors of shapes {v.shape} and {s.shape}; the model needs "
                   f"({sum(sizes)},) values and ({len(names)},) scales")
    values, scales = doc.array(v), doc.array(s)
    if not np.isfinite(scales).all() or (scales < 0).any():
        raise fail(Reason.NON_FINITE, "a q8 scale is negative, NaN or infinite")
    if values.size and int(values.min()) < -LEVELS:
        raise fail(Reason.MALFORMED, f"a q8 value is -128; values are -{LEVELS}..{LEVELS}")
    with np.errstate(over="ignore"):
        overflows = not np.isfinite(np.float32(LEVELS) * scales).all()
    if values.size and overflows:
        raise fail(Reason.NON_FINITE, "a q8 scale makes the dequantised values overflow float32")
    out_values: dict[str, np.ndarray] = {}
    out_scales: dict[str, np.float32] = {}
    offset = 0
    for i, (name, size) in enumerate(zip(names, sizes)):
        out_values[name] = values[offset : offset + size].reshape(tuple(expected[name]))
        out_scales[name] = np.float32(scales[i])
        offset += size
    return Quantised(values=out_values, scales=out_scales)
