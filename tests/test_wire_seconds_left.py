"""The announcement's ``seconds_left``: the time a site measures the round by, on its own clock.

An optional header field: an announcement of an older coordinator has none and still opens; one
that carries it is parsed as strictly as every other field.
"""

from safetensors.numpy import save

from fednca.wire import Reason
from test_wire_tamper import COORD, GLOBAL, forge_signed, make_announcement, open_announcement, refusal


def test_seconds_left_travels_signed_and_gives_the_publication_time():
    h = open_announcement(make_announcement(deadline=1_900_003_600, seconds_left=3600)).header
    assert h.seconds_left == 3600 and h.deadline == 1_900_003_600 and h.published == 1_900_000_000


def test_an_announcement_without_seconds_left_still_opens():
    h = open_announcement(make_announcement()).header
    assert h.seconds_left is None and h.published is None


def _meta(**over: str) -> dict[str, str]:
    meta = {"federation": "liver-us", "round": "7", "deadline": "100", "quorum": "1",
            "train": '{"batch_size":4,"betas":[0.9,0.999],"local_epochs":3,"loss":"bce","lr":0.001}',
            "model": '{"preset":"fednca"}'}
    from fednca.wire import model_sha256

    meta["model_sha256"] = model_sha256(GLOBAL)
    meta.update(over)
    return meta


def test_seconds_left_is_parsed_strictly():
    assert open_announcement(forge_signed(save(GLOBAL, metadata=_meta(seconds_left="40")), kind=b"A",
                                          signer=COORD.signing)).header.seconds_left == 40
    for bad in ("-1", "1e3", "07", " 5", "2147483648", "", "x"):
        forged = forge_signed(save(GLOBAL, metadata=_meta(seconds_left=bad)), kind=b"A", signer=COORD.signing)
        err = refusal(open_announcement, forged)
        assert err.reason is Reason.MALFORMED and "seconds_left" in str(err), bad
    beyond = forge_signed(save(GLOBAL, metadata=_meta(seconds_left="101")), kind=b"A", signer=COORD.signing)
    assert "seconds_left" in str(refusal(open_announcement, beyond))


def test_a_coordinator_cannot_write_a_bad_seconds_left():
    for bad in (-1, 2**31, 1_900_000_001):
        assert refusal(make_announcement, seconds_left=bad).reason is Reason.MALFORMED


def test_the_coordinator_announces_the_time_left_by_its_clock():
    from fednca.config import ModelConfig, TrainConfig
    from fednca.topics import Topics
    from fednca.wire import open_announcement as open_any
    from fednca_broker.publisher import Publisher

    sent = []

    class Client:
        def publish(self, topic, payload, *, qos, retain=False):
            sent.append(payload)
            return None

    p = Publisher(client=Client(), topics=Topics("liver-us"), federation="liver-us", signing_key=COORD.signing,
                  train=TrainConfig(), model=ModelConfig(), clock=lambda: 1_900_000_000.7)
    shapes = {k: v.shape for k, v in GLOBAL.items()}
    p.announce(round=3, deadline=1_900_000_600.2, quorum=1, tensors=GLOBAL)
    p.announce(round=4, deadline=1_899_000_000, quorum=1, tensors=GLOBAL)  # the final model: already over
    first, final = (open_any(x, coordinator_verify_key=COORD.signing.verify_key, federation="liver-us",
                             shapes=shapes).header for x in sent)
    assert (first.deadline, first.seconds_left) == (1_900_000_601, 601)
    assert final.seconds_left == 0
