import pytest
import torch

from fednca.config import ModelConfig, preset
from fednca.errors import ConfigError
from fednca.model import build, count_parameters, tensor_shapes, tensors


@pytest.mark.parametrize("name,total,stage1,stage2", [("fednca", 7262, 3951, 3311), ("mednca", 70016, 35008, 35008)])
def test_parameter_counts_match_the_papers(name, total, stage1, stage2):
    model = build(preset(name))
    assert count_parameters(model) == total
    assert count_parameters(model.stage1) == stage1
    assert count_parameters(model.stage2) == stage2
    assert sum(v.numel() for v in tensors(model).values()) == total  # no hidden buffers travel


def test_tensor_shapes_agree_with_a_built_model():
    cfg = preset()
    assert tensor_shapes(cfg) == {k: tuple(v.shape) for k, v in build(cfg).state_dict().items()}


@pytest.mark.parametrize(
    "overrides,field",
    [
        (dict(steps=(0, 20)), "steps[0]"),
        (dict(kernels=(7, 4)), "kernels[1]"),
        (dict(input_size=65), "input_size"),
        (dict(channels=1), "channels"),
        (dict(fire_rate=0.0), "fire_rate"),
        (dict(perception="full"), "perception"),
    ],
)
def test_bad_configuration_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        preset(**overrides)
    assert e.value.field == field
    assert field in str(e.value)


def test_unknown_preset_is_refused():
    with pytest.raises(ConfigError, match="unknown preset 'unet'"):
        preset("unet")
    with pytest.raises(ConfigError, match="model.colour: unknown field"):
        ModelConfig.from_dict({"colour": 3})


def test_config_round_trips_through_a_dict():
    cfg = preset("mednca")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("side", [32, 48])
def test_any_batch_and_divisible_side(batch, side):
    model = build(preset(steps=(3, 2)))
    out = model(torch.zeros(batch, 1, side, side), generator=torch.Generator().manual_seed(0))
    assert out.shape == (batch, 1, side, side)


def test_odd_side_gets_a_clear_error():
    model = build(preset(steps=(2, 2)))
    with pytest.raises(ConfigError, match="divisible by pool=2"):
        model(torch.zeros(1, 1, 63, 63))
    with pytest.raises(ConfigError, match="square"):
        model(torch.zeros(1, 1, 64, 32))


def test_same_masks_same_output_and_channel_zero_untouched():
    model = build(preset(steps=(4, 3)), seed=1)
    with torch.no_grad():  # make the update non-zero so the masks matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    a = model(x, generator=torch.Generator().manual_seed(5))
    b = model(x, generator=torch.Generator().manual_seed(5))
    c = model(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    state = torch.randn(2, 16, 8, 8)
    new = model.stage2(state, torch.ones(2, 1, 8, 8))
    assert torch.equal(new[:, 0], state[:, 0])
    assert torch.equal(model.stage2(state, torch.zeros(2, 1, 8, 8)), state)


def test_low_memory_mode_gives_the_same_gradients():  # in the same memory layout
    model = build(preset(steps=(3, 2)), seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    grads = []
    for low in (False, True):
        model.zero_grad()
        model(x, generator=torch.Generator().manual_seed(3), low_memory=low, channels_last=False).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)


def test_depthwise_backward_matches_autograd():
    from fednca.model import _DepthwiseConv

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 9, dtype=torch.double, generator=gen, requires_grad=True)
    w = torch.randn(3, 1, 3, 3, dtype=torch.double, generator=gen, requires_grad=True)
    b = torch.randn(3, dtype=torch.double, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(_DepthwiseConv.apply, (x, w, b))


@pytest.mark.parametrize("name", ["fednca", "mednca"])
def test_torch_free_shapes_match_the_model(name):
    from fednca.config import tensor_shapes as pure_shapes

    for cfg in (preset(name), preset(name, hidden=8, channels=5, kernels=(5, 3))):
        assert pure_shapes(cfg) == tensor_shapes(cfg)


def test_both_memory_layouts_compute_the_same_output():
    model = build(preset(steps=(3, 2)), seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    outs = [model(x, generator=torch.Generator().manual_seed(3), channels_last=cl) for cl in (False, True)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
