"""Large models and sparse updates (fednca.wire_large): round trips, the bytes each layout costs,
and the refusal of every malformed layout with a stable reason (docs/wire.md)."""

from __future__ import annotations

import secrets

import numpy as np
import pytest
from nacl.public import PrivateKey, SealedBox
from nacl.signing import SigningKey

from fednca import wire_large as wl
from fednca.keys import Registry, key_id
from fednca.tensorcodec import format_fields, model_sha256, write_document
from fednca.wire import Reason, WireError, make_update
from fednca.wire_envelope import PREFIX, SEAL_BYTES, SIGNATURE_BYTES, UPDATE, make_prefix
from fednca.wire_update import UPDATE_FIELDS

SHAPES = {"up.weight": (3, 4), "down.bias": (5,)}  # 17 values; flat order: down.bias, then up.weight
N = 17
COORD_SIGN, COORD_BOX, SITE = SigningKey.generate(), PrivateKey.generate(), SigningKey.generate()
REGISTRY = Registry(sites={"site-a": SITE.verify_key})
BASE = "ab" * 32


def delta() -> dict[str, np.ndarray]:
    return {"up.weight": np.arange(12, dtype=np.float32).reshape(3, 4) * 0.25 - 1.0,
            "down.bias": np.array([3.0, -0.5, 0.0, 7.5, -9.0], np.float32)}


def update(uplink: wl.Uplink, d: dict | None = None, **kw) -> bytes:
    fields = dict(federation="fed", site="site-a", round=3, base_sha256=BASE, samples=16, steps=12, partial=False,
                  metrics={"loss": 0.5})
    fields.update(kw)
    return wl.make_large_update(**fields, delta=delta() if d is None else d, shapes=SHAPES, uplink=uplink,
                                signing_key=SITE, coordinator_box=COORD_BOX.public_key)


def open_(payload: bytes, **kw):
    args = dict(topic_site="site-a", coordinator_keys=COORD_BOX, registry=REGISTRY, federation="fed", round=3,
                base_sha256=BASE, shapes=SHAPES)
    args.update(kw)
    return wl.open_large_update(payload, **args)


def forged(arrays: dict[str, np.ndarray]) -> bytes:
    """An update with these wire tensors, honestly signed and sealed: only the layout is wrong."""
    fields = dict(federation="fed", site="site-a", round=3, base_sha256=BASE, update_id=secrets.token_hex(16),
                  site_key=key_id(SITE.verify_key), samples=16, steps=12, partial=False, metrics={})
    prefix = make_prefix(UPDATE, COORD_BOX.public_key)
    body = write_document(arrays, format_fields(fields, UPDATE_FIELDS, "update"))
    return prefix + SealedBox(COORD_BOX.public_key).encrypt(SITE.sign(prefix + body).signature + body)


def refusal(payload: bytes, **kw) -> WireError:
    with pytest.raises(WireError) as e:
        open_(payload, **kw)
    return e.value


ENVELOPE = PREFIX.size + SEAL_BYTES + SIGNATURE_BYTES


# ------------------------------------------------------------------------------- round trips


def test_a_dense_float32_update_comes_back_exactly():
    got = open_(update(wl.Uplink()))
    assert got.dtype == "float32" and got.header.site == "site-a" and got.header.samples == 16
    for name, value in delta().items():
        np.testing.assert_array_equal(got.delta[name], value)
        assert not got.delta[name].flags.writeable


def test_a_float16_update_costs_half_the_values_and_rounds_to_float16():
    full, half = update(wl.Uplink()), update(wl.Uplink(encoding="float16"))
    assert len(full) - len(half) == 2 * N
    got = open_(half)
    assert got.dtype == "float16"
    for name, value in delta().items():
        np.testing.assert_array_equal(got.delta[name], value.astype(np.float16).astype(np.float32))


def test_a_top_k_update_keeps_the_largest_magnitudes_and_zeroes_the_rest():
    got = open_(update(wl.Uplink(encoding="topk", fraction=0.2)))  # ceil(0.2 * 17) = 4 values
    assert got.dtype == "topk"
    np.testing.assert_array_equal(got.delta["down.bias"], [3.0, 0, 0, 7.5, -9.0])
    np.testing.assert_array_equal(got.delta["up.weight"], np.array([0] * 11 + [1.75], np.float32).reshape(3, 4))


def test_top_k_bytes_are_eight_per_kept_value_and_a_fixed_envelope():
    one, four = update(wl.Uplink(encoding="topk", fraction=0.01)), update(wl.Uplink(encoding="topk", fraction=0.2))
    assert len(four) - len(one) == 3 * 8  # three more positions (int32) and values (float32)
    dense = update(wl.Uplink())
    assert ENVELOPE + 4 * N < len(dense) < ENVELOPE + 4 * N + 1024


def test_top_k_of_everything_is_the_whole_delta():
    got = open_(update(wl.Uplink(encoding="topk", fraction=1.0)))
    for name, value in delta().items():
        np.testing.assert_array_equal(got.delta[name], value)


def test_the_flat_order_is_sorted_by_name_whatever_the_dict_order():
    flat = wl.flatten(delta(), SHAPES, "delta")
    np.testing.assert_array_equal(flat[:5], delta()["down.bias"])
    back = wl.unflatten(flat, SHAPES)
    np.testing.assert_array_equal(back["up.weight"], delta()["up.weight"])


def test_a_large_model_round_trips_with_its_sha256():
    payload = wl.make_large_model(federation="fed", round=4, tensors=delta(), shapes=SHAPES, signing_key=COORD_SIGN)
    assert len(payload) < PREFIX.size + SIGNATURE_BYTES + 4 * N + 1024
    got = wl.open_large_model(payload, coordinator_keys=COORD_SIGN.verify_key, federation="fed", shapes=SHAPES)
    assert got.round == 4 and got.model_sha256 == model_sha256(delta())
    np.testing.assert_array_equal(got.tensors["down.bias"], delta()["down.bias"])


# ---------------------------------------------------------------------------------- refusals


def test_the_size_limit_comes_first_from_the_model_shapes():
    payload = update(wl.Uplink()) + b"\0" * (wl.max_bytes(SHAPES))
    assert refusal(payload).reason is Reason.TOO_LARGE


def test_a_changed_byte_breaks_the_seal():
    payload = bytearray(update(wl.Uplink(encoding="topk", fraction=0.2)))
    payload[-3] ^= 1
    assert refusal(bytes(payload)).reason is Reason.BAD_SEAL


def test_an_update_signed_with_a_key_not_enrolled_is_refused():
    other = Registry(sites={"site-a": SigningKey.generate().verify_key})
    assert refusal(update(wl.Uplink()), registry=other).reason is Reason.WRONG_KEY


@pytest.mark.parametrize("kw, reason", [
    (dict(federation="other"), Reason.WRONG_FEDERATION),
    (dict(round=4), Reason.STALE_ROUND),
    (dict(base_sha256="cd" * 32), Reason.WRONG_BASE_MODEL),
])
def test_header_checks_carry_the_authenticated_header(kw, reason):
    err = refusal(update(wl.Uplink()), **kw)
    assert err.reason is reason and err.header is not None and err.header.site == "site-a"


I32, F32 = np.int32, np.float32


@pytest.mark.parametrize("arrays, reason", [
    ({"topk.index": np.array([0, 3, 2], I32), "topk.values": np.ones(3, F32)}, Reason.MALFORMED),  # not increasing
    ({"topk.index": np.array([1, 1], I32), "topk.values": np.ones(2, F32)}, Reason.MALFORMED),  # repeated
    ({"topk.index": np.array([0, 17], I32), "topk.values": np.ones(2, F32)}, Reason.MALFORMED),  # past the end
    ({"topk.index": np.array([-1, 2], I32), "topk.values": np.ones(2, F32)}, Reason.MALFORMED),  # negative
    ({"topk.index": np.array([0, 2], I32), "topk.values": np.ones(3, F32)}, Reason.BAD_SHAPE),  # lengths differ
    ({"topk.index": np.arange(18, dtype=I32), "topk.values": np.ones(18, F32)}, Reason.BAD_SHAPE),  # more than N
    ({"topk.index": np.array([0, 2], np.int8), "topk.values": np.ones(2, F32)}, Reason.BAD_DTYPE),
    ({"topk.index": np.array([0, 2], I32), "topk.values": np.array([1, 2], np.int8)}, Reason.BAD_DTYPE),
    ({"topk.index": np.array([0, 2], I32), "topk.values": np.array([1, np.nan], F32)}, Reason.NON_FINITE),
    ({"topk.index": np.array([[0, 2]], I32), "topk.values": np.ones(2, F32)}, Reason.BAD_SHAPE),
    ({"topk.index": np.array([0, 2], I32)}, Reason.BAD_SHAPE),
    ({"flat.values": np.ones(16, F32)}, Reason.BAD_SHAPE),
    ({"flat.values": np.ones(17, np.int32)}, Reason.BAD_DTYPE),
    ({"flat.values": np.full(17, np.inf, F32)}, Reason.NON_FINITE),
    ({"flat.values": np.ones(17, F32), "extra": np.ones(1, F32)}, Reason.BAD_SHAPE),
    ({"up.weight": np.ones((3, 4), F32), "down.bias": np.ones(5, F32)}, Reason.BAD_SHAPE),  # the NCA's layout
])
def test_malformed_layouts_are_refused_with_a_stable_reason(arrays, reason):
    err = refusal(forged(arrays))
    assert err.reason is reason and err.header is not None


def test_a_well_formed_forged_layout_opens():
    got = open_(forged({"topk.index": np.array([0, 16], I32), "topk.values": np.array([2, -3], F32)}))
    assert got.delta["down.bias"][0] == 2 and got.delta["up.weight"][2, 3] == -3


def test_float16_that_would_overflow_is_refused_at_the_sender():
    big = delta()
    big["down.bias"][0] = 1e6
    with pytest.raises(WireError) as e:
        update(wl.Uplink(encoding="float16"), big)
    assert e.value.reason is Reason.NON_FINITE


def test_the_nca_parser_refuses_a_large_update_and_the_large_parser_an_nca_update():
    from fednca.wire import open_update

    with pytest.raises(WireError) as e:
        open_update(update(wl.Uplink(encoding="topk", fraction=0.2)), topic_site="site-a", coordinator_keys=COORD_BOX,
                    registry=REGISTRY, federation="fed", round=3, base_sha256=BASE, shapes=SHAPES)
    assert e.value.reason in (Reason.BAD_SHAPE, Reason.BAD_DTYPE)
    nca = make_update(federation="fed", site="site-a", round=3, base_sha256=BASE, samples=1, steps=1, partial=False,
                      metrics={}, delta=delta(), signing_key=SITE, coordinator_box=COORD_BOX.public_key)
    assert refusal(nca).reason is Reason.BAD_SHAPE


def test_a_model_whose_values_miss_the_signed_sha256_is_refused():
    fields = {"federation": "fed", "round": 4, "model_sha256": "00" * 32}
    prefix = make_prefix(b"M", COORD_SIGN.verify_key)
    body = write_document({"flat.values": np.zeros(N, F32)}, format_fields(fields, wl.MODEL_FIELDS, "large model"))
    payload = prefix + COORD_SIGN.sign(prefix + body).signature + body
    with pytest.raises(WireError) as e:
        wl.open_large_model(payload, coordinator_keys=COORD_SIGN.verify_key, federation="fed", shapes=SHAPES)
    assert e.value.reason is Reason.MALFORMED


def test_a_model_signed_by_another_key_is_refused():
    payload = wl.make_large_model(federation="fed", round=4, tensors=delta(), shapes=SHAPES,
                                  signing_key=SigningKey.generate())
    with pytest.raises(WireError) as e:
        wl.open_large_model(payload, coordinator_keys=COORD_SIGN.verify_key, federation="fed", shapes=SHAPES)
    assert e.value.reason is Reason.WRONG_KEY


def test_an_uplink_is_validated():
    with pytest.raises(ValueError):
        wl.Uplink(encoding="topk", fraction=0.0)
    with pytest.raises(ValueError):
        wl.Uplink(encoding="q4")
    assert wl.Uplink(encoding="topk", fraction=0.01).label == "top1%"
