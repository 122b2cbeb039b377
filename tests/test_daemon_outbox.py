"""The state folder, the outbox, and updates made from a trainer checkpoint without PyTorch."""

import os
import stat

import numpy as np
import pytest

from daemon_support import TINY_MODEL, TINY_TRAIN, tiny_weights
from fednca.keys import CoordinatorKeys, Registry, SiteKeys
from fednca.phantom import phantom_dataset
from fednca.train import Trainer
from fednca.wire import make_announcement, model_sha256, open_announcement, open_update
from fednca_daemon.errors import StateFolderError
from fednca_daemon.outbox import Done, Outbox, StateFolder
from fednca_daemon.submission import CheckpointMismatch, build_update, checkpoint_damage, progress_of, read_progress

UID = "0123456789abcdef0123456789abcdef"


def test_outbox_stores_lists_and_removes_updates(tmp_path):
    box = Outbox(folder=tmp_path / "outbox")
    box.open()
    assert stat.S_IMODE(os.stat(tmp_path / "outbox").st_mode) == 0o700
    box.put(12, UID, b"sealed-12")
    box.put(3, "f" * 32, b"sealed-3")
    (tmp_path / "outbox" / "notes.txt").write_text("not an entry")
    assert box.entries() == [(3, "f" * 32), (12, UID)] and len(box) == 2
    assert box.get(12, UID) == b"sealed-12"
    assert stat.S_IMODE(os.stat(box.path(12, UID)).st_mode) == 0o600
    assert box.remove(12, UID) and not box.remove(12, UID)
    assert box.entries() == [(3, "f" * 32)]
    with pytest.raises(StateFolderError):
        box.path(1, "../../etc/passwd")
    with pytest.raises(StateFolderError, match="cannot read"):
        box.get(99, UID)


def test_opening_the_state_folder_removes_interrupted_writes_and_locks_it(tmp_path):
    folder = StateFolder(path=tmp_path / "state")
    folder.open()
    (tmp_path / "state" / ".checkpoint.safetensors.abc123.tmp").write_bytes(b"torn")
    (tmp_path / "state" / "outbox" / ".r1-x.update.k2.tmp").write_bytes(b"torn")
    folder.close()
    folder.open()
    assert sorted(os.listdir(tmp_path / "state")) == ["daemon.lock", "outbox"]
    assert os.listdir(tmp_path / "state" / "outbox") == []
    with pytest.raises(StateFolderError, match="another daemon"):
        StateFolder(path=tmp_path / "state").open()
    folder.close()


def test_done_record_round_trips_and_damage_is_named(tmp_path):
    folder = StateFolder(path=tmp_path)
    assert folder.load_done() == Done()
    folder.save_done(Done(round=4, result="accepted"))
    assert folder.load_done() == Done(round=4, result="accepted")
    folder.done_path.write_text('{"format": 1, "round": "four", "result": ""}')
    with pytest.raises(StateFolderError, match="done.json: damaged"):
        folder.load_done()


# --------------------------------------------------------------------------------- submissions


@pytest.fixture(scope="module")
def trained():
    """A checkpoint of round 3 after 6 of 40 planned steps, with its announcement and keys."""
    coordinator, site = CoordinatorKeys.generate(), SiteKeys.generate()
    weights = tiny_weights()
    payload = make_announcement(federation="fed", round=3, deadline=2_000_000_000, quorum=1, train=TINY_TRAIN,
                                model=TINY_MODEL, tensors=weights, signing_key=coordinator.signing)
    ann = open_announcement(payload, coordinator_verify_key=coordinator.signing.verify_key, federation="fed")
    data = phantom_dataset(site=0, count=8, size=16)
    trainer = Trainer(model_cfg=TINY_MODEL, train_cfg=TINY_TRAIN, data=data, low_memory=True,
                      weights={k: np.array(v) for k, v in weights.items()})
    trainer.run(max_steps=6)
    extra = dict(round=3, base_sha256=model_sha256(weights), round_start=0, planned=40, loss_sum=3.0,
                 loss_steps=6, dice_global=0.25)
    return dict(coordinator=coordinator, site=site, ann=ann, trainer=trainer, blob=trainer.checkpoint(**extra))


def test_progress_is_read_from_a_trainer_checkpoint_without_pytorch(trained):
    p = read_progress(trained["blob"])
    assert (p.round, p.steps, p.planned, p.samples) == (3, 6, 40, 8)
    assert p.metrics == {"train_loss": 0.5, "dice_global": 0.25}
    assert set(p.weights) == set(trained["ann"].tensors)
    sha = trained["ann"].header.model_sha256
    assert progress_of(trained["blob"], round=3, base_sha256=sha) == (6, 40)
    assert progress_of(trained["blob"], round=4, base_sha256=sha) == (0, None)
    assert progress_of(None, round=3, base_sha256=sha) == (0, None)
    with pytest.raises(CheckpointMismatch):
        read_progress(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")


def test_progress_is_read_from_a_numpy_trainer_checkpoint_too():
    from fednca.nptrain import Trainer as NumpyTrainer

    weights = tiny_weights()
    trainer = NumpyTrainer(model_cfg=TINY_MODEL, train_cfg=TINY_TRAIN, data=phantom_dataset(site=0, count=8, size=16),
                           weights={k: np.array(v) for k, v in weights.items()})
    trainer.run(max_steps=3)
    blob = trainer.checkpoint(round=2, base_sha256="ab" * 32, round_start=0, planned=40, loss_sum=1.5, loss_steps=3)
    p = read_progress(blob)
    assert (p.round, p.steps, p.planned, p.samples) == (2, 3, 40, 8)
    assert p.metrics == {"train_loss": 0.5}
    assert all(np.array_equal(p.weights[k], v) for k, v in trainer.weights().items())
    assert progress_of(blob, round=2, base_sha256="ab" * 32) == (3, 40)
    assert checkpoint_damage(blob) is None


def test_an_update_made_from_the_checkpoint_opens_at_the_coordinator(trained):
    c, s, ann = trained["coordinator"], trained["site"], trained["ann"]
    uid, payload, progress = build_update(announcement=ann, checkpoint=trained["blob"], site="site-a",
                                          signing_key=s.signing, coordinator_box=c.box.public_key)
    u = open_update(payload, topic_site="site-a", coordinator_keys=c.box,
                    registry=Registry(sites={"site-a": s.verify_key}), federation="fed", round=3,
                    base_sha256=ann.header.model_sha256, shapes={k: v.shape for k, v in ann.tensors.items()})
    assert u.header.update_id == uid and u.header.steps == 6 and u.header.partial and u.header.samples == 8
    assert u.dtype == "float16" and u.header.metrics == {"train_loss": 0.5, "dice_global": 0.25}
    local = trained["trainer"].weights()
    for k, d in u.delta.items():
        np.testing.assert_allclose(d, local[k] - ann.tensors[k], atol=2e-3, rtol=1e-2)
    assert any(np.abs(d).max() > 0 for d in u.delta.values())


def test_a_delta_beyond_float16_goes_as_float32(trained):
    c, s, ann = trained["coordinator"], trained["site"], trained["ann"]
    t = trained["trainer"]
    big = {k: v + (1e5 if i == 0 else 0.0) for i, (k, v) in enumerate(t.weights().items())}
    saved = t.weights()
    t.set_weights(big)
    extra = dict(round=3, base_sha256=ann.header.model_sha256, round_start=0, planned=6, loss_sum=0.0, loss_steps=0)
    blob = t.checkpoint(**extra)
    t.set_weights(saved)
    _, payload, _ = build_update(announcement=ann, checkpoint=blob, site="site-a", signing_key=s.signing,
                                 coordinator_box=c.box.public_key)
    u = open_update(payload, topic_site="site-a", coordinator_keys=c.box,
                    registry=Registry(sites={"site-a": s.verify_key}), federation="fed", round=3,
                    base_sha256=ann.header.model_sha256, shapes={k: v.shape for k, v in ann.tensors.items()})
    assert u.dtype == "float32" and not u.header.partial and u.header.metrics == {}


def test_a_checkpoint_of_another_round_is_not_submitted(trained):
    c, s, ann = trained["coordinator"], trained["site"], trained["ann"]
    blob = trained["trainer"].checkpoint(round=2, base_sha256=ann.header.model_sha256, round_start=0, planned=40,
                                         loss_sum=0.0, loss_steps=0)
    with pytest.raises(CheckpointMismatch, match="round 2"):
        build_update(announcement=ann, checkpoint=blob, site="site-a", signing_key=s.signing,
                     coordinator_box=c.box.public_key)
    none_done = trained["trainer"].checkpoint(round=3, base_sha256=ann.header.model_sha256,
                                              round_start=trained["trainer"].steps, planned=40, loss_sum=0.0,
                                              loss_steps=0)
    with pytest.raises(CheckpointMismatch, match="no training step"):
        build_update(announcement=ann, checkpoint=none_done, site="site-a", signing_key=s.signing,
                     coordinator_box=c.box.public_key)
