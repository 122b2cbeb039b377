"""The format names the two trainers write into their checkpoints, and the check each makes on
restoring one.

A site switches trainers with one setting, so either may find the other's checkpoint in the state
folder: each refuses it by name (no conversion could resume bit for bit: the two draw fire masks
from different generators), and the daemon reads either one's progress to build an update. Kept
apart from :mod:`fednca.training`, which brings the data pipeline, so the daemon can read a
checkpoint's format without loading either trainer.
"""

from __future__ import annotations

TORCH = "fednca-checkpoint/1"  # fednca.train
NUMPY = "fednca-numpy-checkpoint/1"  # fednca.nptrain
FORMATS = (TORCH, NUMPY)
_MADE_BY = {TORCH: "the PyTorch trainer (fednca.train)", NUMPY: "the numpy trainer (fednca.nptrain)"}


def format_problem(found: object, *, own: str) -> str | None:
    """None when ``found`` is ``own``; else why a trainer writing ``own`` cannot resume it."""
    if found == own:
        return None
    if found in _MADE_BY:
        return f"checkpoint was made by {_MADE_BY[found]}"
    return f"unknown checkpoint format {found!r}"
