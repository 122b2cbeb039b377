"""Configuration parsing shared by every configuration of the project.

A configuration is a tree of frozen dataclasses. :class:`Parser` walks a JSON/YAML mapping
against one: it refuses unknown keys, reports missing required ones, converts each value by the
field's type hint (``int``, ``float``, ``bool``, ``str``, ``Path``, ``Literal``, optional values,
tuples, nested sections), runs the check a field carries in its metadata (see :func:`key`), and
finally builds the dataclass, whose ``__post_init__`` keeps the checks that involve several
fields. Nothing stops at the first problem: each one is collected under its dotted key
(``round.grace_s``, ``model.kernels[1]``) and the caller raises one
:class:`~fednca.errors.ConfigError` that lists them all, so an operator fixes a file in one go.

A section with a problem is not built (its value is :data:`BAD`), but its siblings still are,
so independent mistakes are all named without inventing follow-up errors.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import yaml

from .errors import ConfigError

Check = Callable[[Any], "str | None"]

BAD: Any = object()  # a value that failed; the section holding it is not built, parsing goes on


def key(default: Any = dataclasses.MISSING, *, doc: str, check: Check | None = None, secret: bool = False) -> Any:
    """A configuration key: a dataclass field with a description and an optional check.

    ``check(value)`` returns why the (already converted) value is wrong, or None. A ``secret``
    key is shown as ``***`` by :func:`to_dict`.
    """
    meta = {"doc": doc, "check": check, "secret": secret}
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple or a section class as the default")
    if isinstance(default, type) and dataclasses.is_dataclass(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


def between(lo: float, hi: float, *, low_open: bool = False) -> Check:
    """A check that a number lies in [lo, hi] (or (lo, hi] with ``low_open``)."""

    def check(v: Any) -> str | None:
        ok = (lo < v if low_open else lo <= v) and v <= hi
        return None if ok else f"must be {'>' if low_open else '>='} {lo} and <= {hi}, got {v!r}"

    return check


def join(where: str, name: str) -> str:
    """The dotted key of ``name`` inside the section at ``where``."""
    return f"{where}.{name}" if where else name


class Problems:
    """Every (dotted key, why) found so far, in the order found."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, where: str, why: str) -> None:
        self.items.append((where, why))

    def __bool__(self) -> bool:
        return bool(self.items)

    def build(self, where: str, make: Callable[..., Any], values: Mapping[str, Any],
              *, keys: Mapping[str, str] | None = None) -> Any:
        """``make(**values)``; a ConfigError it raises is recorded under ``where`` + its field
        (renamed through ``keys`` when the file holds that field under another key) and BAD returned."""
        try:
            return make(**values)
        except ConfigError as e:
            for name, why in e.problems:
                self.add(join(where, (keys or {}).get(name, name)), why)
            return BAD

    def raise_if_any(self, source: str | None = None) -> None:
        if self.items:
            raise ConfigError.collected(self.items, source=source)


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a non-empty string", bool: "true or false", Path: "a path"}
_PLURALS = {int: "integers", float: "numbers", str: "strings", bool: "booleans", Path: "paths"}


class Parser:
    """Converts mappings into configuration dataclasses, collecting problems in ``problems``.

    ``noun`` is what the messages call a key (``"key"`` in a file, ``"field"`` in an object's
    stored form). Relative paths are taken from ``base`` when given; override :meth:`path` for
    other forms (the daemon's ``$CREDENTIALS_DIRECTORY``).
    """

    def __init__(self, *, problems: Problems | None = None, noun: str = "key", base: Path | None = None) -> None:
        self.problems = problems if problems is not None else Problems()
        self.noun = noun
        self.base = base

    def section(self, cls: type, data: Any, where: str, *, make: Callable[..., Any] | None = None) -> Any:
        """``cls`` (or ``make(**values)``) from ``data``, or BAD after recording why."""
        if not isinstance(data, dict):
            self.problems.add(where or "(top level)", f"must be a mapping of {self.noun}s, got {type(data).__name__}")
            return BAD
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.metadata.get("internal")}
        for name in sorted(set(data) - set(fields), key=str):
            self.problems.add(join(where, str(name)), f"unknown {self.noun} (known here: {', '.join(fields)})")
        values: dict[str, Any] = {}
        failed = len(self.problems.items)
        for name, f in fields.items():
            here = join(where, name)
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    self.problems.add(here, "required")
                continue
            value = self.value(hints[name], data[name], here)
            check = f.metadata.get("check")
            if value is not BAD and value is not None and check is not None:
                why = check(value)
                if why:
                    self.problems.add(here, why)
                    value = BAD
            values[name] = value
        if len(self.problems.items) > failed or any(v is BAD for v in values.values()):
            return BAD
        return self.problems.build(where, make or cls, values)

    def value(self, t: Any, v: Any, where: str) -> Any:
        """``v`` converted to type ``t``, or BAD after recording why."""
        origin, args = typing.get_origin(t), typing.get_args(t)
        if origin in (typing.Union, types.UnionType) and type(None) in args:
            if v is None:
                return None
            inner = [a for a in args if a is not type(None)]
            return self.value(inner[0], v, where)
        if origin is Literal:
            if v not in args:
                self.problems.add(where, f"must be one of {', '.join(map(repr, args))}, got {v!r}")
                return BAD
            return v
        if origin is tuple:
            return self.sequence(args, v, where)
        if dataclasses.is_dataclass(t):
            return self.section(t, v, where)
        if t is bool:
            ok = isinstance(v, bool)
        elif t is int:
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif t is float:
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            v = float(v) if ok else v
        elif t in (str, Path):
            ok = isinstance(v, str) and v != "" and "\0" not in v
        else:  # a type the parser does not convert: the dataclass checks it
            return v
        if not ok:
            self.problems.add(where, f"must be {_TYPE_NAMES.get(t, getattr(t, '__name__', str(t)))}, got {v!r}")
            return BAD
        return self.path(v, where) if t is Path else v

    def sequence(self, args: tuple[Any, ...], v: Any, where: str) -> Any:
        """A tuple from a list: ``tuple[X, ...]`` of any length, ``tuple[X, Y]`` of exactly that many."""
        many = len(args) == 2 and args[1] is Ellipsis
        if not isinstance(v, (list, tuple)) or (not many and len(v) != len(args)):
            what = f"a list of {_PLURALS.get(args[0], 'values')}" if many else f"a list of {len(args)} values"
            self.problems.add(where, f"must be {what}, got {v!r}")
            return BAD
        kinds = [args[0]] * len(v) if many else list(args)
        items = tuple(self.value(kind, x, f"{where}[{i}]") for i, (kind, x) in enumerate(zip(kinds, v)))
        return BAD if any(x is BAD for x in items) else items

    def path(self, text: str, where: str) -> Any:
        p = Path(text).expanduser()
        return p if p.is_absolute() or self.base is None else self.base / p


def from_mapping(cls: type, data: Any, where: str = "") -> Any:
    """A configuration dataclass from its stored (JSON) form; raises one ConfigError naming every
    problem under its dotted key, prefixed with ``where.`` when given."""
    parser = Parser(noun="field")
    result = parser.section(cls, data, where)
    parser.problems.raise_if_any()
    return result


# ------------------------------------------------------------------------------------- printing


def to_plain(v: Any) -> Any:
    """A value as YAML/JSON holds it (paths as strings, tuples as lists)."""
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple):
        return [to_plain(x) for x in v]
    return v


def to_dict(cfg: Any, *, redact: bool = True) -> dict[str, Any]:
    """A configuration as plain data (paths as strings, secrets shown as ``***``)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("internal"):
            continue
        v = getattr(cfg, f.name)
        v = to_dict(v, redact=redact) if dataclasses.is_dataclass(v) else to_plain(v)
        if redact and f.metadata.get("secret") and v is not None:
            v = "***"
        out[f.name] = v
    return out


def reference(cls: type, where: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) of every key of ``cls``, for the documentation."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        name = join(where, f.name)
        t = hints[f.name]
        inner = [a for a in typing.get_args(t) if dataclasses.is_dataclass(a)]
        section = t if dataclasses.is_dataclass(t) else (inner[0] if inner else None)
        if section is not None:
            rows.append((name, "(section)", f.metadata.get("doc", "")))
            rows += reference(section, name)
            continue
        if f.default is dataclasses.MISSING:
            default = "required"
        else:
            default = yaml.safe_dump(to_plain(f.default), default_flow_style=True).strip().removesuffix("...").strip()
        rows.append((name, default, f.metadata.get("doc", "")))
    return rows
