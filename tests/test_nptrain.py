"""The PyTorch-free trainer: Adam as torch computes it, chunks, bit-identical resume, model files,
and one training step against PyTorch doing the same step."""

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

from fednca import modelfile, npnca
from fednca.config import preset, train_preset
from fednca.data import Dataset
from fednca.errors import FedNCAError
from fednca.model import build
from fednca.npadam import Adam
from fednca.nptrain import CheckpointError, Trainer, evaluate
from fednca.train import Trainer as TorchTrainer
from fednca.train import loss_fn

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


def make(data: Dataset, cfg=TINY, **kw) -> Trainer:
    return Trainer(model_cfg=cfg, train_cfg=train_preset(batch_size=4), data=data, seed=3, **kw)


def test_adam_matches_torch_optim_adam():
    rng = np.random.default_rng(0)
    shapes = {"a": (5, 3), "b": (7,)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    tparams = {k: torch.from_numpy(v.copy()).requires_grad_() for k, v in params.items()}
    ours = Adam(lr=1e-3, betas=(0.9, 0.999))
    theirs = torch.optim.Adam(list(tparams.values()), lr=1e-3, betas=(0.9, 0.999))
    for _ in range(25):
        grads = {k: (rng.normal(size=s) * rng.choice([1e-4, 1.0, 30.0])).astype(np.float32) for k, s in shapes.items()}
        ours.step(params, grads)
        for k, p in tparams.items():
            p.grad = torch.from_numpy(grads[k])
        theirs.step()
    for k, p in tparams.items():
        want = p.detach().numpy()
        # a few float32 ulps: PyTorch fuses the first moment's update into one multiply-add
        np.testing.assert_allclose(params[k], want, rtol=2e-6, atol=0)
        state = theirs.state[p]
        np.testing.assert_allclose(ours.exp_avg[k], state["exp_avg"].numpy(), rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(ours.exp_avg_sq[k], state["exp_avg_sq"].numpy(), rtol=1e-5, atol=0)
        assert ours.step_count[k] == int(state["step"]) == 25
    assert not np.array_equal(params["a"], rng.normal(size=(5, 3)))


def test_one_training_step_is_the_step_pytorch_takes():
    """Same weights, batch and fire masks: the numpy trainer's step lands where PyTorch's
    forward, backward and Adam step land."""
    data = squares(8)
    t = make(data)
    rng = np.random.default_rng(5)
    t.set_weights({k: v + rng.normal(0, 0.05, v.shape).astype(np.float32) for k, v in t.weights().items()})
    before = t.weights()
    idx = t.order[:4]
    fire = npnca.draw_masks(copy.deepcopy(t.masks), TINY, 4)
    t.step()

    model = build(TINY)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in before.items()})
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    given = tuple(torch.from_numpy(np.ascontiguousarray(m[:, :, None])) for m in fire)
    logits = model(torch.from_numpy(data.images[idx]), masks=given)
    loss_fn(logits, torch.from_numpy(data.masks[idx]), "bce").backward()
    opt.step()
    after = t.weights()
    for k, v in model.state_dict().items():
        if k.endswith("perceive.bias"):
            # Batch norm cancels this bias: its gradient is rounding noise, which Adam scales up
            # to a step of about lr in either direction, in PyTorch as here.
            assert np.abs(after[k] - before[k]).max() <= 1.01e-3
            continue
        theirs, ours = v.numpy() - before[k], after[k] - before[k]
        assert np.abs(theirs).max() > 0, k
        # Adam's first step is about lr * sign(gradient): an element whose gradient is near zero
        # moves by a float32-sensitive amount, so the update is compared as a whole, per tensor.
        assert np.linalg.norm(ours - theirs) <= 1e-3 * np.linalg.norm(theirs), k
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-2 * np.abs(theirs).max(), err_msg=k)


def test_chunks_bounded_by_steps_and_by_an_injected_clock():
    t = make(squares(12))
    assert t.run(max_steps=4).steps == 4
    ticks = iter(range(100))
    chunk = t.run(max_seconds=2.5, clock=lambda: float(next(ticks)))
    assert chunk.steps == 3 and chunk.samples == 12
    assert t.steps == 7
    assert t.epoch == 2 and t.cursor == 1  # 3 batches per epoch
    with pytest.raises(ValueError):
        t.run()


def test_resume_from_checkpoint_is_bit_identical():
    data = squares(12)
    straight = make(data)
    losses_straight = [straight.step() for _ in range(8)]

    first = make(data)
    losses = [first.step() for _ in range(4)]  # crosses an epoch boundary (3 batches per epoch)
    blob = first.checkpoint(round=7, note="x")
    resumed, extra = Trainer.restore(blob, data=data)
    assert extra == {"round": 7, "note": "x"}
    assert (resumed.epoch, resumed.cursor, resumed.steps) == (1, 1, 4)
    losses += [resumed.step() for _ in range(4)]

    assert losses == losses_straight
    w1, w2 = straight.weights(), resumed.weights()
    assert all(np.array_equal(w1[k], w2[k]) for k in w1)
    m1, _ = straight.optimizer.state()
    m2, _ = resumed.optimizer.state()
    assert all(np.array_equal(m1[k], m2[k]) for k in m1)
    np.testing.assert_array_equal(straight.order, resumed.order)


def test_training_lowers_the_loss_and_weights_change():
    t = make(squares(16))
    start = t.weights()
    first = t.run(max_steps=4).loss
    for _ in range(5):
        last = t.run(max_steps=4).loss
    assert last < first
    assert any(not np.array_equal(start[k], v) for k, v in t.weights().items())


def test_set_weights_keeps_adam_moments_and_refuses_wrong_tensors():
    t = make(squares(8))
    t.run(max_steps=2)
    moments, steps = t.optimizer.state()
    fresh = npnca.init_weights(TINY, seed=11)
    t.set_weights(fresh)
    assert all(np.array_equal(fresh[k], v) for k, v in t.weights().items())
    again, steps_again = t.optimizer.state()
    assert steps_again == steps and all(np.array_equal(moments[k], again[k]) for k in moments)
    with pytest.raises(FedNCAError):
        t.set_weights({k: v for k, v in fresh.items() if k != "stage1.fc0.weight"})
    with pytest.raises(FedNCAError):
        t.set_weights({**fresh, "stage1.fc0.weight": np.zeros((3, 3), np.float32)})


def test_bad_checkpoints_are_refused_with_checkpoint_error():
    data = squares(8)
    with pytest.raises(CheckpointError):
        Trainer.restore(b"not a checkpoint at all", data=data)
    with pytest.raises(CheckpointError, match="samples"):
        Trainer.restore(make(data).checkpoint(), data=squares(12))
    torch_blob = TorchTrainer(model_cfg=TINY, train_cfg=train_preset(batch_size=4), data=data).checkpoint()
    with pytest.raises(CheckpointError, match="PyTorch"):
        Trainer.restore(torch_blob, data=data)
    with pytest.raises(CheckpointError, match="numpy trainer"):  # and the other way round
        TorchTrainer.restore(make(data).checkpoint(), data=data)


def test_model_files_are_the_same_format_both_ways(tmp_path):
    """Weights trained here load into the PyTorch model (and back) through fednca.modelfile."""
    t = make(squares(8))
    t.run(max_steps=2)
    modelfile.save(tmp_path / "m", t.weights(), TINY, round=1)
    cfg, tensors, info = modelfile.load(tmp_path / "m")
    assert cfg == TINY and info == {"round": 1}
    model = build(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
    other = make(squares(8))
    other.set_weights({k: v.detach().numpy() for k, v in model.state_dict().items()})
    assert all(np.array_equal(other.weights()[k], v) for k, v in t.weights().items())


def test_evaluate_gives_dice_per_image_and_nqm_with_several_passes():
    data = squares(6)
    t = make(data)
    t.run(max_steps=6)
    one = evaluate(t.weights(), TINY, data)
    assert one.dice.shape == (6,) and one.nqm is None and 0 <= one.dice_mean <= 1
    many = evaluate(t.weights(), TINY, data, passes=3, seed=1)
    assert many.nqm is not None and many.nqm.shape == (6,)
    np.testing.assert_array_equal(many.probabilities, evaluate(t.weights(), TINY, data, passes=3, seed=1).probabilities)


def test_refuses_configurations_it_does_not_implement():
    with pytest.raises(FedNCAError, match="perception"):
        make(squares(8), cfg=preset("mednca", input_size=64, train_patch=0))


def test_trains_and_checkpoints_without_importing_torch():
    code = (
        "import sys, numpy as np\n"
        "from fednca.config import preset, train_preset\n"
        "from fednca.data import Dataset\n"
        "from fednca.nptrain import Trainer\n"
        "rng = np.random.default_rng(0)\n"
        "m = (rng.random((4, 1, 16, 16)) < 0.3).astype(np.float32)\n"
        "d = Dataset(images=m * 2 - 1, masks=m, names=tuple('abcd'))\n"
        "t = Trainer(model_cfg=preset(input_size=16, steps=(2, 2)), train_cfg=train_preset(), data=d)\n"
        "t.run(max_steps=1); Trainer.restore(t.checkpoint(), data=d)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
