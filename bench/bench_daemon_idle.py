"""An idle ``fednca daemon``: its resident memory and the modules it imports, against an earlier tree.

Each variant is a source tree: ``current`` (this checkout, as installed in the venv) and the git
revision given by ``--against`` (extracted with ``git archive`` and put first on PYTHONPATH under
the installed package names). The variants alternate A B A B over ``--repeats`` runs; each run
starts a daemon with no broker to reach (so no round, ever), lets it settle, reads its RSS,
stops it with SIGTERM and collects ``sys.modules`` as the process left it (an ``atexit`` hook of
the small launcher below). Printed: RSS min/median/max per variant, the number of modules, and
the modules one variant loads and the other does not.

    .venv/bin/python bench/bench_daemon_idle.py --against ab150f0 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import emit  # noqa: E402
from bench_daemon import free_port, keys, site_config  # noqa: E402  (a sibling benchmark's set-up)

from fednca.atomic import write_text  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"fednca": "fednca", "fednca_daemon": "daemon", "fednca_broker": "broker", "fednca_app": "app"}
LAUNCH = """
import atexit, importlib, json, os, sys
atexit.register(lambda: open(os.environ["FEDNCA_BENCH_MODULES"], "w").write(json.dumps(
    {name: getattr(m, "__file__", None) for name, m in sys.modules.items()})))
cli = importlib.import_module(sys.argv[1])
sys.exit(cli.main(sys.argv[2:]))
"""


def tree_of(revision: str, into: Path) -> tuple[Path, str]:
    """``revision``'s packages under their installed names, and the module of its ``fednca`` CLI."""
    into.mkdir()
    archive = into / "tree.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), revision], check=True)
    source = into / "source"
    with tarfile.open(archive) as tar:
        tar.extractall(source, filter="data")
    packages = into / "packages"
    packages.mkdir()
    for name, folder in FOLDERS.items():
        if (source / folder).is_dir():
            (packages / name).symlink_to(source / folder)
    cli = "fednca_app.cli" if (source / "app" / "cli.py").exists() else "fednca.cli"
    return packages, cli


def idle_run(*, packages: Path | None, cli: str, conf: Path, settle_s: float, out: Path) -> dict:
    env = dict(os.environ, FEDNCA_BENCH_MODULES=str(out))
    if packages is not None:
        env["PYTHONPATH"] = str(packages)
    with open(out.with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCH, cli, "daemon", "--config", str(conf),
                                 "--log-level", "warning"], env=env, stderr=log, cwd=out.parent)  # fmt: skip
        time.sleep(settle_s)
        rss = psutil.Process(proc.pid).memory_info().rss
        proc.terminate()
        status = proc.wait(timeout=30)
    if status != 0:
        raise SystemExit(f"{cli} daemon exited with status {status}:\n{out.with_suffix('.log').read_text()[-2000:]}")
    modules = json.loads(out.read_text())
    return {"rss_mb": rss / 2**20, "status": status, "modules": modules}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--against", default="ab150f0", help="git revision to compare with (default ab150f0)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--settle", type=float, default=3.0, help="seconds idle before RSS is read")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        keys(root)
        data = site_config(root, duty=0.5, threads=1, chunk_s=5.0, count=8)
        data["broker"]["url"] = f"mqtt://127.0.0.1:{free_port()}"  # nobody there: no round, ever
        conf = root / "daemon.yaml"
        write_text(conf, yaml.safe_dump(data), mode=0o600)
        old_packages, old_cli = tree_of(args.against, root / "old")
        variants = {"current": (None, "fednca_app.cli"), args.against: (old_packages, old_cli)}
        runs: dict[str, list[dict]] = {name: [] for name in variants}
        for i in range(args.repeats):
            for name, (packages, cli) in variants.items():
                runs[name].append(idle_run(packages=packages, cli=cli, conf=conf, settle_s=args.settle,
                                           out=root / f"modules-{i}-{len(runs[name])}.json"))  # fmt: skip
    result: dict = {"benchmark": "daemon_idle", "against": args.against, "repeats": args.repeats, "variants": {}}
    for name, done in runs.items():
        mods = done[-1]["modules"]
        ours = sorted(m for m, f in mods.items() if m.split(".")[0] in FOLDERS)
        roots = sorted({m.split(".")[0] for m in mods if not m.startswith("_")})
        rss = [r["rss_mb"] for r in done]
        result["variants"][name] = {
            "rss_mb": {"min": round(min(rss), 1), "median": round(statistics.median(rss), 1), "max": round(max(rss), 1)},
            "exit_status": sorted({r["status"] for r in done}),
            "modules": len(mods), "project_modules": ours, "top_level_packages": roots,
            "torch_loaded": "torch" in mods, "memory_broker_loaded": "fednca.transport.memory" in mods,
            "paho_loaded": "paho" in mods,
        }
    a, b = (set(result["variants"][n]["top_level_packages"]) for n in ("current", args.against))
    result["only_current"], result["only_" + args.against] = sorted(a - b), sorted(b - a)
    emit(result, args.out, pretty=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
