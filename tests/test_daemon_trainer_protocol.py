"""The messages between the daemon and its trainer child: one encode/decode pair, strict."""

import json

import pytest

from fednca_daemon.errors import DaemonError, TrainerProtocolError
from fednca_daemon.trainer_protocol import (ChunkCommand, ChunkReport, DataSpec, PhantomSpec, TrainerFailed,
                                            TrainerReady, WorkerSpec, decode_command, decode_event, encode_command,
                                            encode_event)

SPEC = WorkerSpec(state_dir="/var/lib/fednca", round=3, federation="clinic", coordinator_verify_key="ab" * 32,
                  data=DataSpec(phantom=PhantomSpec(site=1, count=8, seed=0), test_fraction=0.25), threads=2)


def test_every_event_survives_its_line_and_keeps_the_wire_tags():
    events = [TrainerReady(round=3, steps=0, planned=40, samples=8, cpu_s=1.5, peak_rss=10),
              ChunkReport(round=3, steps=4, planned=40, samples=8, chunk_steps=4, chunk_samples=16, loss=None,
                          cpu_s=2.0, stopped=False),
              TrainerFailed(message="no images")]
    for event in events:
        line = encode_event(event)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert decode_event(line) == event
    assert [json.loads(encode_event(e))["ev"] for e in events] == ["ready", "chunk", "error"]


def test_the_spec_and_the_chunk_command_round_trip():
    assert WorkerSpec.from_json(SPEC.to_json()) == SPEC
    assert json.loads(SPEC.to_json())["data"]["phantom"] == {"site": 1, "count": 8, "seed": 0}
    assert decode_command(encode_command(ChunkCommand(seconds=5.0))) == ChunkCommand(seconds=5.0)


@pytest.mark.parametrize("line, why", [
    (b"not json\n", "not JSON"),
    (b"[1]\n", "not a JSON object"),
    (b'{"ev": "chunky"}\n', "unknown message"),
    (b'{"ev": "ready", "round": 1, "steps": 0, "planned": 4, "samples": 8}\n', "missing field cpu_s"),
    (b'{"ev": "ready", "round": "1", "steps": 0, "planned": 4, "samples": 8, "cpu_s": 0}\n', "round"),
    (b'{"ev": "ready", "round": true, "steps": 0, "planned": 4, "samples": 8, "cpu_s": 0}\n', "round"),
    (b'{"ev": "error", "message": "x", "extra": 1}\n', "unknown field"),
    (b'{"ev": "error", "message": null}\n', "must not be null"),
])
def test_a_malformed_trainer_line_is_a_typed_error_naming_the_problem(line, why):
    with pytest.raises(TrainerProtocolError, match=why) as info:
        decode_event(line)
    assert isinstance(info.value, DaemonError)


def test_bad_specs_and_commands_are_refused():
    body = json.loads(SPEC.to_json())
    body["data"] = {"folder": "/data", "phantom": {"site": 1, "count": 8, "seed": 0}}
    with pytest.raises(TrainerProtocolError, match="exactly one"):
        WorkerSpec.from_json(json.dumps(body))
    for line in (b'{"op": "chunk", "seconds": 0}', b'{"op": "stop", "seconds": 1}', b'{"op": "chunk"}'):
        with pytest.raises(TrainerProtocolError):
            decode_command(line)


def test_a_long_error_message_is_cut():
    assert len(decode_event(encode_event(TrainerFailed(message="x" * 5000))).message) == 500


def test_the_trainer_is_numpy_unless_the_spec_says_torch():
    assert SPEC.trainer == "numpy" and json.loads(SPEC.to_json())["trainer"] == "numpy"
    body = {**json.loads(SPEC.to_json()), "trainer": "torch"}
    assert WorkerSpec.from_json(json.dumps(body)).trainer == "torch"
    with pytest.raises(TrainerProtocolError, match="trainer must be one of numpy, torch"):
        WorkerSpec.from_json(json.dumps({**body, "trainer": "jax"}))
