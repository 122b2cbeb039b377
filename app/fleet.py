"""The live view of a federation: its sites' retained telemetry turned into table rows.

Pure: payloads and the time in, rows and text out. ``fednca status`` feeds it from the broker.
Telemetry is a peer's word: it is read by the one strict parser of the status message
(:func:`fednca.telemetry.parse_status`), and a payload that is not one shows as unreadable
rather than stopping the view.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fednca.telemetry import OFFLINE, TelemetryError, parse_status

COLUMNS = ("site", "state", "round", "progress", "last seen", "cpu %", "temp °C", "outbox")


@dataclass(frozen=True)
class SiteRow:
    site: str
    state: str
    round: int | None = None
    progress: float | None = None
    age_s: float | None = None  # seconds since the site's own timestamp
    cpu_percent: float | None = None
    temperature_c: float | None = None
    outbox: int | None = None
    samples_per_s: float | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def row(site: str, payload: bytes, now: float) -> SiteRow:
    """One site's row from its retained ``status/<site>`` payload (JSON, or the will ``offline``)."""
    if payload.strip() == OFFLINE:
        return SiteRow(site=site, state="offline")
    try:
        m = parse_status(payload)
    except TelemetryError:
        return SiteRow(site=site, state="unreadable")
    return SiteRow(
        site=site,
        state=m.state,
        round=m.round,
        progress=m.progress,
        age_s=max(0.0, now - m.time),
        cpu_percent=m.cpu_percent,
        temperature_c=m.temperature_c,
        outbox=m.outbox,
        samples_per_s=m.samples_per_s,
        error=None if m.error is None else m.error[:80],
    )


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def render(rows: list[SiteRow], *, header: str = "") -> str:
    """A fixed-width text table, one line per site, sorted by site id."""
    def cells(r: SiteRow) -> tuple[str, ...]:
        return (
            r.site,
            r.state,
            "-" if r.round is None else str(r.round),
            "-" if r.progress is None else f"{100 * r.progress:.0f}%",
            _age(r.age_s),
            "-" if r.cpu_percent is None else f"{r.cpu_percent:.0f}",
            "-" if r.temperature_c is None else f"{r.temperature_c:.0f}",
            "-" if r.outbox is None else str(r.outbox),
        )

    table = [COLUMNS] + [cells(r) for r in sorted(rows, key=lambda r: r.site)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not rows:
        lines.append("(no site has reported yet)")
    return "\n".join(([header] if header else []) + lines)
