"""One exception root for the core library.

``FedNCAError`` is for problems the user or a peer caused (bad configuration, a broken file, a
hostile message); a plain Python exception escaping from here is our own bug.
"""

from __future__ import annotations

from typing import Sequence


class FedNCAError(Exception):
    """Root of every error the core library raises on purpose."""


class ConfigError(FedNCAError, ValueError):
    """A configuration is invalid; the message names each bad value by its dotted key and why.

    ``field`` and ``why`` are the first problem; ``problems`` lists every (key, why) that a
    parser collected (one, when raised by a single check), and ``source`` names the file or
    object they come from, if any. Every configuration of the project, core, daemon and
    coordinator alike, reports its problems with this one type.
    """

    heading = "problem(s)"  # what the first line of a list of problems calls them

    def __init__(self, field: str, why: str, *, more: Sequence[tuple[str, str]] = (),
                 source: str | None = None) -> None:
        self.field = field
        self.why = why
        self.problems: list[tuple[str, str]] = [(field, why), *more]
        self.source = source
        if source is None and not more:
            super().__init__(f"{field}: {why}")
        else:
            lines = "\n".join(f"  {k}: {w}" for k, w in self.problems)
            head = f"{source}: " if source is not None else ""
            super().__init__(f"{head}{len(self.problems)} {self.heading}:\n{lines}")

    @classmethod
    def collected(cls, problems: Sequence[tuple[str, str]], *, source: str | None = None) -> "ConfigError":
        """One error listing every (key, why) in ``problems`` (which must not be empty)."""
        (field, why), *more = problems
        return cls(field, why, more=more, source=source)


class DataError(FedNCAError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""
