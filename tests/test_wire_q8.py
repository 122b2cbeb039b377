"""8-bit deltas: the quantiser's error bounds and error feedback, and the strict reading of q8
updates and delta announcements (docs/wire.md)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from nacl.public import PrivateKey
from nacl.signing import SigningKey

from fednca import quantise as qz
from fednca import wire_q8
from fednca.config import ModelConfig, preset, tensor_shapes, train_preset
from fednca.keys import Registry
from fednca.tensorcodec import read_document, write_document
from fednca.wire import (
    Reason, WireError, make_announcement, make_update, model_sha256, open_announcement, open_update, verify_update,
)
from fednca.wire_envelope import PREFIX, SIGNATURE_BYTES

MODEL = preset(input_size=16, steps=(3, 2), hidden=16)
SHAPES = tensor_shapes(MODEL)
COORD_SIGN, COORD_BOX, SITE = SigningKey.generate(), PrivateKey.generate(), SigningKey.generate()
REGISTRY = Registry(sites={"site-a": SITE.verify_key})


def weights(seed: int, scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}


# ------------------------------------------------------------------------------------ quantiser


def test_each_value_is_within_half_a_step_and_the_peak_is_exact():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float32) * 3
    q, s = qz.quantise(x)
    assert q.dtype == np.int8 and q.min() >= -127 and q.max() <= 127
    assert s == np.float32(np.abs(x).max() / 127)
    err = np.abs(qz.dequantise(q, s) - x)
    assert err.max() <= s / 2 * 1.0001
    assert np.abs(qz.dequantise(q, s)).max() == pytest.approx(np.abs(x).max(), rel=1e-6)


def test_an_all_zero_tensor_has_scale_zero():
    q, s = qz.quantise(np.zeros((3, 4), np.float32))
    assert s == 0 and not q.any() and q.shape == (3, 4)


def test_error_feedback_keeps_the_sum_sent_within_one_round_of_the_true_sum():
    rng = np.random.default_rng(2)
    residual = None
    true_sum = np.zeros(500, np.float32)
    sent_sum = np.zeros(500, np.float32)
    plain_sum = np.zeros(500, np.float32)
    for _ in range(200):
        # a small steady drift under large noise: what plain rounding loses every round
        delta = {"w": (rng.standard_normal(500) * 1.0 + 0.002).astype(np.float32)}
        sent, residual = qz.quantise_with_feedback(delta, residual)
        true_sum += delta["w"]
        sent_sum += sent.dequantised()["w"]
        q, s = qz.quantise(delta["w"])
        plain_sum += qz.dequantise(q, s)
    step = max(float(s) for s in [sent.scales["w"]])
    # with feedback the gap is exactly the last residual: at most half a step
    assert np.abs(true_sum - sent_sum).max() <= step / 2 * 1.01 + 1e-4
    np.testing.assert_allclose(true_sum - sent_sum, residual["w"], atol=1e-3)
    # without it the rounding errors add up (a random walk over 200 rounds)
    assert np.abs(true_sum - plain_sum).max() > 4 * np.abs(true_sum - sent_sum).max()


def test_a_residual_of_another_model_is_dropped():
    sent, left = qz.quantise_with_feedback({"a": np.ones(3, np.float32)}, {"b": np.ones(3, np.float32)})
    np.testing.assert_allclose(sent.dequantised()["a"], 1.0)


def bits(values) -> list[int]:
    return np.asarray(values, np.float32).view(np.uint32).tolist()


def test_apply_is_one_float32_definition():
    """``base + q * s``, each step rounded to float32, checked bit for bit against values worked
    out by hand (what both sides must agree on to rebuild the coordinator's model)."""
    # exact: q * s = [1.0, -2.0], so [1.0, 2.0] + that = [2.0, 0.0]
    got = qz.apply({"w": [1.0, 2.0]}, {"w": qz.dequantise(np.array([2, -4], np.int8), 0.5)})
    assert got["w"].dtype == np.float32 and bits(got["w"]) == [0x40000000, 0x00000000]
    # rounded: 1 + 2**-24 is half a float32 step above 1, a tie that goes to the even 1.0; 1 + 3 * 2**-24
    # is one and a half steps, a tie that goes to the even 1 + 2**-22 (0x3F800002); below 1 the steps
    # are half as large, so 1 - 2**-24 is exact (0x3F7FFFFF).
    step = np.float32(2.0**-24)
    delta = qz.dequantise(np.array([1, 3, -1], np.int8), step)
    assert bits(delta) == [0x33800000, 0x34400000, 0xB3800000]
    got = qz.apply({"w": np.ones(3, np.float32)}, {"w": delta})
    assert got["w"].dtype == np.float32 and bits(got["w"]) == [0x3F800000, 0x3F800002, 0x3F7FFFFF]


# ----------------------------------------------------------------------------------- q8 updates


def update(delta, **kw) -> bytes:
    fields = dict(federation="fed", site="site-a", round=1, base_sha256="a" * 64, samples=8, steps=4,
                  partial=False, metrics={}, signing_key=SITE, coordinator_box=COORD_BOX.public_key, dtype="q8")
    fields.update(kw)
    return make_update(delta=delta, **fields)


def opened(payload: bytes):
    return open_update(payload, topic_site="site-a", coordinator_keys=COORD_BOX, registry=REGISTRY,
                       federation="fed", round=1, base_sha256="a" * 64, shapes=SHAPES)


def test_the_flat_layout_saves_about_an_eighth_of_a_q8_update_of_the_default_model():
    """The figure docs/wire.md and fednca/wire_q8.py quote, from real lengths."""
    shapes = tensor_shapes(ModelConfig())
    delta = {k: np.full(s, 0.01, np.float32) for k, s in shapes.items()}
    sent, _ = qz.quantise_with_feedback(delta, None)
    flat = write_document(wire_q8.pack(sent), {})
    one_each = write_document({k: sent.values[k] for k in shapes}, {})  # scales not even counted

    def table(doc: bytes) -> int:
        return struct.unpack("<Q", doc[:8])[0]

    assert len(shapes) == 14 and table(one_each) == 1120 and table(flat) == 152
    message = len(update(delta))  # docs/wire.md measures 7,918 with bench/bench_wire.py's fields
    assert 7800 < message < 8000
    assert round(message / (table(one_each) - table(flat))) == 8



def test_a_q8_update_opens_as_float32_within_half_a_step_and_is_about_a_quarter_of_float32():
    delta = weights(5, scale=0.01)
    payload = update(delta)
    got = opened(payload)
    assert got.dtype == "q8"
    for k, v in delta.items():
        assert got.delta[k].dtype == np.float32 and not got.delta[k].flags.writeable
        assert np.abs(got.delta[k] - v).max() <= np.abs(v).max() / 254 * 1.001
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    f32 = update(delta, dtype="float32")
    assert len(payload) < params + 1100 < len(f32) / 3


def test_a_site_residual_goes_into_the_update():
    delta = weights(6, scale=0.01)
    sent, left = qz.quantise_with_feedback(delta, {k: np.full(v.shape, 0.5, np.float32) for k, v in delta.items()})
    got = opened(update(sent))
    for k in delta:
        np.testing.assert_allclose(got.delta[k] + left[k], delta[k] + 0.5, atol=1e-6)


def _resealed(payload: bytes, change) -> bytes:
    """The update's document changed by ``change(tensors, metadata)``, signed and sealed again."""
    from nacl.public import SealedBox

    verified = verify_update(payload, topic_site="site-a", coordinator_keys=COORD_BOX, registry=REGISTRY)
    doc = verified.document
    tensors = {e.name: np.array(doc.array(e)) for e in doc.entries}
    metadata = dict(doc.metadata)
    tensors = change(tensors, metadata) or tensors
    prefix = payload[: PREFIX.size]
    body = write_document(tensors, metadata)
    return prefix + SealedBox(COORD_BOX.public_key).encrypt(SITE.sign(prefix + body).signature + body)


@pytest.mark.parametrize("change, reason", [
    (lambda t, m: t.update({"q8.values": np.concatenate([t["q8.values"], np.zeros(1, np.int8)])}), Reason.BAD_SHAPE),
    (lambda t, m: t.update({"q8.scales": t["q8.scales"][:-1]}), Reason.BAD_SHAPE),
    (lambda t, m: t.update({"q8.scales": t["q8.scales"].astype(np.float16)}), Reason.BAD_DTYPE),
    (lambda t, m: t.update({"q8.values": t["q8.values"].astype(np.float32)}), Reason.BAD_DTYPE),
    (lambda t, m: t["q8.scales"].__setitem__(0, np.nan), Reason.NON_FINITE),
    (lambda t, m: t["q8.scales"].__setitem__(0, -1.0), Reason.NON_FINITE),
    (lambda t, m: t["q8.scales"].__setitem__(0, 3e38), Reason.NON_FINITE),
    (lambda t, m: t["q8.values"].__setitem__(0, -128), Reason.MALFORMED),
    (lambda t, m: t.update({"q8.extra": np.zeros(1, np.int8)}), Reason.BAD_SHAPE),
    (lambda t, m: {k: v for k, v in t.items() if k != "q8.scales"}, Reason.BAD_SHAPE),
])
def test_malformed_q8_updates_are_refused_with_a_typed_reason(change, reason):
    bad = _resealed(update(weights(7, scale=0.01)), change)
    with pytest.raises(WireError) as e:
        opened(bad)
    assert e.value.reason == reason and e.value.header is not None


def test_int8_tensors_are_refused_where_model_values_are_expected():
    doc = write_document({k: np.zeros(s, np.int8) for k, s in SHAPES.items()}, {})
    assert {e.dtype for e in read_document(doc).entries} == {"I8"}
    bad = _resealed(update(weights(8), dtype="float16"),
                    lambda t, m: {k: np.zeros(v.shape, np.int8) for k, v in t.items()})
    with pytest.raises(WireError) as e:
        opened(bad)
    assert e.value.reason == Reason.BAD_DTYPE


def test_a_document_with_an_unknown_dtype_is_still_refused():
    header = json.dumps({"x": {"dtype": "I16", "shape": [1], "data_offsets": [0, 2]}}).encode()
    header += b" " * (-len(header) % 8)
    with pytest.raises(WireError) as e:
        read_document(struct.pack("<Q", len(header)) + header + b"\0\0")
    assert e.value.reason == Reason.BAD_DTYPE


# ------------------------------------------------------------------------- delta announcements


def announce(model, *, base=None, delta=None, round=2, update_dtype=None) -> bytes:
    return make_announcement(federation="fed", round=round, deadline=10**9, quorum=1, train=train_preset(),
                             model=MODEL, tensors=model, signing_key=COORD_SIGN, seconds_left=60,
                             delta=None if delta is None else (model_sha256(base), delta),
                             update_dtype=update_dtype)


def read(payload: bytes, held=()):
    return open_announcement(payload, coordinator_verify_key=COORD_SIGN.verify_key, federation="fed", held=held)


def delta_round(seed: int = 9):
    base = weights(seed)
    sent, _ = qz.quantise_with_feedback({k: v * 0.01 for k, v in weights(seed + 1).items()}, None)
    new = qz.apply(base, sent.dequantised())
    return base, sent, new


def test_a_delta_announcement_rebuilds_the_model_bit_for_bit_and_is_a_quarter_of_the_whole():
    base, sent, new = delta_round()
    payload = announce(new, base=base, delta=sent, update_dtype="q8")
    ann = read(payload, held=[weights(99), base])
    assert ann.header.base_sha256 == model_sha256(base) and ann.header.update_dtype == "q8"
    assert model_sha256(ann.tensors) == model_sha256(new)
    for k in new:
        np.testing.assert_array_equal(ann.tensors[k], new[k])
    whole = announce(new)
    assert read(whole).header.base_sha256 is None
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    assert len(payload) - params < len(whole) - 4 * params + 200  # only the tensors shrink


def test_a_receiver_already_holding_the_new_model_takes_it_without_the_base():
    base, sent, new = delta_round()
    ann = read(announce(new, base=base, delta=sent), held=[new])
    assert model_sha256(ann.tensors) == model_sha256(new)


def test_a_receiver_without_the_base_is_told_wrong_base_model():
    base, sent, new = delta_round()
    payload = announce(new, base=base, delta=sent)
    for held in ([], [weights(42)]):
        with pytest.raises(WireError) as e:
            read(payload, held=held)
        assert e.value.reason == Reason.WRONG_BASE_MODEL and e.value.header.round == 2


def test_a_delta_that_does_not_give_the_signed_model_is_refused_and_the_whole_model_is_needed():
    base, sent, new = delta_round()
    other = qz.apply(base, {k: v * 2 for k, v in sent.dequantised().items()})
    # signed by the coordinator, but the announced sha256 is not what base + delta gives here:
    # refused, and told as wrong_base_model so that the receiver fetches the whole model
    payload = announce(other, base=base, delta=sent)
    with pytest.raises(WireError) as e:
        read(payload, held=[base])
    assert e.value.reason == Reason.WRONG_BASE_MODEL and "model_sha256" in str(e.value)
    assert e.value.header.round == 2
    # the whole model is still opened with every check: it must give its signed sha256
    assert model_sha256(read(announce(other)).tensors) == model_sha256(other)


def test_a_delta_announcement_must_carry_q8_tensors():
    base, _, new = delta_round()
    payload = make_announcement(federation="fed", round=2, deadline=10**9, quorum=1, train=train_preset(),
                                model=MODEL, tensors=new, signing_key=COORD_SIGN)
    doc = read_document(memoryview(payload)[PREFIX.size + SIGNATURE_BYTES:])
    meta = dict(doc.metadata, base_sha256=model_sha256(base))
    body = write_document({e.name: np.array(doc.array(e)) for e in doc.entries}, meta)
    prefix = payload[: PREFIX.size]
    forged = prefix + COORD_SIGN.sign(prefix + body).signature + body
    with pytest.raises(WireError) as e:
        read(forged, held=[base])
    assert e.value.reason == Reason.BAD_DTYPE


def test_unknown_update_dtypes_in_an_announcement_are_malformed():
    _, _, new = delta_round()
    with pytest.raises(WireError) as e:
        announce(new, update_dtype="int4")
    assert e.value.reason == Reason.MALFORMED


def test_pack_and_unpack_round_trip():
    sent, _ = qz.quantise_with_feedback(weights(11), None)
    doc = read_document(write_document(wire_q8.pack(sent), {}))
    assert wire_q8.is_q8(doc)
    back = wire_q8.unpack(doc, SHAPES, lambda r, w: WireError(r, w))
    for k in SHAPES:
        np.testing.assert_array_equal(back.values[k], sent.values[k])
        assert back.scales[k] == sent.scales[k]
