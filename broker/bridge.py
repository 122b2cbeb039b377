"""A regional mosquitto bridged to the central one: the bridge section and both brokers' ACL lines.

A federation that outgrows one broker, or whose sites sit far from the hub, puts a mosquitto in
each region. Sites connect to the broker of their region; that broker holds one MQTT connection
(a *bridge*, mosquitto's own store-and-forward) to the central broker, beside which the
coordinator runs. Nothing above MQTT changes: the coordinator still subscribes to ``updates/+``
on the central broker and sees each site's update on that site's own topic.

What crosses the bridge, all at QoS 1 (a message is kept by the broker that holds it until the
other one acknowledges it)::

    updates/+    out   site -> coordinator (signed, sealed)
    status/+     out   site telemetry, retained; the last will ("offline") too
    round        in    the signed round announcement, retained: the regional broker keeps the
                       latest one and gives it to every site that subscribes
    model        in    the whole model, retained, for a site that cannot apply the round's delta
    receipts/+   in    the central broker's ACL passes only the receipts of this region's sites

That is what a site may write (out) and read (in), taken from the sites' rule table
(:func:`directions`), so a topic added to the federation crosses bridges without a change here.

``events`` does not cross: no site may read it, and the operator's views read it on the central
broker. ``cleansession false`` keeps the bridge's session on both sides across a broken link:
what a site publishes while the WAN is down waits in the regional broker's queue for the bridge,
and what the coordinator publishes for the region waits in the central broker's queue for the
bridge's session; both flow when the link returns (``restart_timeout`` paces the reconnects).

The central broker sees the bridge as one client, ``bridge-<region>``, publishing on
``updates/<site>`` for many sites, so rules written for one site's user cannot apply to it: its
ACL block (:func:`bridge_rules`) has explicit lines of its own: write ``updates/+`` and
``status/+``, read ``round``, ``model`` and the ``receipts/<site>`` of each site of the region.
An update forwarded by a bridge is still signed by its site, and the coordinator checks that the
signed header names the site of the topic, so a regional broker can delay or drop updates, as any
broker can, but not forge one.

Everything here is pure text; ``broker/bridge_setup.py`` writes the files.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fednca import topics
from fednca.errors import ConfigError

BRIDGE_PREFIX = "bridge-"  # a region's account on the central broker is bridge-<region>
QOS = 1
RESTART_TIMEOUT = (2, 30)  # reconnect back-off of the bridge: base and cap in seconds (jittered)
KEEPALIVE_S = 60


def bridge_user(region: str) -> str:
    """The central broker account (and client id) of ``region``'s bridge."""
    return BRIDGE_PREFIX + topics.check_id(region, what="region")


def notification_topic(region: str) -> str:
    """Where mosquitto publishes the bridge's state (retained "1" up, "0" down) on both brokers."""
    return f"$SYS/broker/connection/{bridge_user(region)}/state"


@dataclass(frozen=True)
class Direction:
    """One ``topic`` line of the bridge: a topic filter (below the federation's prefix) and a way."""

    pattern: str
    way: str  # "out": regional -> central; "in": central -> regional


def directions(federation: str) -> tuple[Direction, ...]:
    """The federation's topics that cross a bridge, and which way: what a site may write goes out,
    what it may read comes in, each per-site topic widened to ``+`` (the table in the module's
    header). Derived from the sites' rule table, so a topic added there crosses bridges too."""
    t = topics.Topics(federation)
    out = []
    for rule in topics.rules(role=topics.SITE, user="site", federation=federation):
        parsed = t.parse(rule.topic_filter)
        pattern = parsed.kind if parsed.site is None else f"{parsed.kind}/+"
        out.append(Direction(pattern, "out" if rule.access == "write" else "in"))
    return tuple(out)


@dataclass(frozen=True)
class Bridge:
    """The bridge of one region: where the central broker is and how to log in to it."""

    federation: str
    region: str
    address: str  # host:port of the central broker, as the regional broker reaches it
    password: str  # of bridge-<region> on the central broker
    cafile: str | None = None  # the CA of the central broker's certificate; None: plain MQTT
    max_packet_size: int = 1_048_576
    restart_timeout: tuple[int, int] = RESTART_TIMEOUT
    keepalive_s: int = KEEPALIVE_S

    def __post_init__(self) -> None:
        topics.check_id(self.federation, what="federation")
        topics.check_id(self.region, what="region")
        for name in ("address", "password", *(["cafile"] if self.cafile is not None else [])):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or any(c.isspace() for c in value):
                raise ConfigError(name, "must be a non-empty value without blanks (mosquitto.conf has no quoting)")
        base, cap = self.restart_timeout
        if not 1 <= base <= cap:
            raise ConfigError("restart_timeout", f"need 1 <= base <= cap, got {self.restart_timeout}")
        if self.keepalive_s < 5:
            raise ConfigError("keepalive_s", "mosquitto allows no less than 5 seconds")

    @property
    def username(self) -> str:
        return bridge_user(self.region)


def render_bridge(bridge: Bridge) -> str:
    """The ``connection`` section appended to the regional broker's mosquitto.conf."""
    b, prefix = bridge, topics.Topics(bridge.federation).prefix
    lines = [
        f"# Bridge of region {b.region!r} to the central broker of federation {b.federation!r}: sites of",
        "# this region publish here, and this section forwards their topics to the coordinator.",
        f"connection {b.username}",
        f"address {b.address}",
        "bridge_protocol_version mqttv311",
        "try_private true",  # tells the central mosquitto it is a bridge: retained flags kept, no echo
        "cleansession false",  # sessions on both brokers outlive a broken link: queued messages wait
        "start_type automatic",
        f"restart_timeout {b.restart_timeout[0]} {b.restart_timeout[1]}",
        f"keepalive_interval {b.keepalive_s}",
        f"remote_clientid {b.username}",
        f"local_clientid {b.username}.local",
        f"remote_username {b.username}",
        f"remote_password {b.password}",
        "notifications true",
        f"notification_topic {notification_topic(b.region)}",
        f"bridge_max_packet_size {b.max_packet_size}",
    ]
    for d in directions(b.federation):
        lines.append(f"topic {prefix}{d.pattern} {d.way} {QOS}")
    if b.cafile is not None:
        lines += [
            f"bridge_cafile {b.cafile}",
            "bridge_insecure false",  # the central certificate must name the host in the address
            "bridge_tls_version tlsv1.2",
        ]
    return "\n".join(lines) + "\n"


def bridge_rules(federation: str, *, region: str, sites: Iterable[str]) -> tuple[topics.Rule, ...]:
    """The central broker's ACL for ``region``'s bridge.

    What the sites write, the bridge may write for any site (``updates/+``, ``status/+``): the
    coordinator checks each update's signed site against its topic, and telemetry is no more
    authenticated on one broker than on the other. What the sites read, the bridge reads for the
    region's sites only: the federation-wide topics once, and ``receipts/<site>`` of each of its
    sites, so a region receives its own receipts and not every region's. Each line is a concrete
    topic or a ``+`` filter, never a ``%u`` pattern, which would name the bridge, not a site.
    Kept short on purpose: mosquitto 2.0 reads one user's block in time quadratic in its length
    (measured at 10,000 accounts: a 15,000-line block added about 10 s to the start and to every reload).
    """
    t = topics.Topics(federation)
    members = sorted(set(sites))
    out = [topics.Rule("write", notification_topic(region))]
    for site in members or ["site"]:  # a region without sites still forwards the shared topics
        for rule in topics.rules(role=topics.SITE, user=site, federation=federation):
            parsed = t.parse(rule.topic_filter)
            if rule.access == "write":
                out.append(topics.Rule("write", t.prefix + f"{parsed.kind}/+" if parsed.site else rule.topic_filter))
            elif parsed.site is None or members:
                out.append(rule)
    return tuple(dict.fromkeys(out))


def render_regional_acl(federation: str, *, region: str, sites: Iterable[str]) -> str:
    """The regional broker's ACL: one block per site of the region, the sites' own rule table.

    The bridge itself needs no block: mosquitto does not apply the ACL file to its bridges' local
    side.
    """
    lines = [
        f"# mosquitto ACL of region {region!r} of FedNCA federation {federation!r}. Generated by fednca",
        "# (fednca coordinator bridge): write it again rather than editing it. Whatever no line grants",
        "# is denied.",
    ]
    for site in sorted(set(sites)):
        lines += ["", f"user {site}"]
        lines += [f"topic {r.access} {r.topic_filter}" for r in topics.rules(role=topics.SITE, user=site,
                                                                              federation=federation)]
    return "\n".join(lines) + "\n"
