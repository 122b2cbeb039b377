"""Model and training configuration: small frozen objects, validated on construction.

Two named presets:

* ``fednca`` (default): the configuration FedNCA published, 7,262 parameters.
* ``mednca``: the original Med-NCA (IPMI 2023), 70,016 parameters.

Every size is a field; a bad value raises :class:`~fednca.errors.ConfigError` naming the field.
``from_dict`` reads the stored form through the shared parser (:mod:`fednca.settings`): a bad
value is named by its dotted key (``model.kernels[1]``), every problem at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError
from .settings import from_mapping  # the stored form of a configuration object, parsed

__all__ = ["ModelConfig", "TrainConfig", "PRESETS", "TRAIN_PRESETS", "preset", "train_preset", "tensor_shapes",
           "from_mapping"]

Perception = Literal["depthwise", "dual3x3"]
Loss = Literal["bce", "dice_bce"]


@dataclass(frozen=True)
class ModelConfig:
    preset: str = "fednca"
    input_size: int = 64  # side of the square input image, in pixels
    channels: int = 16  # state channels; channel 0 is the image and is never updated
    hidden: int = 64  # width of the 1x1 update network
    pool: int = 2  # stage 1 runs on the image average-pooled by this factor
    steps: tuple[int, int] = (40, 20)  # NCA steps of stage 1 and stage 2
    kernels: tuple[int, int] = (7, 3)  # perception kernel size of stage 1 and stage 2
    perception: Perception = "depthwise"  # depthwise conv + identity, or two full 3x3 convs + identity
    batch_norm: bool = True  # BatchNorm2d(hidden) on batch statistics, no running stats
    hidden_bias: bool = False  # bias of the first 1x1 conv
    out_bias: bool = True  # bias of the last 1x1 conv
    full_update: bool = False  # last conv also outputs channel 0 (discarded), as Med-NCA does
    fire_rate: float = 0.5  # probability that a cell updates at a step
    train_patch: int = 0  # >0: stage 2 trains on random patches of this side (Med-NCA)

    def __post_init__(self) -> None:
        problems = _model_problems(self)
        if problems:
            raise ConfigError.collected(problems)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return from_mapping(cls, data, "model")


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 4
    loss: Loss = "bce"
    local_epochs: int = 3  # per federated round

    def __post_init__(self) -> None:
        problems = _train_problems(self)
        if problems:
            raise ConfigError.collected(problems)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return from_mapping(cls, data, "train")


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _model_problems(cfg: ModelConfig) -> list[tuple[str, str]]:
    """Every (field, why) wrong with a model configuration; a check that needs another field is
    skipped while that field is itself wrong, so one mistake is reported once."""
    problems: list[tuple[str, str]] = []
    if cfg.preset not in PRESETS:
        problems.append(("preset", f"unknown preset {cfg.preset!r}; known: {', '.join(PRESETS)}"))
    for name in ("input_size", "channels", "hidden", "pool"):
        if not _positive(getattr(cfg, name)):
            problems.append((name, f"must be a positive integer, got {getattr(cfg, name)!r}"))
    if _positive(cfg.channels) and cfg.channels < 2:
        problems.append(("channels", "needs at least 2 (the image and the output)"))
    pairs_ok = True
    for name in ("steps", "kernels"):
        value = getattr(cfg, name)
        if not isinstance(value, tuple) or len(value) != 2:
            problems.append((name, f"must be a pair (stage 1, stage 2), got {value!r}"))
            pairs_ok = False
            continue
        for i, v in enumerate(value):
            if not _positive(v):
                problems.append((f"{name}[{i}]", f"must be a positive integer, got {v!r}"))
                pairs_ok = False
            elif name == "kernels" and v % 2 == 0:
                problems.append((f"kernels[{i}]", f"must be odd so the cell stays centred, got {v}"))
                pairs_ok = False
    if cfg.perception not in ("depthwise", "dual3x3"):
        problems.append(("perception", f"must be 'depthwise' or 'dual3x3', got {cfg.perception!r}"))
    if not isinstance(cfg.fire_rate, (int, float)) or not 0.0 < cfg.fire_rate <= 1.0:
        problems.append(("fire_rate", f"must be in (0, 1], got {cfg.fire_rate!r}"))
    sizes_ok = _positive(cfg.input_size) and _positive(cfg.pool)
    if sizes_ok and cfg.input_size % cfg.pool:
        problems.append(("input_size", f"{cfg.input_size} is not divisible by pool={cfg.pool}"))
    elif sizes_ok and pairs_ok:
        small = cfg.input_size // cfg.pool
        for i, (k, side) in enumerate(zip(cfg.kernels, (small, cfg.input_size))):
            if k // 2 >= side:
                problems.append((f"kernels[{i}]", f"kernel {k} is too large for a {side}x{side} grid"))
    patch = cfg.train_patch
    if not isinstance(patch, int) or isinstance(patch, bool) or patch < 0:
        problems.append(("train_patch", f"must be 0 or a positive integer, got {patch!r}"))
    elif patch and _positive(cfg.input_size) and (patch > cfg.input_size or patch % 2):
        problems.append(("train_patch", f"must be even and at most input_size, got {patch}"))
    return problems


def _train_problems(cfg: TrainConfig) -> list[tuple[str, str]]:
    """Every (field, why) wrong with a training configuration."""
    problems: list[tuple[str, str]] = []
    if not isinstance(cfg.lr, (int, float)) or not 0 < cfg.lr < 1:
        problems.append(("lr", f"must be in (0, 1), got {cfg.lr!r}"))
    if not isinstance(cfg.betas, tuple) or len(cfg.betas) != 2 or not all(
        isinstance(b, (int, float)) and 0 <= b < 1 for b in cfg.betas
    ):
        problems.append(("betas", f"must be a pair of numbers in [0, 1), got {cfg.betas!r}"))
    for name in ("batch_size", "local_epochs"):
        if not _positive(getattr(cfg, name)):
            problems.append((name, f"must be a positive integer, got {getattr(cfg, name)!r}"))
    if cfg.loss not in ("bce", "dice_bce"):
        problems.append(("loss", f"must be 'bce' or 'dice_bce', got {cfg.loss!r}"))
    return problems


def tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every weight of the model this configuration builds, without PyTorch.

    The layout of :mod:`fednca.model` written out (a test checks the two agree), so torch-free
    code (the daemon, the coordinator) can check a model's tensors against its configuration.
    """
    c, h = cfg.channels, cfg.hidden
    shapes: dict[str, tuple[int, ...]] = {}
    for stage, k in (("stage1", cfg.kernels[0]), ("stage2", cfg.kernels[1])):
        if cfg.perception == "depthwise":
            shapes[f"{stage}.perceive.weight"] = (c, 1, k, k)
            shapes[f"{stage}.perceive.bias"] = (c,)
            features = 2 * c
        else:
            for name in ("perceive", "perceive2"):
                shapes[f"{stage}.{name}.weight"] = (c, c, k, k)
                shapes[f"{stage}.{name}.bias"] = (c,)
            features = 3 * c
        shapes[f"{stage}.fc0.weight"] = (h, features, 1, 1)
        if cfg.hidden_bias:
            shapes[f"{stage}.fc0.bias"] = (h,)
        if cfg.batch_norm:
            shapes[f"{stage}.norm.weight"] = (h,)
            shapes[f"{stage}.norm.bias"] = (h,)
        out = c if cfg.full_update else c - 1
        shapes[f"{stage}.fc1.weight"] = (out, h, 1, 1)
        if cfg.out_bias:
            shapes[f"{stage}.fc1.bias"] = (out,)
    return shapes


PRESETS: dict[str, dict[str, Any]] = {
    "fednca": {},
    "mednca": dict(
        channels=32,
        hidden=128,
        pool=4,
        steps=(64, 64),
        kernels=(3, 3),
        perception="dual3x3",
        batch_norm=False,
        hidden_bias=True,
        out_bias=False,
        full_update=True,
        input_size=256,
        train_patch=64,
    ),
}

TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "fednca": {},
    "mednca": dict(lr=1.6e-3, betas=(0.5, 0.5), loss="dice_bce"),
}


def preset(name: str = "fednca", **overrides: Any) -> ModelConfig:
    """The model configuration of a named preset, with some fields overridden."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides, "preset": name})


def train_preset(name: str = "fednca", **overrides: Any) -> TrainConfig:
    if name not in TRAIN_PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; known: {', '.join(TRAIN_PRESETS)}")
    return TrainConfig(**{**TRAIN_PRESETS[name], **overrides})
