"""The trainer child's session with each trainer: the checkpoint of one is refused by the other
(the file named, the round started again from the global model), and a model the numpy trainer
does not cover is an error that says which setting to change."""

from __future__ import annotations

import io
import json
import logging

import pytest

from daemon_support import TINY_MODEL, TINY_TRAIN, Federation, tiny_weights
from fednca.config import preset
from fednca.training import checkpoint_metadata
from fednca.wire import make_announcement
from fednca_daemon.errors import TrainerError
from fednca_daemon.trainer_protocol import DataSpec, PhantomSpec, WorkerSpec
from fednca_daemon.worker import Session, _Signals


def session(fed: Federation, trainer: str) -> Session:
    spec = WorkerSpec(state_dir=str(fed.root / "state"), round=1, federation="fed",
                      coordinator_verify_key=bytes(fed.coordinator.signing.verify_key).hex(),
                      data=DataSpec(phantom=PhantomSpec(site=0, count=8, seed=0)), trainer=trainer)
    return Session(spec=spec, events=io.BytesIO(), signals=_Signals())


def announce(fed: Federation, model=TINY_MODEL, weights=None) -> None:
    (fed.root / "state").mkdir(mode=0o700, exist_ok=True)
    payload = make_announcement(federation="fed", round=1, deadline=2_000_000_000, quorum=1, train=TINY_TRAIN,
                                model=model, tensors=weights or tiny_weights(model), signing_key=fed.coordinator.signing)
    (fed.root / "state" / "announcement.bin").write_bytes(payload)


def checkpoint_format(fed: Federation) -> str:
    blob = (fed.root / "state" / "checkpoint.safetensors").read_bytes()
    return json.loads(checkpoint_metadata(blob)["fednca"])["format"]


@pytest.mark.parametrize("first, then", [("torch", "numpy"), ("numpy", "torch")])
def test_a_checkpoint_of_the_other_trainer_is_refused_and_the_round_starts_again(tmp_path, caplog, first, then):
    fed = Federation(tmp_path)
    announce(fed)
    before = session(fed, first)
    before.trainer.run(max_steps=3)
    before.save(before.trainer, before.extra)
    assert before.steps == 3
    formats = {"torch": "fednca-checkpoint/1", "numpy": "fednca-numpy-checkpoint/1"}
    assert checkpoint_format(fed) == formats[first]
    with caplog.at_level(logging.WARNING, logger="fednca.daemon.worker"):
        after = session(fed, then)
    path = fed.root / "state" / "checkpoint.safetensors"
    [warning] = [r.getMessage() for r in caplog.records if "checkpoint not usable" in r.getMessage()]
    assert warning.startswith(f"{path}: checkpoint not usable by the {then} trainer")
    assert ("PyTorch trainer" if first == "torch" else "numpy trainer") in warning
    assert after.steps == 0  # the round starts again from the global weights
    assert checkpoint_format(fed) == formats[then]  # and the file is now the new trainer's


def test_the_numpy_trainer_names_the_setting_for_a_model_it_does_not_cover(tmp_path):
    fed = Federation(tmp_path)
    med = preset("mednca", input_size=32, steps=(2, 2), train_patch=0)
    announce(fed, model=med)
    with pytest.raises(TrainerError, match="set training.trainer: torch"):
        session(fed, "numpy")
