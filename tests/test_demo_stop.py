"""``fednca demo`` stopped by SIGTERM leaves nothing behind: no site, no trainer, no baseline job."""

import signal
import subprocess
import sys
import time

import psutil
import pytest


@pytest.mark.slow
def test_sigterm_ends_the_demo_and_every_process_it_started(tmp_path):
    argv = [sys.executable, "-m", "fednca_app.cli", "demo", "--sites", "2", "--quorum", "2", "--rounds", "50",
            "--train-images", "4", "--test-images", "2", "--nca-steps", "4,2", "--out", str(tmp_path / "out")]
    demo = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert demo.stdout is not None
        lines = []
        while not (lines and lines[-1].startswith("federation of 2 sites")) and len(lines) < 50:
            lines.append(demo.stdout.readline())  # set-up notes, then the federation line: parties start
        assert lines[-1].startswith("federation of 2 sites"), lines
        deadline = time.monotonic() + 60
        children: list[psutil.Process] = []
        while time.monotonic() < deadline:  # wait until the baseline workers and trainers run
            children = psutil.Process(demo.pid).children(recursive=True)
            if sum("spawn_main" in " ".join(c.cmdline()) for c in children if c.is_running()) >= 2:
                break
            time.sleep(0.2)
        assert sum("spawn_main" in " ".join(c.cmdline()) for c in children) >= 2, "no baseline workers seen"
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) == 130
        gone, alive = psutil.wait_procs(children, timeout=20)
        assert alive == [], f"still running after the demo ended: {[p.cmdline()[:4] for p in alive]}"
    finally:
        if demo.poll() is None:
            demo.kill()
