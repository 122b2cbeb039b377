"""The inference graph built from the weights alone: the ONNX export a site makes without PyTorch.

The graph is the one :mod:`fednca.onnx_export` writes (format ``fednca-scan/1``: the same inputs,
output, metadata and two ``Scan`` loops over the fire masks, see there), so :mod:`fednca.segment`
runs either file unchanged. Where that module traces ``NCA.forward`` through torch's exporter,
this one writes each step's operators by hand with ``onnx.helper`` from the model configuration
and the named tensors of a model file: a site that trains with numpy (:mod:`fednca.nptrain`) needs
only ``onnx`` and ``onnxruntime`` to keep its inference model current.

One step of a stage (the Scan body; state (B, C, H, W), fire (B, 1, H, W) of bool)::

    padded   = Pad(state, reflect, kernel // 2)
    percept  = Conv(padded, perceive)            depthwise (group C), or two full convs (Med-NCA)
    z        = Conv1x1(Concat(state, percept))   fc0, bias optional
    z        = (z - mean) / sqrt(var + eps) * gamma + beta   batch statistics of this call (optional)
    dx       = Conv1x1(Relu(z))                  fc1, bias optional; channel 0's row dropped (full_update)
    new      = Concat(state[:, :1], state[:, 1:] + dx * fire)

A test holds the graph to the PyTorch model and to its exporter on the same weights, images and
masks. :func:`export` checks the graph before writing it against the numpy model
(:mod:`fednca.npnca`) where that covers the configuration, else against PyTorch when it is
installed; a Med-NCA graph on a device without PyTorch is written unchecked (the tests hold it).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import __version__, atomic
from .config import ModelConfig, tensor_shapes
from .errors import FedNCAError
from .segment import FORMAT, INPUTS, META_FORMAT, META_MODEL, META_SHA256, META_VERSION, OUTPUT, draw_masks
from .tensorcodec import model_sha256

OPSET = 18
BN_EPS = 1e-5  # BatchNorm2d's default, as the model uses it


class BuildError(FedNCAError):
    """The weights do not fit the configuration, or the graph written (by this builder or by
    PyTorch's exporter, :mod:`fednca.onnx_export`) does not reproduce the model."""


@dataclass(frozen=True)
class Built:
    path: Path
    size: int  # bytes of the ONNX file
    model_sha256: str  # canonical sha256 of the weights (fednca.tensorcodec.model_sha256)
    max_error: float | None  # largest logit difference from the reference at the check
    checked_against: str | None  # "numpy", "torch", or None when nothing could check it


def check_weights(weights: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """The weights as float32 arrays, once each has the shape ``cfg`` gives it (a :class:`BuildError`
    names the first that does not)."""
    expected = tensor_shapes(cfg)
    for name in sorted(set(expected) | set(weights)):
        got = tuple(np.shape(weights[name])) if name in weights else None
        if got != expected.get(name):
            raise BuildError(f"weight {name}: shape {got} where the configuration needs {expected.get(name)}")
    return {k: np.ascontiguousarray(weights[k], dtype=np.float32) for k in expected}


def _step_body(weights: dict[str, np.ndarray], cfg: ModelConfig, stage: int) -> onnx.GraphProto:
    """One NCA step as a Scan body (state, fire mask) -> new state, holding its own weights.

    The weights sit inside the body, not in the outer graph: onnxruntime pre-packs a body's own
    constant weights for its convolutions, which makes each pass faster (docs/inference.md).
    """
    prefix = f"stage{stage + 1}."
    c, pad = cfg.channels, cfg.kernels[stage] // 2
    inits: list[TensorProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), prefix + name))
        return prefix + name

    def weight(name: str) -> str | None:
        key = prefix + name
        return const(name, weights[key]) if key in weights else None

    def n(name: str) -> str:
        return prefix + name

    node = helper.make_node
    nodes = [
        node("Cast", [n("fire_mask")], [n("fire")], to=TensorProto.FLOAT),
        node("Pad", [n("state"), const("pads", np.array([0, 0, pad, pad, 0, 0, pad, pad], np.int64))],
             [n("padded")], mode="reflect"),
    ]
    group = c if cfg.perception == "depthwise" else 1
    parts = [n("state")]
    convs = ["perceive"] if cfg.perception == "depthwise" else ["perceive", "perceive2"]
    for conv in convs:
        inputs = [n("padded"), weight(f"{conv}.weight"), weight(f"{conv}.bias")]
        nodes.append(node("Conv", [i for i in inputs if i], [n(conv)], group=group))
        parts.append(n(conv))
    nodes.append(node("Concat", parts, [n("features")], axis=1))
    fc0 = [n("features"), weight("fc0.weight"), weight("fc0.bias")]
    nodes.append(node("Conv", [i for i in fc0 if i], [n("z")]))
    hidden = n("z")
    if cfg.batch_norm:
        # Batch statistics of this call, biased variance: BatchNorm2d without running statistics.
        axes = const("bn_axes", np.array([0, 2, 3], np.int64))
        shape = (1, cfg.hidden, 1, 1)
        nodes += [
            node("ReduceMean", [n("z"), axes], [n("mean")], keepdims=1),
            node("Sub", [n("z"), n("mean")], [n("centred")]),
            node("Mul", [n("centred"), n("centred")], [n("squares")]),
            node("ReduceMean", [n("squares"), axes], [n("var")], keepdims=1),
            node("Add", [n("var"), const("eps", np.array(BN_EPS, np.float32))], [n("var_eps")]),
            node("Sqrt", [n("var_eps")], [n("std")]),
            node("Div", [n("centred"), n("std")], [n("xhat")]),
            node("Mul", [n("xhat"), const("gamma", weights[prefix + "norm.weight"].reshape(shape))], [n("scaled")]),
            node("Add", [n("scaled"), const("beta", weights[prefix + "norm.bias"].reshape(shape))], [n("normed")]),
        ]
        hidden = n("normed")
    nodes.append(node("Relu", [hidden], [n("relu")]))
    fc1 = [n("relu"), weight("fc1.weight"), weight("fc1.bias")]
    nodes.append(node("Conv", [i for i in fc1 if i], [n("dx_all")]))
    one, big = const("one", np.array([1], np.int64)), const("end", np.array([c], np.int64))
    zero = const("zero", np.array([0], np.int64))
    axis1 = const("axis1", np.array([1], np.int64))
    dx = n("dx_all")
    if cfg.full_update:  # the last layer also proposes channel 0's update, which is dropped
        nodes.append(node("Slice", [dx, one, const("end_out", np.array([c + 1], np.int64)), axis1], [n("dx")]))
        dx = n("dx")
    nodes += [
        node("Mul", [dx, n("fire")], [n("fired")]),
        node("Slice", [n("state"), zero, one, axis1], [n("image")]),
        node("Slice", [n("state"), one, big, axis1], [n("hidden")]),
        node("Add", [n("hidden"), n("fired")], [n("hidden_new")]),
        node("Concat", [n("image"), n("hidden_new")], [n("new")], axis=1),
    ]
    info = helper.make_tensor_value_info
    return helper.make_graph(
        nodes,
        prefix + "step",
        [info(n("state"), TensorProto.FLOAT, None), info(n("fire_mask"), TensorProto.BOOL, None)],
        [info(n("new"), TensorProto.FLOAT, None)],
        initializer=inits,
    )


def assemble(cfg: ModelConfig, body1: onnx.GraphProto, body2: onnx.GraphProto, *,
             opsets: list[onnx.OperatorSetIdProto], metadata: Mapping[str, str]) -> onnx.ModelProto:
    """The outer ``fednca-scan/1`` graph around two step bodies (state, fire mask) -> state: pooling,
    the two Scans, upsampling between them, the logit channel out. Both exporters use it, so the
    interface :mod:`fednca.segment` checks is written in one place."""
    c, p = cfg.channels, cfg.pool
    consts = [
        numpy_helper.from_array(np.zeros((1, c - 1, 1, 1), np.float32), "zero_hidden"),
        numpy_helper.from_array(np.array([1], np.int64), "i1"),
        numpy_helper.from_array(np.array([2], np.int64), "i2"),
        numpy_helper.from_array(np.array([c], np.int64), "i_channels"),
        numpy_helper.from_array(np.array([1, 1, p, p], np.float32), "upscale"),
    ]
    node = helper.make_node
    nodes = [
        node("AveragePool", ["image"], ["small"], kernel_shape=[p, p], strides=[p, p]),
        node("Shape", ["small"], ["small_shape"]),
        node("Expand", ["zero_hidden", "small_shape"], ["small_hidden"]),  # (B, C-1, S/p, S/p) zeros
        node("Concat", ["small", "small_hidden"], ["state1_in"], axis=1),
        node("Scan", ["state1_in", "fire1"], ["state1_out"], body=body1, num_scan_inputs=1),
        node("Slice", ["state1_out", "i1", "i_channels", "i1"], ["hidden1"]),
        node("Resize", ["hidden1", "", "upscale"], ["hidden2"], mode="nearest",
             nearest_mode="floor", coordinate_transformation_mode="asymmetric"),
        node("Concat", ["image", "hidden2"], ["state2_in"], axis=1),  # (B, C, S, S)
        node("Scan", ["state2_in", "fire2"], ["state2_out"], body=body2, num_scan_inputs=1),
        node("Slice", ["state2_out", "i1", "i2", "i1"], [OUTPUT]),
    ]
    image, fire1, fire2 = INPUTS
    info = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes,
        "fednca_segmentation",
        [
            info(image, TensorProto.FLOAT, ["batch", 1, "side", "side"]),
            info(fire1, TensorProto.BOOL, [cfg.steps[0], "batch", 1, "small", "small"]),
            info(fire2, TensorProto.BOOL, [cfg.steps[1], "batch", 1, "side", "side"]),
        ],
        [info(OUTPUT, TensorProto.FLOAT, ["batch", 1, "side", "side"])],
        initializer=consts,
    )
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="fednca", producer_version=__version__)
    proto.ir_version = min(proto.ir_version, 10)  # readable by onnxruntime 1.18 and later
    proto.doc_string = "FedNCA two-stage NCA segmenter; fire masks are inputs (true = the cell updates)."
    helper.set_model_props(proto, {META_FORMAT: FORMAT, META_VERSION: __version__, **metadata})
    return proto


def build(weights: Mapping[str, np.ndarray], cfg: ModelConfig) -> onnx.ModelProto:
    """The ``fednca-scan/1`` graph of these weights (named as in a model file), carrying the model
    configuration and the weights' sha256 in its metadata as every export does."""
    arrays = check_weights(weights, cfg)
    metadata = {META_MODEL: json.dumps(cfg.to_dict(), sort_keys=True), META_SHA256: model_sha256(arrays)}
    return assemble(cfg, _step_body(arrays, cfg, 0), _step_body(arrays, cfg, 1),
                    opsets=[helper.make_opsetid("", OPSET)], metadata=metadata)


def _reference(weights: dict[str, np.ndarray], cfg: ModelConfig):  # -> (name, logits function) or None
    """What can check a built graph here: the numpy model where it covers the configuration,
    else PyTorch where it is installed, else nothing."""
    from . import npnca
    from .errors import ConfigError

    try:
        npnca.check_supported(cfg)
        return "numpy", lambda image, masks: npnca.forward(weights, cfg, image, masks)
    except ConfigError:
        pass
    try:
        import torch
    except ImportError:
        return None
    from .model import build as build_torch

    model = build_torch(cfg)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=True)
    model.eval()

    def run(image: np.ndarray, masks: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(image), masks=tuple(torch.from_numpy(m) for m in masks)).numpy()

    return "torch", run


def check(data: bytes, weights: dict[str, np.ndarray], cfg: ModelConfig, *, batch: int = 2) -> tuple[str, float] | None:
    """Run the graph beside the reference on one random input with the same masks, on a small grid
    (still every step of both stages); (reference, largest difference), or None without one."""
    import onnxruntime as ort

    reference = _reference(weights, cfg)
    if reference is None:
        return None
    name, run = reference
    small = max(8, cfg.kernels[0] // 2 + 1, -(-(cfg.kernels[1] // 2 + 1) // cfg.pool))
    side = min(cfg.pool * small, cfg.input_size)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1.0, 1.0, (batch, 1, side, side)).astype(np.float32)
    masks = draw_masks(cfg, batch, rng, side=side)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], dict(zip(INPUTS, (image, *masks))))[0]
    want = run(image, masks)
    error = float(np.abs(got - want).max())
    if not error <= 1e-3 * max(1.0, float(np.abs(want).max())):
        raise BuildError(f"onnxruntime differs from the {name} model by {error:.3g} on the same input and masks")
    return name, error


def export(weights: Mapping[str, np.ndarray], cfg: ModelConfig, path: str | Path, *, verify: bool = True) -> Built:
    """Build, validate, check (with ``verify``, see :func:`check`) and write the graph atomically."""
    path = Path(path)
    arrays = check_weights(weights, cfg)
    proto = build(arrays, cfg)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise BuildError(f"{path}: the built graph is not valid ONNX ({e})") from None
    data = proto.SerializeToString()
    try:
        checked = check(data, arrays, cfg) if verify else None
    except BuildError as e:
        raise BuildError(f"{path}: {e}") from None
    atomic.write_bytes(path, data)
    return Built(path=path, size=len(data), model_sha256=model_sha256(arrays),
                 max_error=None if checked is None else checked[1], checked_against=None if checked is None else checked[0])


def main(argv: list[str] | None = None) -> int:
    """``python -m fednca.onnx_build MODEL_FOLDER OUT.onnx``: the export a site's daemon runs in a
    short-lived child process (onnx and onnxruntime load there; their memory goes when it exits)."""
    from . import modelfile

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m fednca.onnx_build MODEL_FOLDER OUT.onnx", file=sys.stderr)
        return 2
    try:
        cfg, weights, _ = modelfile.load(Path(args[0]))
        done = export(weights, cfg, Path(args[1]), verify=True)
    except FedNCAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    checked = ("not checked: neither the numpy model nor PyTorch covers this configuration here"
               if done.checked_against is None else f"matches the {done.checked_against} model to {done.max_error:.1e}")
    print(f"wrote {done.path} ({done.size:,} bytes, model {done.model_sha256[:12]}, {checked})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
