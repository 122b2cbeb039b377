"""The trainer: chunks, bit-identical resume (also across SIGKILL of a real process), evaluation."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fednca.config import preset, train_preset
from fednca.data import Dataset, save_folder
from fednca.train import CheckpointError, Trainer, evaluate

TINY = preset(input_size=16, steps=(3, 2), kernels=(3, 3))


def squares(n: int, size: int = 16, seed: int = 0) -> Dataset:
    """Bright noisy squares on a dark background: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        r, c = rng.integers(2, size - 8, size=2)
        masks[i, 0, r : r + 6, c : c + 6] = 1
    images = (masks * 1.2 - 0.6 + 0.2 * rng.standard_normal(masks.shape)).clip(-1, 1).astype(np.float32)
    return Dataset(images=images, masks=masks, names=tuple(f"p{i // 2}_{i}" for i in range(n)))


def make(data: Dataset, **kw) -> Trainer:
    return Trainer(model_cfg=TINY, train_cfg=train_preset(batch_size=4), data=data, seed=3, **kw)


def test_chunks_bounded_by_steps_and_by_an_injected_clock():
    t = make(squares(12))
    assert t.run(max_steps=4).steps == 4
    ticks = iter(range(100))
    chunk = t.run(max_seconds=2.5, clock=lambda: float(next(ticks)))
    assert chunk.steps == 3 and chunk.samples == 12  # 3 ticks of "1 s" pass after three steps
    assert t.steps == 7
    assert t.epoch == 2 and t.cursor == 1  # 3 batches per epoch


def test_resume_from_checkpoint_is_bit_identical():
    data = squares(12)
    straight = make(data)
    straight.run(max_steps=7)
    interrupted = make(data)
    interrupted.run(max_steps=4)
    resumed, extra = Trainer.restore(interrupted.checkpoint(note="x"), data=data)
    assert extra == {"note": "x"}
    resumed.run(max_steps=3)
    for k, v in straight.weights().items():
        assert np.array_equal(v, resumed.weights()[k]), k
    assert not np.array_equal(straight.weights()["stage1.fc1.weight"], make(data).weights()["stage1.fc1.weight"])


def test_new_global_weights_keep_the_optimizer_moments():
    t = make(squares(8))
    t.run(max_steps=2)
    moments = [s["exp_avg"].clone() for s in t.optimizer.state.values()]
    fresh = make(squares(8)).weights()
    t.set_weights(fresh)
    assert all(np.array_equal(fresh[k], v) for k, v in t.weights().items())
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(moments, t.optimizer.state.values()))


def test_restore_refuses_garbage_and_another_dataset():
    t = make(squares(8))
    with pytest.raises(CheckpointError):
        Trainer.restore(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}     ", data=squares(8))
    with pytest.raises(CheckpointError, match="8 samples"):
        Trainer.restore(t.checkpoint(), data=squares(9))


def test_training_learns_squares_and_evaluation_reports_nqm():
    data = squares(24)
    t = make(data)
    before = evaluate(t.model, data).dice_mean
    t.run(max_steps=60)
    after = evaluate(t.model, data, passes=4)
    assert after.dice_mean > max(0.6, before + 0.2)
    assert after.nqm is not None and after.nqm.shape == (24,) and np.all(after.nqm >= 0)
    assert after.dice.shape == (24,) and after.dice_std >= 0


def _train_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fednca_app.cli", "train", "--data", str(data), "--out", str(out),
            "--size", "16", "--nca-steps", "3,2", "--epochs", "4", "--chunk-steps", "2",
            "--threads", "1", "--test-fraction", "0.25", "--json", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    save_folder(squares(24), tmp_path / "data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = subprocess.run(_train_cmd(tmp_path / "data", tmp_path / "a"), capture_output=True, text=True, env=env)
    assert straight.returncode == 0, straight.stderr
    assert json.loads(straight.stdout.strip().splitlines()[-1])["params"] == 7262

    ckpt = tmp_path / "b" / "checkpoint.safetensors"
    kills = 0
    for _ in range(2):  # kill twice, at different points
        proc = subprocess.Popen(_train_cmd(tmp_path / "data", tmp_path / "b", "--resume"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        seen = ckpt.stat().st_mtime_ns if ckpt.exists() else 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt.exists() and ckpt.stat().st_mtime_ns != seen:
                time.sleep(0.05 * (kills + 1))
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait(timeout=30)
    assert kills == 2
    resumed = subprocess.run(_train_cmd(tmp_path / "data", tmp_path / "b", "--resume"), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at epoch" in resumed.stderr
    from safetensors.numpy import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "curves.png").stat().st_size > 0 and (tmp_path / "b" / "test-overlays.png").exists()
