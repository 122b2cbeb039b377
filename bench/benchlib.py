"""What the benchmarks share: the machine a figure was measured on, how results are written, and
waiting for a real federation's first round.

Each benchmark is a script (``python bench/NAME.py``), so this module is imported by its plain name
(the script's folder is first on ``sys.path``).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from fednca.atomic import write_text


def machine() -> dict[str, Any]:
    """The machine's cores (this process's), architecture and Python, beside every figure."""
    return {"cores": len(os.sched_getaffinity(0)), "machine": platform.machine(), "python": platform.python_version()}


def emit(result: dict[str, Any], out: Path | None, *, pretty: bool = False) -> None:
    """Print ``result`` as JSON (one sorted line, or indented with ``pretty``) and write it to ``out``."""
    text = json.dumps(result, indent=2) if pretty else json.dumps(result, sort_keys=True)
    print(text)
    if out:
        write_text(out, text + "\n")


def first_round(store: Any, parties: Any, *, timeout_s: float, poll_s: float) -> tuple[dict | None, dict | None]:
    """The round log's first ``update_accepted`` and ``round_aggregated`` lines, polled until both
    are there, a party has failed or ``timeout_s`` passed (either may then be None)."""
    accepted = aggregated = None
    start = time.monotonic()
    while time.monotonic() - start < timeout_s and parties.failure() is None:
        log = store.read_log()
        accepted = next((r for r in log if r.get("kind") == "update_accepted"), None)
        aggregated = next((r for r in log if r.get("kind") == "round_aggregated"), None)
        if accepted and aggregated:
            break
        time.sleep(poll_s)
    return accepted, aggregated
