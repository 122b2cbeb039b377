"""The layering rule of the README, held by the source: which package may name which.

    fednca_app          the CLI, demo, status and fleet views, federation harness
      |         \\
    fednca_daemon   fednca_broker     never each other, never the application
          \\       /
           fednca                       the core: names none of the above

Every name a module could reach a package by counts: ``import`` statements at any depth (a lazy
import inside a function is still an arrow) and any string literal that names a package, as given
to ``importlib`` or ``python -m``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"fednca": "fednca", "fednca_daemon": "daemon", "fednca_broker": "broker", "fednca_app": "app"}
MAY_NOT_NAME = {
    "fednca": {"fednca_daemon", "fednca_broker", "fednca_app"},
    "fednca_daemon": {"fednca_broker", "fednca_app"},
    "fednca_broker": {"fednca_daemon", "fednca_app"},
    "fednca_app": set(),
}


_NAMED = re.compile(r"(?<![\w.])(" + "|".join(sorted(FOLDERS, key=len, reverse=True)) + r")(?!\w)")


def named_packages(source: str) -> set[str]:
    """Top-level package names that a module's source reaches: imports and string literals."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.update(_NAMED.findall(node.value))
    return found


def test_the_checker_sees_lazy_imports_and_importlib_strings():
    src = ("import fednca\n"
           "def f():\n    from fednca_broker.cli import main\n"
           "def g():\n    importlib.import_module('fednca_daemon.cli')\n"
           "h = ['python', '-m', 'fednca_app.cli']\n"
           "def k():\n    \"\"\"Filled by the producer (``fednca_broker.telemetry``).\"\"\"\n")
    assert named_packages(src) == {"fednca", "fednca_broker", "fednca_daemon", "fednca_app"}
    assert named_packages('"""Filled by the producer (``fednca_daemon.telemetry``)."""') == {"fednca_daemon"}
    assert named_packages('x = "fednca_daemonic, my_fednca_app"') == set()


@pytest.mark.parametrize("package", sorted(MAY_NOT_NAME))
def test_a_package_names_only_the_layers_below_it(package):
    folder = ROOT / FOLDERS[package]
    files = sorted(folder.rglob("*.py"))
    assert files, f"no sources under {folder}"
    offences = [f"{path.relative_to(ROOT)} names {sorted(bad)}"
                for path in files
                if (bad := named_packages(path.read_text()) & MAY_NOT_NAME[package])]
    assert offences == []
