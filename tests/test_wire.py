import hashlib
import json
import struct

import numpy as np
import pytest
from nacl.public import SealedBox
from safetensors import safe_open
from safetensors.numpy import load, save

from fednca import wire
from fednca_app.cli import main
from fednca_app.commands.wire import ANNOUNCEMENT_BUDGET, UPDATE_BUDGET, sizes
from fednca.config import ModelConfig, TrainConfig
from fednca.tensorcodec import read_document, write_document
from fednca.wire import Reason, WireError
from fednca.model import build, tensor_shapes, tensors
from test_wire_tamper import (BASE, COORD, FED, GLOBAL, REGISTRY, ROUND, SHAPES, SITE_A, UPDATE_ID, delta, kid,
                              make_announcement, make_receipt, make_update, open_announcement, open_receipt,
                              open_update, refusal)


# ------------------------------------------------------------------------------------ round trips


def test_announcement_round_trip():
    ann = open_announcement(make_announcement(quorum=3, train=TrainConfig(lr=0.002)))
    h = ann.header
    assert (h.federation, h.round, h.deadline, h.quorum, h.version) == (FED, ROUND, 1_900_000_000, 3, 1)
    assert h.train == TrainConfig(lr=0.002) and h.model == ModelConfig()
    assert h.key_id == kid(COORD.signing.verify_key).hex()
    assert h.model_sha256 == wire.model_sha256(GLOBAL)
    for name, value in GLOBAL.items():
        assert ann.tensors[name].dtype == np.float32
        np.testing.assert_array_equal(ann.tensors[name], value)
        assert not ann.tensors[name].flags.writeable


def test_announcement_of_the_default_model_takes_shapes_from_its_configuration():
    weights = {n: t.numpy() for n, t in tensors(build(ModelConfig(), seed=3)).items()}
    payload = make_announcement(tensors=weights)
    ann = wire.open_announcement(payload, coordinator_verify_key=[COORD.signing.verify_key], federation=FED)
    assert ann.tensors.keys() == weights.keys()
    assert ann.header.model_sha256 == wire.model_sha256(weights)
    assert refusal(open_announcement, payload).reason is Reason.BAD_SHAPE  # the tiny test shapes


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_update_round_trip(dtype):
    sent = {"b": np.array([0.1, -2.5e-4, 3.0], np.float32), "w": np.linspace(-0.01, 0.01, 6, dtype=np.float32).reshape(2, 3)}
    payload = make_update(delta=sent, dtype=dtype, partial=True, metrics={"loss": 0.123456789, "dice": 1})
    update = open_update(payload)
    h = update.header
    assert (h.federation, h.site, h.round, h.base_sha256, h.update_id) == (FED, "clinic-a", ROUND, BASE, UPDATE_ID)
    assert (h.samples, h.steps, h.partial, h.version) == (40, 12, True, 1)
    assert h.site_key == SITE_A.key_id and h.coordinator_key == kid(COORD.box.public_key).hex()
    assert h.metrics == {"dice": 1.0, "loss": 0.1234568}  # 7 significant digits
    assert update.dtype == dtype
    for name, value in sent.items():
        assert update.delta[name].dtype == np.float32
        np.testing.assert_array_equal(update.delta[name], value.astype(dtype).astype(np.float32))


def test_update_ids_are_random_unless_given():
    first, second = (open_update(make_update(update_id=None)).header.update_id for _ in range(2))
    assert first != second and len(first) == 32


@pytest.mark.parametrize("reason", [None, Reason.STALE_ROUND, "duplicate_site"])
def test_receipt_round_trip(reason):
    receipt = open_receipt(make_receipt(reason=reason))
    assert receipt.accepted is (reason is None)
    assert receipt.reason == ("" if reason is None else str(reason))
    assert (receipt.federation, receipt.site, receipt.round, receipt.update_id) == (FED, "clinic-a", ROUND, UPDATE_ID)
    assert receipt.key_id == kid(COORD.signing.verify_key).hex()


def test_two_phase_open_gives_the_authenticated_header_before_the_round_checks():
    verified = wire.verify_update(make_update(round=ROUND + 1), topic_site="clinic-a",
                                  coordinator_keys=COORD.box, registry=REGISTRY)
    assert verified.header.round == ROUND + 1
    checks = dict(federation=FED, round=ROUND, base_sha256=BASE, shapes=SHAPES)
    assert refusal(wire.check_update, verified, **checks).reason is Reason.STALE_ROUND
    err = refusal(wire.check_update, verified, **{**checks, "round": ROUND + 1, "base_sha256": "cd" * 32})
    assert err.reason is Reason.WRONG_BASE_MODEL and err.header.update_id == UPDATE_ID
    assert wire.check_update(verified, **{**checks, "round": ROUND + 1}).header.round == ROUND + 1
    # A round policy that judges round and base model itself checks only federation and tensors.
    assert wire.check_update(verified, **{**checks, "round": None, "base_sha256": None}).delta.keys() == SHAPES.keys()


# ------------------------------------------------------------------------------ refusals, simple


def test_size_limit_comes_before_anything_else():
    assert refusal(open_update, b"\x00" * 2000, max_bytes=1000).reason is Reason.TOO_LARGE
    assert refusal(open_announcement, make_announcement(), max_bytes=100).reason is Reason.TOO_LARGE
    assert refusal(open_receipt, make_receipt(), max_bytes=100).reason is Reason.TOO_LARGE


@pytest.mark.parametrize("maker, opener", [(make_update, open_update), (make_announcement, open_announcement),
                                           (make_receipt, open_receipt)])
def test_prefix_checks(maker, opener):
    payload = maker()
    assert refusal(opener, payload[:4] + b"\x02" + payload[5:]).reason is Reason.BAD_VERSION
    assert refusal(opener, b"FNCB" + payload[4:]).reason is Reason.MALFORMED
    assert refusal(opener, payload[:6] + b"\x01\x00" + payload[8:]).reason is Reason.MALFORMED
    assert refusal(opener, payload[:15]).reason is Reason.MALFORMED


def test_encoder_refuses_what_a_receiver_would_refuse():
    assert refusal(make_update, delta={"b": np.array([np.nan, 0, 0], np.float32)}).reason is Reason.NON_FINITE
    big = {"b": np.array([1e5, 0, 0], np.float32), "w": np.zeros((2, 3), np.float32)}
    assert "send float32" in str(refusal(make_update, delta=big))
    assert open_update(make_update(delta=big, dtype="float32")).delta["b"][0] == 1e5
    assert "site" in str(refusal(make_update, site="Clinic/A"))
    assert "metrics" in str(refusal(make_update, metrics={f"m{i}": 1.0 for i in range(5)}))
    assert "samples" in str(refusal(make_update, samples=True))
    assert "train" in str(refusal(make_announcement, train={"lr": 0.1}))
    with pytest.raises(ValueError, match="dtype"):
        make_update(dtype="bfloat16")


def test_reason_codes_are_stable():
    assert [r.value for r in Reason] == [
        "too_large", "bad_version", "malformed", "wrong_key", "bad_seal", "bad_signature", "unknown_site",
        "site_mismatch", "wrong_federation", "stale_round", "wrong_base_model", "bad_dtype", "bad_shape",
        "non_finite"]
    err = refusal(open_update, make_update(round=1))
    assert str(err).startswith("stale_round: ") and isinstance(err, WireError)


# --------------------------------------------------------------------------------- known answers


def test_prefix_layout():
    announcement, update, receipt = make_announcement(), make_update(), make_receipt()
    coordinator_id, box_id = kid(COORD.signing.verify_key), kid(COORD.box.public_key)
    assert announcement[:16] == b"FNCA\x01A\x00\x00" + coordinator_id
    assert receipt[:16] == b"FNCA\x01R\x00\x00" + coordinator_id
    assert update[:16] == b"FNCA\x01U\x00\x00" + box_id
    assert announcement[:16].hex() == "464e43410141000034750f98bd59fcfc"
    # The signature covers prefix || document.
    COORD.signing.verify_key.verify(announcement[:16] + announcement[80:], announcement[16:80])
    plain = SealedBox(COORD.box).decrypt(update[16:])
    SITE_A.verify_key.verify(update[:16] + plain[64:], plain[:64])
    assert len(update) == 16 + 48 + len(plain)


def test_known_answer_messages():
    # Ed25519 is deterministic and documents are canonical: these bytes never change.
    assert hashlib.sha256(make_announcement()).hexdigest() == (
        "ade3aebed3ea0bec90d204645e2facf3c456d96c50ca39bc13f69b50312f3755")
    plain = SealedBox(COORD.box).decrypt(make_update()[16:])
    assert hashlib.sha256(plain).hexdigest() == "9171fbefa16993e1639869ca53f57a8505e52d75972cc412708c6c3ca8e3f0bc"
    body = make_receipt(reason="stale_round")[80:]
    assert body == struct.pack("<Q", 168) + (
        b'{"__metadata__":{"federation":"liver-us","reason":"stale_round","round":"7","site":"clinic-a",'
        b'"update_id":"0123456789abcdef0123456789abcdef","verdict":"rejected"}}     ')


def test_model_sha256_known_answer_and_definition():
    scalar = {"x": np.array(1.5, np.float32)}
    by_hand = hashlib.sha256(b"fednca-model/1\n" + struct.pack("<I", 1) + b"x" + struct.pack("<I", 0)
                             + struct.pack("<f", 1.5)).hexdigest()
    assert wire.model_sha256(scalar) == by_hand == "256b483b16252b1a825cbdb79183d10e21b024ae741081214749505d5ec54cc6"
    assert wire.model_sha256({"x": np.array([1.5], np.float32)}) != by_hand  # the shape counts
    assert wire.model_sha256(GLOBAL) == "e0fff5b84182a95eae243f1465213ec48110b0468573c8c6ca08240fa51fe6c5"
    assert wire.model_sha256(dict(reversed(list(GLOBAL.items())))) == wire.model_sha256(GLOBAL)
    reshaped = {"b": GLOBAL["b"], "w": GLOBAL["w"].reshape(3, 2)}
    assert wire.model_sha256(reshaped) != wire.model_sha256(GLOBAL)
    assert wire.model_sha256({"b": GLOBAL["b"].astype(np.float64), "w": GLOBAL["w"]}) == wire.model_sha256(GLOBAL)


def test_documents_interoperate_with_the_safetensors_library(tmp_path):
    tensors = delta()
    meta = {"z": "1", "a": '{"k":[1,2]}', "m": "x"}
    ours = write_document(tensors, meta)
    for name, value in load(ours).items():
        np.testing.assert_array_equal(value, tensors[name])
    (tmp_path / "doc.safetensors").write_bytes(ours)
    with safe_open(str(tmp_path / "doc.safetensors"), "np") as f:
        assert f.metadata() == meta
    theirs = read_document(save(tensors, metadata=meta))
    assert theirs.metadata == meta
    for entry in theirs.entries:
        np.testing.assert_array_equal(theirs.array(entry), tensors[entry.name])


def test_documents_are_canonical():
    meta = {"b": "2", "a": "1"}
    first = write_document(delta(), meta)
    assert write_document(dict(reversed(list(delta().items()))), dict(reversed(list(meta.items())))) == first
    n = int.from_bytes(first[:8], "little")
    assert n % 8 == 0 and first[8 + n - 1 : 8 + n] in (b" ", b"}")


# -------------------------------------------------------------------------------------- sizes


def test_default_model_messages_fit_their_budgets():
    n = sizes("fednca")
    assert n["parameters"] == 7262 and n["float32_weights"] == 29048
    assert n["update_float16"] <= n["update_float16_largest"] <= UPDATE_BUDGET == 16384
    assert n["announcement"] <= ANNOUNCEMENT_BUDGET == 40960
    assert n["update_float32"] <= wire.max_update_bytes(tensor_shapes(ModelConfig()))
    assert n["receipt"] < 512


def test_wire_command_prints_the_sizes(capsys):
    assert main(["wire", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["update_float16"] <= 16384 and figures["announcement"] <= 40960
    assert figures["update_float32"] > 29048
    assert main(["wire"]) == 0
    assert "update, float16 delta" in capsys.readouterr().out
