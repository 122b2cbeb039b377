"""A model on disk: ``model.safetensors`` (float32 weights) beside ``model.json`` (its configuration).

Loading never unpickles anything: safetensors holds raw tensors, the JSON holds the config.
Weights are numpy arrays here so that torch-free code (onnxruntime inference, the coordinator)
can read a model file too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from . import atomic
from .config import ModelConfig, tensor_shapes
from .errors import FedNCAError

WEIGHTS, CONFIG = "model.safetensors", "model.json"


class ModelFileError(FedNCAError):
    """A model folder is missing, unreadable or does not match its configuration."""


def save(folder: str | Path, tensors: dict[str, np.ndarray], cfg: ModelConfig, **info: Any) -> Path:
    """Write weights and config into ``folder`` (created if needed); ``info`` joins the JSON."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}
    atomic.write_bytes(folder / WEIGHTS, st_save(arrays))
    atomic.write_text(folder / CONFIG, json.dumps({"model": cfg.to_dict(), **info}, indent=2) + "\n")
    return folder


def load(path: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray], dict[str, Any]]:
    """Read a model folder (or its ``model.safetensors``): (config, weights, the JSON's other fields)."""
    path = Path(path)
    folder = path.parent if path.name == WEIGHTS else path
    try:
        meta = json.loads((folder / CONFIG).read_text())
        cfg = ModelConfig.from_dict(meta.pop("model"))
        tensors = st_load((folder / WEIGHTS).read_bytes())
    except FileNotFoundError as e:
        raise ModelFileError(f"{e.filename}: not found (a model folder holds {WEIGHTS} and {CONFIG})") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ModelFileError(f"{folder / CONFIG}: not a model configuration ({e})") from None
    except SafetensorError as e:
        raise ModelFileError(f"{folder / WEIGHTS}: not a safetensors file ({e})") from None
    expected = tensor_shapes(cfg)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if got != expected:
        raise ModelFileError(f"{folder / WEIGHTS}: tensors do not match the configuration in {CONFIG}")
    return cfg, tensors, meta
