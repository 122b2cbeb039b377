"""Attacks on the wire, built from PyNaCl and the safetensors library directly, as an attacker would.

The helpers here (keys, a tiny model, forged envelopes) are shared with the fuzz tests.
"""

import hashlib
import struct

import numpy as np
import pytest
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.signing import SigningKey
from safetensors.numpy import save

from fednca import wire
from fednca.config import ModelConfig, TrainConfig
from fednca.keys import CoordinatorKeys, Registry, SiteKeys
from fednca.wire import Reason, WireError

FED = "liver-us"
ROUND = 7
BASE = "ab" * 32
SHAPES = {"b": (3,), "w": (2, 3)}
COORD = CoordinatorKeys(signing=SigningKey(b"\x01" * 32), box=PrivateKey(b"\x02" * 32))
OLD_BOX = PrivateKey(b"\x03" * 32)
SITE_A = SiteKeys(signing=SigningKey(b"\x0a" * 32))
SITE_B = SiteKeys(signing=SigningKey(b"\x0b" * 32))
STRANGER = SigningKey(b"\x0f" * 32)
REGISTRY = Registry(sites={"clinic-a": SITE_A.verify_key, "clinic-b": SITE_B.verify_key})
UPDATE_ID = "0123456789abcdef" * 2
GLOBAL = {"b": np.array([1.0, 2.0, 3.0], np.float32), "w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)}


def kid(key) -> bytes:
    return hashlib.sha256(bytes(key)).digest()[:8]


def prefix(kind: bytes, key_id: bytes, *, version: int = 1) -> bytes:
    return struct.pack("<4sBcH8s", b"FNCA", version, kind, 0, key_id)


def forge_update(body: bytes, *, signer: SigningKey, box: PublicKey = COORD.box.public_key,
                 key_id: bytes | None = None) -> bytes:
    head = prefix(b"U", kid(box) if key_id is None else key_id)
    return head + SealedBox(box).encrypt(signer.sign(head + body).signature + body)


def forge_signed(body: bytes, *, kind: bytes, signer: SigningKey, key_id: bytes | None = None) -> bytes:
    head = prefix(kind, kid(signer.verify_key) if key_id is None else key_id)
    return head + signer.sign(head + body).signature + body


def update_metadata(**over: str) -> dict[str, str]:
    meta = {"federation": FED, "site": "clinic-a", "round": str(ROUND), "base_sha256": BASE,
            "update_id": UPDATE_ID, "site_key": kid(SITE_A.verify_key).hex(), "samples": "40", "steps": "12",
            "partial": "false", "metrics": '{"loss":0.5}'}
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def delta(dtype=np.float16) -> dict[str, np.ndarray]:
    return {"b": np.array([0.5, -0.25, 0.125], dtype), "w": (np.arange(6, dtype=np.float32) / 8).astype(dtype).reshape(2, 3)}


def update_body(tensors=None, **over: str) -> bytes:
    return save(delta() if tensors is None else tensors, metadata=update_metadata(**over))


def make_update(signer: SiteKeys = SITE_A, **over) -> bytes:
    fields = dict(federation=FED, site="clinic-a", round=ROUND, base_sha256=BASE, samples=40, steps=12,
                  partial=False, metrics={"loss": 0.5}, delta=delta(np.float32), update_id=UPDATE_ID,
                  signing_key=signer.signing, coordinator_box=COORD.box.public_key)
    fields.update(over)
    return wire.make_update(**fields)


def open_update(payload: bytes, **over) -> wire.Update:
    args = dict(topic_site="clinic-a", coordinator_keys=[COORD.box], registry=REGISTRY, federation=FED,
                round=ROUND, base_sha256=BASE, shapes=SHAPES)
    args.update(over)
    return wire.open_update(payload, **args)


def make_announcement(**over) -> bytes:
    fields = dict(federation=FED, round=ROUND, deadline=1_900_000_000, quorum=2, train=TrainConfig(),
                  model=ModelConfig(), tensors=GLOBAL, signing_key=COORD.signing)
    fields.update(over)
    return wire.make_announcement(**fields)


def open_announcement(payload: bytes, **over) -> wire.Announcement:
    args = dict(coordinator_verify_key=COORD.signing.verify_key, federation=FED, shapes=SHAPES)
    args.update(over)
    return wire.open_announcement(payload, **args)


def make_receipt(**over) -> bytes:
    fields = dict(federation=FED, site="clinic-a", round=ROUND, update_id=UPDATE_ID, reason=None,
                  signing_key=COORD.signing)
    fields.update(over)
    return wire.make_receipt(**fields)


def open_receipt(payload: bytes, **over) -> wire.Receipt:
    args = dict(coordinator_verify_key=COORD.signing.verify_key, federation=FED, topic_site="clinic-a")
    args.update(over)
    return wire.open_receipt(payload, **args)


def refusal(call, *args, **kwargs) -> WireError:
    with pytest.raises(WireError) as info:
        call(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------------------------- tests


def test_the_forging_helpers_make_messages_the_receiver_accepts():
    update = open_update(forge_update(update_body(), signer=SITE_A.signing))
    assert update.header.update_id == UPDATE_ID and update.dtype == "float16"
    np.testing.assert_array_equal(update.delta["b"], [0.5, -0.25, 0.125])


def test_update_signed_by_a_key_that_is_not_enrolled():
    # Claiming its own key id: the receiver names the key it does not know.
    own_id = update_body(site_key=kid(STRANGER.verify_key).hex())
    err = refusal(open_update, forge_update(own_id, signer=STRANGER))
    assert err.reason is Reason.WRONG_KEY and err.header is None
    # Claiming the enrolled key's id: the signature does not verify.
    err = refusal(open_update, forge_update(update_body(), signer=STRANGER))
    assert err.reason is Reason.BAD_SIGNATURE and err.header is None


def test_valid_update_of_site_a_published_as_site_b():
    err = refusal(open_update, make_update(), topic_site="clinic-b")
    assert err.reason is Reason.SITE_MISMATCH and "clinic-a" in str(err)


def test_site_signing_a_header_that_names_another_site():
    body = update_body(site="clinic-b")  # signed by A, published on A's topic, claims to be B
    err = refusal(open_update, forge_update(body, signer=SITE_A.signing))
    assert err.reason is Reason.SITE_MISMATCH and err.header.site == "clinic-b"


def test_update_on_the_topic_of_a_site_that_is_not_enrolled():
    err = refusal(open_update, make_update(), topic_site="clinic-z")
    assert err.reason is Reason.UNKNOWN_SITE


def test_replay_of_last_rounds_update_is_stale_and_names_its_round():
    last_round = make_update(round=ROUND - 1)
    err = refusal(open_update, last_round)
    assert err.reason is Reason.STALE_ROUND
    assert err.header.round == ROUND - 1 and err.header.update_id == UPDATE_ID


def test_update_sealed_to_an_old_coordinator_key():
    sealed_to_old = make_update(coordinator_box=OLD_BOX.public_key)
    err = refusal(open_update, sealed_to_old)
    assert err.reason is Reason.WRONG_KEY and kid(OLD_BOX.public_key).hex() in str(err)
    # During a rotation the coordinator still holds the old key, and the update opens.
    assert open_update(sealed_to_old, coordinator_keys=[COORD.box, OLD_BOX]).header.coordinator_key == kid(
        OLD_BOX.public_key).hex()


def test_old_seal_relabelled_with_the_current_key_id_does_not_open():
    sealed_to_old = forge_update(update_body(), signer=SITE_A.signing, box=OLD_BOX.public_key,
                                 key_id=kid(COORD.box.public_key))
    assert refusal(open_update, sealed_to_old).reason is Reason.BAD_SEAL


def test_prefix_is_signed_so_relabelling_the_key_id_breaks_the_signature():
    # A site that sealed to the old key but relabels the cleartext key id after signing.
    body = update_body()
    head = prefix(b"U", kid(OLD_BOX.public_key))
    signature = SITE_A.signing.sign(head + body).signature
    relabelled = prefix(b"U", kid(COORD.box.public_key)) + SealedBox(COORD.box.public_key).encrypt(signature + body)
    assert refusal(open_update, relabelled).reason is Reason.BAD_SIGNATURE


def test_update_from_another_federation():
    err = refusal(open_update, make_update(federation="kidney-ct"))
    assert err.reason is Reason.WRONG_FEDERATION and err.header.federation == "kidney-ct"


def test_announcement_signed_by_a_site_key():
    body = wire.make_announcement(federation=FED, round=ROUND + 1, deadline=1, quorum=1, train=TrainConfig(),
                                  model=ModelConfig(), tensors=GLOBAL, signing_key=SITE_A.signing)[80:]
    assert refusal(open_announcement, forge_signed(body, kind=b"A", signer=SITE_A.signing)).reason is Reason.WRONG_KEY
    posing = forge_signed(body, kind=b"A", signer=SITE_A.signing, key_id=kid(COORD.signing.verify_key))
    assert refusal(open_announcement, posing).reason is Reason.BAD_SIGNATURE


def test_receipt_forged_by_a_site():
    body = make_receipt()[80:]
    posing = forge_signed(body, kind=b"R", signer=SITE_B.signing, key_id=kid(COORD.signing.verify_key))
    assert refusal(open_receipt, posing).reason is Reason.BAD_SIGNATURE


def test_a_signed_receipt_cannot_pass_as_an_announcement_or_an_update():
    receipt = make_receipt()
    as_announcement = receipt[:5] + b"A" + receipt[6:]
    assert refusal(open_announcement, as_announcement).reason is Reason.BAD_SIGNATURE
    assert refusal(open_announcement, receipt).reason is Reason.MALFORMED
    assert refusal(open_update, receipt).reason is Reason.MALFORMED


def test_receipt_for_site_a_delivered_to_site_b():
    err = refusal(open_receipt, make_receipt(), topic_site="clinic-b")
    assert err.reason is Reason.SITE_MISMATCH and err.header.site == "clinic-a"


def test_rolled_back_announcement_is_stale():
    old = make_announcement(round=ROUND - 1)
    assert refusal(open_announcement, old, min_round=ROUND).reason is Reason.STALE_ROUND
    assert open_announcement(old).header.round == ROUND - 1


def test_announcement_whose_hash_does_not_match_its_tensors():
    good = wire.open_announcement(make_announcement(), coordinator_verify_key=COORD.signing.verify_key,
                                  federation=FED, shapes=SHAPES)
    meta = {"federation": FED, "round": "7", "deadline": "1", "quorum": "1",
            "train": '{"batch_size":4,"betas":[0.9,0.999],"local_epochs":3,"loss":"bce","lr":0.001}',
            "model": '{"preset":"fednca"}', "model_sha256": good.header.model_sha256}
    swapped = {"b": GLOBAL["b"][::-1].copy(), "w": GLOBAL["w"]}
    forged = forge_signed(save(swapped, metadata=meta), kind=b"A", signer=COORD.signing)
    assert refusal(open_announcement, forged).reason is Reason.MALFORMED
    assert open_announcement(forge_signed(save(GLOBAL, metadata=meta), kind=b"A", signer=COORD.signing))


@pytest.mark.parametrize("tensors, reason", [
    ({"b": np.array([0.5, np.nan, 0], np.float16), "w": np.zeros((2, 3), np.float16)}, Reason.NON_FINITE),
    ({"b": np.zeros(3, np.float32), "w": np.full((2, 3), np.inf, np.float32)}, Reason.NON_FINITE),
    ({"b": np.zeros(3, np.float16), "w": np.zeros((3, 2), np.float16)}, Reason.BAD_SHAPE),
    ({"b": np.zeros(3, np.float16)}, Reason.BAD_SHAPE),
    ({"b": np.zeros(3, np.float16), "w": np.zeros((2, 3), np.float16), "x": np.zeros(1, np.float16)},
     Reason.BAD_SHAPE),
    ({"b": np.zeros(3, np.float16), "w": np.zeros((2, 3), np.float32)}, Reason.BAD_DTYPE),
    ({"b": np.zeros(3, np.float64), "w": np.zeros((2, 3), np.float64)}, Reason.BAD_DTYPE),
    ({"b": np.zeros(3, np.int32), "w": np.zeros((2, 3), np.int32)}, Reason.BAD_DTYPE),
])
def test_signed_updates_with_bad_tensors(tensors, reason):
    err = refusal(open_update, forge_update(update_body(tensors), signer=SITE_A.signing))
    assert err.reason is reason


@pytest.mark.parametrize("field, value", [
    ("round", "-1"), ("round", "07"), ("round", "1e3"), ("round", "99999999999"), ("samples", "0"),
    ("partial", "True"), ("base_sha256", "AB" * 32), ("update_id", "xyz"), ("site", "Clinic A"),
    ("metrics", '{"loss":NaN}'), ("metrics", '{"loss":"0.5"}'), ("metrics", "[1]"), ("metrics", '{"Loss":1}'),
    ("metrics", '{"a":1,"b":2,"c":3,"d":4,"e":5}'), ("metrics", '{"loss":1,"loss":2}'), ("steps", None),
    ("extra", "1"),
])
def test_signed_updates_with_bad_header_fields(field, value):
    err = refusal(open_update, forge_update(update_body(**{field: value}), signer=SITE_A.signing))
    assert err.reason is Reason.MALFORMED
    assert field in str(err)
