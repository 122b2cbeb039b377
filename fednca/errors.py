"""One exception root for the core library.

``FedNCAError`` is for problems the user or a peer caused (bad configuration, a broken file, a
hostile message); a plain Python exception escaping from here is our own bug.
"""


class FedNCAError(Exception):
    """Root of every error the core library raises on purpose."""


class ConfigError(FedNCAError, ValueError):
    """A configuration value is invalid; the message names the field and why."""

    def __init__(self, field: str, why: str) -> None:
        super().__init__(f"{field}: {why}")
        self.field = field
        self.why = why


class DataError(FedNCAError):
    """A dataset file is missing, unreadable or inconsistent; the message names the file."""
