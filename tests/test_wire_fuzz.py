"""Property-based fuzzing of the wire parser: only WireError ever escapes, and valid input still opens.

Each property runs a fixed, derandomized set of examples so CI sees the same inputs every time.
"""

import json
import struct

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save

from fednca.tensorcodec import Document, read_document
from fednca.wire import UPDATE_FIELDS, Announcement, Reason, Receipt, Update, WireError
from test_wire_tamper import (COORD, GLOBAL, SHAPES, SITE_A, delta, forge_signed, forge_update, make_announcement,
                              make_receipt, make_update, open_announcement, open_receipt, open_update,
                              update_metadata)


def fuzz(examples: int):
    return settings(max_examples=examples, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


MESSAGES = {"update": make_update(), "announcement": make_announcement(), "receipt": make_receipt()}
OPENERS = {"update": open_update, "announcement": open_announcement, "receipt": open_receipt}
RESULTS = {"update": Update, "announcement": Announcement, "receipt": Receipt}


def attempt(call, *args, **kwargs):
    """The call's result or its WireError; any other exception fails the property."""
    try:
        return call(*args, **kwargs)
    except WireError as e:
        assert isinstance(e.reason, Reason)
        return e


def refused(call, *args, **kwargs) -> WireError:
    result = attempt(call, *args, **kwargs)
    assert isinstance(result, WireError), f"accepted: {result!r}"
    return result


def assert_valid_still_opens(kind: str) -> None:
    assert isinstance(OPENERS[kind](MESSAGES[kind]), RESULTS[kind])


kinds = st.sampled_from(sorted(MESSAGES))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@fuzz(800)
@given(kind=kinds, lead=st.sampled_from(["none", "magic", "prefix"]),
       tail=st.one_of(st.binary(max_size=80), st.binary(min_size=80, max_size=1500)))
def test_random_bytes_are_refused(kind, lead, tail):
    # With the message's own 16-byte prefix the bytes reach the seal or the signature check.
    head = {"none": b"", "magic": MESSAGES[kind][:6], "prefix": MESSAGES[kind][:16]}[lead]
    refused(OPENERS[kind], head + tail)


@fuzz(600)
@given(kind=kinds, data=st.data())
def test_truncated_messages_are_refused(kind, data):
    message = MESSAGES[kind]
    cut = data.draw(st.integers(0, len(message) - 1))
    refused(OPENERS[kind], message[:cut])
    assert_valid_still_opens(kind)


@fuzz(800)
@given(kind=kinds, data=st.data())
def test_bit_flips_are_refused(kind, data):
    message = bytearray(MESSAGES[kind])
    position, bit = data.draw(st.integers(0, len(message) - 1)), data.draw(st.integers(0, 7))
    message[position] ^= 1 << bit
    refused(OPENERS[kind], bytes(message))
    message[position] ^= 1 << bit
    assert isinstance(OPENERS[kind](bytes(message)), RESULTS[kind])


VALID_DOCUMENT = save(delta(), metadata=update_metadata())


def _check_document(result) -> None:
    assert isinstance(result, (Document, WireError))
    if isinstance(result, Document):
        assert sum(e.end - e.begin for e in result.entries) == len(result.data)
        for entry in result.entries:
            result.array(entry)


@fuzz(600)
@given(length=st.one_of(st.integers(0, 4096), st.integers(0, 2**64 - 1)), rest=st.binary(max_size=600))
def test_document_reader_takes_any_bytes(length, rest):
    _check_document(attempt(read_document, struct.pack("<Q", length) + rest))


@fuzz(800)
@given(edits=st.lists(st.tuples(st.integers(0, len(VALID_DOCUMENT) - 1), st.integers(0, 255)), min_size=1,
                      max_size=4), cut=st.one_of(st.none(), st.integers(0, len(VALID_DOCUMENT))))
def test_document_reader_takes_edited_documents(edits, cut):
    document = bytearray(VALID_DOCUMENT)
    for position, value in edits:
        document[position] = value
    _check_document(attempt(read_document, bytes(document[:cut])))
    assert isinstance(read_document(VALID_DOCUMENT), Document)


def _hostile_entry():
    dims = st.one_of(st.integers(0, 8), st.integers(-2, 2**70), st.booleans(), st.floats(), st.text(max_size=3))
    offsets = st.lists(st.one_of(st.integers(-1, 64), st.integers(0, 2**66), st.floats()), max_size=3)
    return st.fixed_dictionaries(
        {"dtype": st.sampled_from(["F16", "F32", "F64", "I32", "BOOL", "f16", ""]),
         "shape": st.lists(dims, max_size=9), "data_offsets": offsets},
        optional={"extra": json_values},
    )


@fuzz(250)
@given(entries=st.dictionaries(st.sampled_from(["b", "w", "x", "__x", "a/b", ""]), _hostile_entry(), max_size=3),
       data=st.binary(max_size=64), pad=st.integers(0, 9))
def test_signed_documents_with_hostile_tensor_tables(entries, data, pad):
    header = json.dumps({"__metadata__": update_metadata(), **entries}).encode() + b" " * pad
    body = struct.pack("<Q", len(header)) + header + data
    result = attempt(open_update, forge_update(body, signer=SITE_A.signing))
    if isinstance(result, Update):  # only an honest table over the right bytes gets through
        assert {n: v.shape for n, v in result.delta.items()} == SHAPES


@fuzz(600)
@given(data=st.data(), field=st.sampled_from(sorted(update_metadata()) + ["unknown"]))
def test_signed_updates_with_wrongly_typed_metadata(data, field):
    meta: dict = update_metadata()
    original = dict(meta)
    choice = data.draw(st.sampled_from(["text", "json", "number", "drop", "raw"]))
    if choice == "text":
        meta[field] = data.draw(st.text(max_size=70))
    elif choice == "json":
        meta[field] = json.dumps(data.draw(json_values))
    elif choice == "number":
        meta[field] = str(data.draw(st.one_of(st.integers(), st.floats())))
    elif choice == "drop":
        meta.pop(field, None)
    else:  # not even a string: written by hand, as safetensors refuses to
        meta[field] = data.draw(json_values)
    header = json.dumps({"__metadata__": meta, "b": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
                         "w": {"dtype": "F16", "shape": [2, 3], "data_offsets": [6, 18]}}).encode()
    header += b" " * (-len(header) % 8)
    tensors = delta()
    body = struct.pack("<Q", len(header)) + header + tensors["b"].tobytes() + tensors["w"].tobytes()
    result = attempt(open_update, forge_update(body, signer=SITE_A.signing))
    if meta == original:
        assert isinstance(result, Update)
    elif isinstance(result, Update):  # a value that happens to be valid must read back as sent
        assert field != "unknown" and choice in ("text", "json", "number")
        assert getattr(result.header, field) == UPDATE_FIELDS[field].parse(meta[field])
    else:
        assert result.reason in (Reason.MALFORMED, Reason.SITE_MISMATCH, Reason.WRONG_FEDERATION,
                                 Reason.STALE_ROUND, Reason.WRONG_BASE_MODEL)


@fuzz(300)
@given(dtype=st.sampled_from([np.float16, np.float32]), name=st.sampled_from(["b", "w"]), data=st.data(),
       value=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_nan_and_infinity_anywhere_are_refused(dtype, name, data, value):
    tensors = delta(dtype)
    index = data.draw(st.integers(0, tensors[name].size - 1))
    tensors[name].reshape(-1)[index] = value
    err = refused(open_update, forge_update(save(tensors, metadata=update_metadata()), signer=SITE_A.signing))
    assert err.reason is Reason.NON_FINITE and name in str(err) and err.header.site == "clinic-a"


@fuzz(300)
@given(shapes=st.dictionaries(st.sampled_from(["b", "w", "v"]), st.lists(st.integers(0, 4), max_size=3),
                              min_size=1, max_size=3))
def test_wrong_shapes_are_refused(shapes):
    tensors = {n: np.zeros(s, np.float16) for n, s in shapes.items()}
    result = attempt(open_update, forge_update(save(tensors, metadata=update_metadata()), signer=SITE_A.signing))
    if {n: tuple(s) for n, s in shapes.items()} == SHAPES:
        assert isinstance(result, Update)
    else:
        assert isinstance(result, WireError) and result.reason is Reason.BAD_SHAPE


_ANNOUNCEMENT_META = {"federation": "liver-us", "round": "7", "deadline": "1", "quorum": "1",
                      "train": '{"lr":0.001}', "model": '{"preset":"fednca"}'}


@fuzz(300)
@given(field=st.sampled_from(["train", "model"]), value=json_values,
       shape_source=st.sampled_from(["given", "configuration"]))
def test_announced_configurations_of_any_shape(field, value, shape_source):
    from fednca.wire import model_sha256

    meta = {**_ANNOUNCEMENT_META, field: json.dumps(value), "model_sha256": model_sha256(GLOBAL)}
    payload = forge_signed(save(GLOBAL, metadata=meta), kind=b"A", signer=COORD.signing)
    shapes = SHAPES if shape_source == "given" else None
    result = attempt(open_announcement, payload, shapes=shapes)
    assert isinstance(result, (Announcement, WireError))
    if isinstance(result, WireError):
        assert result.reason in (Reason.MALFORMED, Reason.BAD_SHAPE)
    assert_valid_still_opens("announcement")
