"""Export the two-stage NCA to one ONNX graph that onnxruntime runs without PyTorch.

Graph (format ``fednca-scan/1``)::

    image (B, 1, S, S) float32 in [-1, 1]
    fire1 (steps1, B, 1, S/pool, S/pool) bool    true where a cell updates at that stage-1 step
    fire2 (steps2, B, 1, S, S) bool
      image -> AveragePool(pool) -> concat zero hidden channels  (B, C, S/pool, S/pool)
            -> Scan over fire1: one stage-1 step per mask
            -> hidden channels Resize(nearest, x pool), concat the full-resolution image  (B, C, S, S)
            -> Scan over fire2: one stage-2 step per mask
            -> channel 1 = logits (B, 1, S, S)

Each stage's step is exported by torch's dynamo exporter from ``NCA.forward`` (the code that
trains), with dynamic batch size and grid side, and becomes the body of an ONNX ``Scan``: the graph
stays the size of two steps whatever the step count, and the export takes seconds where unrolling
every step through the exporter takes half a minute (docs/inference.md has the measurements).

Nothing random is inside the graph: the fire masks are inputs, drawn per call by the caller
(``torch.rand`` under the exporter becomes one fixed mask baked into the file). The model
configuration and the weights' canonical sha256 travel in the ONNX ``metadata_props``, which
:mod:`fednca.segment` checks before it runs anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from . import atomic
from .config import ModelConfig
from .model import NCA, SegmentationNCA, build, tensors
from .onnx_build import Built, BuildError, assemble, check_weights
from .segment import INPUTS, META_MODEL, META_SHA256, OUTPUT, draw_masks
from .tensorcodec import model_sha256


ExportError = BuildError  # one error, and one result (Built), whichever writes the graph


def export_onnx(
    weights: Mapping[str, np.ndarray] | SegmentationNCA,
    cfg: ModelConfig,
    path: str | Path,
    *,
    verify: bool = True,
) -> Built:
    """Write the ONNX graph of a model (weights by name, or a model) to ``path`` atomically.

    With ``verify``, onnxruntime runs the new graph next to PyTorch on the same random input and
    masks before anything is written; a disagreement raises :class:`ExportError`.
    """
    path = Path(path)
    if isinstance(weights, SegmentationNCA):
        arrays = {k: v.numpy() for k, v in tensors(weights).items()}
    else:
        arrays = {k: np.asarray(v) for k, v in weights.items()}
    if isinstance(weights, SegmentationNCA) and weights.cfg != cfg:
        raise ExportError(f"{path}: the model's configuration differs from the one given")
    model = _model(arrays, cfg)
    sha = model_sha256(arrays)
    proto = to_onnx(model, metadata={META_MODEL: json.dumps(cfg.to_dict(), sort_keys=True), META_SHA256: sha})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path}: the exported graph is not valid ONNX ({e})") from None
    data = proto.SerializeToString()
    error = _verify(model, data, path) if verify else None
    atomic.write_bytes(path, data)
    return Built(path=path, size=len(data), model_sha256=sha, max_error=error,
                 checked_against=None if error is None else "torch")


def _model(arrays: dict[str, np.ndarray], cfg: ModelConfig) -> SegmentationNCA:
    model = build(cfg)
    state = {k: torch.from_numpy(np.array(v)) for k, v in check_weights(arrays, cfg).items()}
    model.load_state_dict(state, strict=True)
    return model.eval()


def to_onnx(model: SegmentationNCA, *, metadata: Mapping[str, str]) -> onnx.ModelProto:
    """The Scan graph of ``model`` (see the module's docstring), with ``metadata`` added."""
    cfg = model.cfg
    body1, opsets = _step_body(model.stage1, cfg.kernels[0], cfg.input_size // cfg.pool, cfg.channels, "stage1.")
    body2, _ = _step_body(model.stage2, cfg.kernels[1], cfg.input_size, cfg.channels, "stage2.")
    return assemble(cfg, body1, body2, opsets=opsets, metadata=metadata)


def _step_body(
    nca: NCA, kernel: int, side: int, channels: int, prefix: str
) -> tuple[onnx.GraphProto, list[onnx.OperatorSetIdProto]]:
    """One NCA step as a Scan body (state, fire mask) -> state, holding its own weights, prefixed."""
    batch = torch.export.Dim("batch", min=1)
    grid = torch.export.Dim("side", min=kernel // 2 + 1)  # reflect padding needs side > pad
    example = (torch.zeros(2, channels, side, side), torch.ones(2, 1, side, side))
    dims = {0: batch, 2: grid, 3: grid}
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            nca, example, dynamo=True, dynamic_shapes={"state": dims, "fire": dims},
            input_names=["state", "fire"], output_names=["new"], verbose=False, report=False,
        )
    step = onnx.inliner.inline_local_functions(program.model_proto)
    state_in, mask_in, mask, state_out = (prefix + n for n in ("state", "fire_mask", "fire", "new"))

    def rename(name: str) -> str:
        return name if name == "" else prefix + name  # "" marks an omitted optional input

    nodes = [helper.make_node("Cast", [mask_in], [mask], to=TensorProto.FLOAT)]
    for original in step.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in original.attribute):
            raise ExportError(f"{prefix}step: exporter produced a nested graph ({original.op_type}), not supported")
        copy = onnx.NodeProto()
        copy.CopyFrom(original)
        copy.name = rename(original.name)
        copy.input[:] = [rename(n) for n in original.input]
        copy.output[:] = [rename(n) for n in original.output]
        nodes.append(copy)
    weights = []
    # Inside the body, not in the outer graph: onnxruntime pre-packs a body's own constant weights
    # for its convolutions (NCHWc), not outer-scope ones, and each pass then runs ~20 % faster.
    for tensor in step.graph.initializer:
        renamed = TensorProto()
        renamed.CopyFrom(tensor)
        renamed.name = rename(tensor.name)
        weights.append(renamed)
    if [i.name for i in step.graph.input] != ["state", "fire"] or [o.name for o in step.graph.output] != ["new"]:
        raise ExportError(f"{prefix}step: unexpected exported signature")
    info = helper.make_tensor_value_info
    body = helper.make_graph(
        nodes,
        prefix + "step",
        [info(state_in, TensorProto.FLOAT, None), info(mask_in, TensorProto.BOOL, None)],
        [info(state_out, TensorProto.FLOAT, None)],
        initializer=weights,
    )
    return body, list(step.opset_import)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The dynamo exporter warns about training mode, torchvision and axis names: none apply here."""
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


def _verify(model: SegmentationNCA, data: bytes, path: Path, *, batch: int = 2) -> float:
    """Run the graph and the model on one random input with the same masks; the largest difference.

    A small grid (still both stages, every step) keeps this to a fraction of a second; the graph
    does not depend on the grid side.
    """
    cfg = model.cfg
    small = max(8, cfg.kernels[0] // 2 + 1, -(-(cfg.kernels[1] // 2 + 1) // cfg.pool))
    side = min(cfg.pool * small, cfg.input_size)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1.0, 1.0, (batch, 1, side, side)).astype(np.float32)
    fire1, fire2 = draw_masks(cfg, batch, rng, side=side)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT], dict(zip(INPUTS, (image, fire1, fire2))))[0]
    with torch.no_grad():
        want = model(torch.from_numpy(image), masks=(torch.from_numpy(fire1), torch.from_numpy(fire2))).numpy()
    error = float(np.abs(got - want).max())
    if not error <= 1e-3 * max(1.0, float(np.abs(want).max())):
        raise ExportError(f"{path}: onnxruntime differs from PyTorch by {error:.3g} on the same input and masks")
    return error


def main(argv: list[str] | None = None) -> int:
    """``python -m fednca.onnx_export MODEL ONNX``: the export a site's daemon runs in a child
    process (PyTorch loads there and its memory goes when the child exits)."""
    import sys

    from . import modelfile

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m fednca.onnx_export MODEL_FOLDER OUT.onnx", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    cfg, weights, _ = modelfile.load(Path(args[0]))
    done = export_onnx(weights, cfg, Path(args[1]), verify=True)
    print(f"wrote {done.path} ({done.size:,} bytes, model {done.model_sha256[:12]}, "
          f"matches PyTorch to {done.max_error:.1e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
