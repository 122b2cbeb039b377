"""The site's inference model: the newest verified global model, kept as ONNX for ``fednca segment``.

When a round announcement has been verified, its global model is written as a model folder
(``inference/model/``: safetensors + config, numpy only) and a short-lived child process runs
``python -m fednca.onnx_build`` into ``inference/model.onnx``: the graph is written from the
weights with the ``onnx`` package and checked with onnxruntime against the numpy model, so a site
needs no PyTorch for it (a Med-NCA model is checked against PyTorch where it is installed). The
daemon itself imports neither onnx nor onnxruntime; the child returns its memory when it exits. The ONNX file is replaced atomically, so ``fednca segment``
always finds a whole model, the newest one once its export has finished. A model whose export
already succeeded is not exported again; a failed export is logged and retried with the next
announcement.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from fednca import modelfile
from fednca.atomic import write_text
from fednca.wire import Announcement

log = logging.getLogger("fednca.daemon")

ONNX_NAME = "model.onnx"


def inference_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "inference"


class InferenceKeeper:
    def __init__(self, *, state_dir: Path, python: str = sys.executable) -> None:
        self.folder = inference_dir(state_dir)
        self.python = python
        self._child: subprocess.Popen[bytes] | None = None
        self._pending_sha: str | None = None
        self._next: Announcement | None = None  # offered while an export ran

    @property
    def onnx_path(self) -> Path:
        return self.folder / ONNX_NAME

    @property
    def _sha_path(self) -> Path:
        return self.folder / "model.sha256"

    def exported_sha(self) -> str | None:
        try:
            return self._sha_path.read_text().strip() or None
        except FileNotFoundError:
            return None

    def offer(self, announcement: Announcement) -> None:
        """Export this verified global model unless it is already the inference model; while an
        export runs, the newest model offered is kept and exported when it ends."""
        sha = announcement.header.model_sha256
        if sha in (self.exported_sha(), self._pending_sha):
            return
        if self._child is not None:
            self._next = announcement
            return
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        modelfile.save(self.folder / "model", dict(announcement.tensors), announcement.header.model,
                       model_sha256=sha, round=announcement.header.round)
        argv = [self.python, "-m", "fednca.onnx_build", str(self.folder / "model"), str(self.onnx_path)]
        with open(self.folder / "export.log", "wb") as log_file:  # a file: a pipe could fill and block
            self._child = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
        self._pending_sha = sha
        log.info("exporting the global model of round %d for inference", announcement.header.round)

    def poll(self) -> bool | None:
        """None while nothing finished; True when an export just succeeded, False when it failed."""
        if self._child is None or self._child.poll() is None:
            return None
        child, sha = self._child, self._pending_sha
        self._child, self._pending_sha = None, None
        ok = child.returncode == 0
        if ok:
            write_text(self._sha_path, f"{sha}\n", mode=0o600)
            log.info("inference model updated: %s", self.onnx_path)
        else:
            tail = (self.folder / "export.log").read_bytes()[-300:].decode(errors="replace").strip()
            log.warning("inference export failed (status %s): %s", child.returncode, tail)
        waiting, self._next = self._next, None
        if waiting is not None:
            self.offer(waiting)
        return ok

    def stop(self) -> None:
        if self._child is not None and self._child.poll() is None:
            self._child.kill()
            self._child.wait(timeout=10)
        self._child = None
