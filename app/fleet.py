"""The live view of a federation: its sites' retained telemetry turned into table rows.

Pure: payloads and the time in, rows and text out. ``fednca status`` feeds it from the broker.
Telemetry is a peer's word: it is read by the one strict parser of the status message
(:func:`fednca.telemetry.parse_status`), and a payload that is not one shows as unreadable
rather than stopping the view.

What a site wrote (its error text above all) is printed through :func:`fednca.display.safe`: no
control character or terminal escape of a peer reaches the operator's terminal, and every cell
is bounded. The round log adds what telemetry cannot say (:func:`annotate`): a revoked site is
shown as revoked whatever its last telemetry said, the latest rejected update's reason fills the
error column when the site reports none, and each site's latest reported test Dice.

The link columns say what a site's connection costs it: ``rtt`` is the PUBLISH-to-PUBACK time
of its last QoS 1 message (a status message, mostly, so about one round trip; an update's upload
on a slow link), ``reconn.`` how often its daemon connected again since it started, and
``sent/recv`` the PUBLISH bytes it sent and received (a retransmission counts each time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from fednca.display import number, safe
from fednca.telemetry import OFFLINE, TelemetryError, parse_status

COLUMNS = ("site", "state", "round", "progress", "last seen", "cpu %", "temp °C", "outbox", "rtt", "reconn.",
           "sent/recv", "Dice", "error")


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
    dice: float | None = None  # the latest test Dice the site reported with an accepted update
    seen_at: float | None = None  # the site's own timestamp (unix seconds)
    rtt_ms: int | None = None  # PUBLISH to PUBACK of its last QoS 1 message
    reconnects: int | None = None  # connections to the broker made again since its daemon started
    bytes_sent: int | None = None
    bytes_received: int | None = None

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
        seen_at=float(m.time),
        cpu_percent=m.cpu_percent,
        temperature_c=m.temperature_c,
        outbox=m.outbox,
        samples_per_s=m.samples_per_s,
        rtt_ms=m.rtt_ms,
        reconnects=m.reconnects,
        bytes_sent=m.bytes_sent,
        bytes_received=m.bytes_received,
        error=m.error[:80] if m.error is not None else _gates(m.state, m.gates),
    )


def _gates(state: str, gates: tuple[str, ...]) -> str | None:
    """Why a paused site does not train (its closed gates), for the error column."""
    return f"{state}: {', '.join(gates)}"[:80] if state in ("paused", "backoff") and gates else None


def annotate(r: SiteRow, *, revoked: bool, rejected: str | None, dice: float | None) -> SiteRow:
    """``r`` with what the round log knows: revoked (the state), the latest rejection (the error
    when telemetry names none) and the latest reported test Dice."""
    state = "revoked" if revoked else r.state
    return replace(r, state=state, error=r.error or rejected, dice=dice)


def _kb(n: int | None) -> str:
    return "-" if n is None else number(n / 1000, ".0f", bound=1e9)


def _rtt(ms: int | None) -> str:
    if ms is None:
        return "-"
    return f"{ms} ms" if ms < 10_000 else f"{number(ms / 1000, '.0f', bound=1e6)} s"


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
            safe(r.site, 40),
            safe(r.state, 20),
            "-" if r.round is None else str(r.round),
            "-" if r.progress is None or r.state == "revoked" else f"{100 * r.progress:.0f}%",
            _age(r.age_s),
            number(r.cpu_percent, ".0f", bound=1e4),
            number(r.temperature_c, ".0f", bound=1e4),
            "-" if r.outbox is None else str(r.outbox),
            _rtt(r.rtt_ms),
            "-" if r.reconnects is None else str(r.reconnects),
            "-" if r.bytes_sent is None else f"{_kb(r.bytes_sent)}/{_kb(r.bytes_received)} kB",
            number(r.dice, ".3f", bound=1.0),
            "-" if not r.error else safe(r.error, 60),
        )

    table = [COLUMNS] + [cells(r) for r in sorted(rows, key=lambda r: r.site)]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if not rows:
        lines.append("(no site has reported yet)")
    return "\n".join(([header] if header else []) + lines)
