"""The site on arm64: a Debian bookworm arm64 root under qemu-user-static, the site's install in
it, and its daemon completing one round against a coordinator on this (x86) host.

Steps, each recorded in the JSON it prints:

1. qemu's binfmt handler for aarch64 ELF files is registered (``binfmt_misc`` mounted if it is
   not, the handler from ``/usr/lib/binfmt.d/qemu-aarch64.conf`` written to its ``register``
   file, with the F flag so it works inside a chroot);
2. the arm64 root is made with ``debootstrap --arch=arm64 --variant=minbase`` (python3,
   python3-venv, python3-pip, ca-certificates), unless it exists already (``--root``);
3. the project's working tree (tracked and untracked, not ignored, files) is copied to
   ``/opt/fednca/src`` in the root, a fresh venv made at ``/opt/fednca/venv`` and the site's
   install (``pip install /opt/fednca/src``, no extras) run there from PyPI's aarch64 wheels,
   timed; then its size on disk, and that ``torch`` is not importable;
4. the numpy trainer's time per training step (the real model, batch 4) in the root under
   emulation and, for scale, natively on this host;
5. a federation made as an operator makes one (``coordinator init``, ``enroll``, keys, daemon
   YAML; the real model, one site, one round, 8 phantom images, batch 4) inside the root's
   ``/fed``; mosquitto and ``fednca coordinator run`` on this host's 127.0.0.1, the daemon
   (``/opt/fednca/venv/bin/fednca daemon``) in the chroot, which shares the host's network; the
   round must end with the site's update accepted and the model aggregated.

What it shows: the site's dependencies install on aarch64 from wheels (nothing to compile, no
PyTorch) and the daemon, its trainer child, keys, wire format and MQTT client work there on an
aarch64 CPython and aarch64 builds of numpy, PyNaCl, cryptography, onnxruntime. What it cannot
show: a board's speed (qemu translates every instruction; its times say nothing of a Cortex-A53's
or A76's), a board's memory (it runs with the host's), a board's kernel, filesystem or power.

    .venv/bin/python bench/arm64_site.py [--root /var/tmp/fednca-arm64] [--out bench/results/arm64.json]

Needs root, ``apt-get install debootstrap qemu-user-static``, mosquitto, a Debian mirror and
PyPI reachable (the root's ``/etc/ssl/certs/ca-certificates.crt`` is replaced by this host's, in
case a proxy re-signs TLS).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from benchlib import first_round

from fednca.config import preset, train_preset
from fednca_app import harness
from fednca_broker.store import RoundStore

REPO = Path(__file__).resolve().parent.parent
BINFMT = Path("/proc/sys/fs/binfmt_misc")
QEMU_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
MIRROR = "http://deb.debian.org/debian"
PACKAGES = "python3,python3-venv,python3-pip,ca-certificates"
ENV = ["/usr/bin/env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root", "LANG=C.UTF-8",
       "PIP_DISABLE_PIP_VERSION_CHECK=1", "PIP_CERT=/etc/ssl/certs/ca-certificates.crt"]
VENV = "/opt/fednca/venv"
ROUND_TIMEOUT_S = 1800.0  # a bound: under emulation a round of 2 steps took minutes

STEP_TIMER = """
import json, time
from fednca.config import preset, train_preset
from fednca.nptrain import Trainer
from fednca.phantom import phantom_dataset
t = Trainer(model_cfg=preset(), train_cfg=train_preset(batch_size=4),
            data=phantom_dataset(site=0, count=8, size=64, seed=0), seed=0)
t.set_weights({k: v + 0.02 for k, v in t.weights().items()})
t.step()
start = time.perf_counter()
t.run(max_steps=2)
print(json.dumps({"s_per_step": round((time.perf_counter() - start) / 2, 2)}))
"""


def sh(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, capture_output=True, **kw)


def in_root(root: Path, argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return sh(["chroot", str(root), *ENV, *argv], **kw)


def register_binfmt() -> str:
    """qemu's aarch64 handler in binfmt_misc; says what it had to do."""
    done = []
    if not (BINFMT / "register").exists():
        sh(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)])
        done.append("mounted binfmt_misc")
    if not (BINFMT / "qemu-aarch64").exists():
        (BINFMT / "register").write_text(QEMU_CONF.read_text().strip())
        done.append(f"registered {QEMU_CONF}")
    return ", ".join(done) or "already registered"


def make_root(root: Path) -> dict[str, Any]:
    if (root / "usr/bin/python3").exists():
        return {"debootstrap": "reused", "root": str(root)}
    start = time.monotonic()
    log = root.with_suffix(".debootstrap.log")
    with open(log, "w") as f:
        subprocess.run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={PACKAGES}", "bookworm",
                        str(root), MIRROR], check=True, stdout=f, stderr=subprocess.STDOUT)
    return {"debootstrap": "made", "root": str(root), "debootstrap_s": round(time.monotonic() - start),
            "log": str(log)}


class Mounts:
    """/proc and /dev inside the root, for as long as the ``with`` lasts."""

    def __init__(self, root: Path) -> None:
        self.points = [root / "proc", root / "dev"]

    def __enter__(self) -> Mounts:
        proc, dev = self.points
        if not os.path.ismount(proc):
            sh(["mount", "-t", "proc", "proc", str(proc)])
        if not os.path.ismount(dev):
            sh(["mount", "--bind", "/dev", str(dev)])
        return self

    def __exit__(self, *exc: object) -> None:
        for point in reversed(self.points):
            subprocess.run(["umount", str(point)], check=False)


def copy_project(root: Path) -> str:
    """The working tree's files (not ignored ones) to /opt/fednca/src; the tree's git description."""
    src = root / "opt/fednca/src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    files = sh(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    return sh(["git", "describe", "--always", "--dirty"], cwd=REPO).stdout.strip()


def install_site(root: Path) -> dict[str, Any]:
    shutil.rmtree(root / VENV.lstrip("/"), ignore_errors=True)
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt", root / "etc/ssl/certs/ca-certificates.crt")
    shutil.copy2("/etc/resolv.conf", root / "etc/resolv.conf")
    start = time.monotonic()
    in_root(root, ["python3", "-m", "venv", VENV])
    pip = subprocess.run(["chroot", str(root), *ENV, f"{VENV}/bin/pip", "install", "--no-cache-dir",
                          "/opt/fednca/src"], text=True, capture_output=True)
    seconds = round(time.monotonic() - start)
    if pip.returncode != 0:
        return {"install_ok": False, "install_s": seconds, "pip_tail": (pip.stdout + pip.stderr)[-3000:]}
    size = sh(["du", "-sm", str(root / VENV.lstrip("/"))]).stdout.split()[0]
    torch = subprocess.run(["chroot", str(root), *ENV, f"{VENV}/bin/python", "-c", "import torch"],
                           text=True, capture_output=True)
    arch = in_root(root, [f"{VENV}/bin/python", "-c", "import platform, numpy, onnxruntime, nacl; "
                          "print(platform.machine(), numpy.__version__, onnxruntime.__version__)"]).stdout.split()
    wheels = [line for line in pip.stdout.splitlines() if "aarch64" in line and ".whl" in line]
    return {"install_ok": True, "install_s": seconds, "venv_mb": int(size), "torch_importable": torch.returncode == 0,
            "machine": arch[0], "numpy": arch[1], "onnxruntime": arch[2],
            "installed": in_root(root, [f"{VENV}/bin/pip", "freeze"]).stdout.split(),
            "aarch64_wheels_downloaded": len(wheels)}


def step_times(root: Path) -> dict[str, Any]:
    emulated = json.loads(in_root(root, [f"{VENV}/bin/python", "-c", STEP_TIMER], timeout=1800).stdout)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    native = json.loads(sh([sys.executable, "-c", STEP_TIMER], env=env).stdout)
    return {"qemu_s_per_step": emulated["s_per_step"], "native_s_per_step": native["s_per_step"],
            "qemu_slowdown": round(emulated["s_per_step"] / native["s_per_step"], 1)}


def one_round(root: Path) -> dict[str, Any]:
    """A coordinator on this host, the site's daemon in the root; the round's outcome."""
    fed_dir = root / "fed"
    shutil.rmtree(fed_dir, ignore_errors=True)
    fed_dir.mkdir(mode=0o711)
    fed = harness.set_up(fed_dir / "work", federation="arm64", sites=1, rounds=1, quorum=1,
                         url=f"mqtt://127.0.0.1:{harness.free_port()}", model=preset(),
                         train=train_preset(batch_size=4, local_epochs=1), grace=1.0, train_images=8,
                         chunk_s=60.0, telemetry_s=10.0)
    site = fed.sites[0]
    # The daemon sees the root as /: the YAML's host paths lose the root's prefix.
    text = site.config.read_text().replace(str(root.resolve()), "")
    cfg = yaml.safe_load(text)
    cfg["training"].pop("low_memory")  # the daemon's defaults, as a site's YAML would leave them
    site.config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    inside = "/" + str(site.config.resolve().relative_to(root.resolve()))
    store = RoundStore(root=fed.config().store_root, federation="arm64")
    parties = harness.ProcessParties(federation=fed, log_dir=fed_dir / "logs")
    try:
        parties.start_broker()
        parties.start_coordinator()
        start = time.monotonic()
        parties.start_program("site0-arm64", ["chroot", str(root), *ENV, f"{VENV}/bin/fednca", "daemon",
                                              "--config", inside])
        accepted, aggregated = first_round(store, parties, timeout_s=ROUND_TIMEOUT_S, poll_s=1.0)
        site_log = parties.log("site0-arm64")
        return {"round_s": round(time.monotonic() - start), "update_accepted": bool(accepted),
                "samples": accepted.get("samples") if accepted else None, "round_aggregated": bool(aggregated),
                "failure": parties.failure(), "site_log_tail": site_log[-2500:]}
    finally:
        parties.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--root", type=Path, default=Path("/var/tmp/fednca-arm64"))
    p.add_argument("--skip-install", action="store_true", help="reuse the root's venv (after a code change only)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args()
    root = args.root.resolve()
    report: dict[str, Any] = {"binfmt": register_binfmt(), **make_root(root)}
    report["os"] = (root / "etc/debian_version").read_text().strip()
    with Mounts(root):
        report["tree"] = copy_project(root)
        if args.skip_install:
            in_root(root, [f"{VENV}/bin/pip", "install", "--no-deps", "--no-cache-dir", "/opt/fednca/src"])
        else:
            report.update(install_site(root))
        if report.get("install_ok", True):
            report.update(step_times(root))
            report.update(one_round(root))
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    sys.exit(0 if report.get("update_accepted") and report.get("round_aggregated") else 1)


if __name__ == "__main__":
    main()
