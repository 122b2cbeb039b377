"""Topic names of one federation and the broker's access rules, as pure functions.

Every topic lives under ``fednca/<federation>/``::

    round               coordinator -> sites   QoS 1, retained
    model               coordinator -> sites   QoS 1, retained; the whole model, for a site that
                                               cannot apply the round's delta (docs/wire.md)
    updates/<site>      site -> coordinator    QoS 1
    receipts/<site>     coordinator -> site    QoS 1
    status/<site>       site -> coordinator    QoS 1, retained; last will = offline
    events              coordinator -> anyone  QoS 1

Federation and site ids are lower-case names (``[a-z0-9][a-z0-9_-]{0,62}``), so they can never
hold the MQTT separators or wildcards ``/ + #``. A site's broker user name is its site id.

Three roles: a site, the coordinator, and an observer (the read-only account of the operator's
views: ``fednca status``, the demo's monitor). An observer reads what the coordinator publishes
for everyone (``round``, ``events``), the sites' telemetry (``status/+``) and the receipts
(``receipts/+``: signed verdicts that ``events`` already tells in plain JSON, so they reveal
nothing more), and writes nothing: a stolen observer password can neither forge nor flood.

The access rules are one table per role (:func:`rules`). :func:`allowed` evaluates that table and
``broker/mosquitto.py`` writes the same table into mosquitto's ACL file, so the in-memory broker and
mosquitto enforce one policy. Anything no rule grants is denied.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from .errors import FedNCAError

ROOT = "fednca"
_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

SITE = "site"
COORDINATOR = "coordinator"
OBSERVER = "observer"
ROLES = (SITE, COORDINATOR, OBSERVER)

Kind = Literal["round", "model", "updates", "receipts", "status", "events"]
Action = Literal["read", "write", "subscribe"]
_PER_SITE = ("updates", "receipts", "status")
_GLOBAL = ("round", "model", "events")


class TopicError(FedNCAError, ValueError):
    """An id or a topic name is not one this federation can use; the message names it."""


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches the MQTT ``topic_filter`` (``+`` one level, ``#`` the rest).

    Topics starting with ``$`` match only filters that name them: ``#`` and ``+`` at the first
    level skip ``$SYS`` as the MQTT specification asks.
    """
    want, have = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and want[0] in ("+", "#"):
        return False
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


def check_id(value: object, *, what: str) -> str:
    """Return ``value`` if it is a valid federation or site id, else raise :class:`TopicError`."""
    if not isinstance(value, str) or _ID.fullmatch(value) is None:
        raise TopicError(
            f"{what} {value!r} is not a valid id: use 1-63 characters from a-z 0-9 _ -, "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """The topic names of one federation."""

    federation: str

    def __post_init__(self) -> None:
        check_id(self.federation, what="federation")

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.federation}/"

    @property
    def round(self) -> str:
        return self.prefix + "round"

    @property
    def model(self) -> str:
        return self.prefix + "model"

    @property
    def events(self) -> str:
        return self.prefix + "events"

    def updates(self, site: str) -> str:
        return self.prefix + "updates/" + check_id(site, what="site")

    def receipts(self, site: str) -> str:
        return self.prefix + "receipts/" + check_id(site, what="site")

    def status(self, site: str) -> str:
        return self.prefix + "status/" + check_id(site, what="site")

    # Filters the coordinator subscribes to.
    @property
    def all_updates(self) -> str:
        return self.prefix + "updates/+"

    @property
    def all_status(self) -> str:
        return self.prefix + "status/+"

    def parse(self, topic: str) -> ParsedTopic:
        """Split a concrete topic of this federation into (kind, site); raise on anything else."""
        if not isinstance(topic, str) or not topic.startswith(self.prefix):
            raise TopicError(f"topic {topic!r} is not under {self.prefix!r}")
        parts = topic[len(self.prefix):].split("/")
        if len(parts) == 1 and parts[0] in _GLOBAL:
            return ParsedTopic(kind=parts[0], site=None)  # type: ignore[arg-type]
        if len(parts) == 2 and parts[0] in _PER_SITE:
            site = check_id(parts[1], what="site")
            return ParsedTopic(kind=parts[0], site=site)  # type: ignore[arg-type]
        raise TopicError(f"topic {topic!r} is not a known {self.federation!r} topic")


@dataclass(frozen=True)
class ParsedTopic:
    kind: Kind
    site: str | None  # None for round, model and events


@dataclass(frozen=True)
class Rule:
    """Grant ``access`` ("read" or "write") on the topics matched by ``topic_filter``."""

    access: Literal["read", "write"]
    topic_filter: str


def rules(*, role: str, user: str, federation: str) -> tuple[Rule, ...]:
    """The access rules of one broker user. A site's user name is its site id; an observer
    writes nothing."""
    t = Topics(federation)
    if role == SITE:
        site = check_id(user, what="site")
        return (
            Rule("write", t.updates(site)),
            Rule("write", t.status(site)),
            Rule("read", t.round),
            Rule("read", t.model),
            Rule("read", t.receipts(site)),
        )
    if role == COORDINATOR:
        return (
            Rule("read", t.all_updates),
            Rule("read", t.all_status),
            Rule("write", t.round),
            Rule("write", t.prefix + "receipts/+"),
            Rule("write", t.events),
            Rule("write", t.model),
        )
    if role == OBSERVER:
        return (
            Rule("read", t.round),
            Rule("read", t.all_status),
            Rule("read", t.events),
            Rule("read", t.prefix + "receipts/+"),
            Rule("read", t.model),  # last: the observer's first lines read as before the topic came
        )
    raise TopicError(f"role {role!r} is not one of {ROLES}")


def is_filter(topic: str) -> bool:
    return "+" in topic or "#" in topic


def allowed(*, user: str, role: str, action: Action, topic: str, federation: str) -> bool:
    """Whether ``user`` in ``role`` may do ``action`` on ``topic``.

    ``write``: publish to the concrete topic. ``read``: receive a message published on the
    concrete topic. ``subscribe``: subscribe with the filter ``topic``; granted only when one read
    rule covers every topic the filter can match, so a site's ``receipts/+`` is refused even though
    it may read ``receipts/<own id>``. (mosquitto 2.0's ACL file grants every subscription and
    applies the read rule to each message instead; either way nothing unreadable is delivered.)
    """
    if action not in ("read", "write", "subscribe"):
        raise TopicError(f"action {action!r} is not read, write or subscribe")
    if action != "subscribe" and (is_filter(topic) or not topic):
        return False
    try:
        granted = rules(role=role, user=user, federation=federation)
    except TopicError:
        return False
    need = "read" if action == "subscribe" else action
    for rule in granted:
        if rule.access != need:
            continue
        if action == "subscribe":
            # The filter, taken literally, must be matched by the rule: '+' in the rule covers
            # a literal '+' in the filter, a concrete level in the rule covers nothing wider.
            if _filter_covered(rule.topic_filter, topic):
                return True
        elif matches(rule.topic_filter, topic):
            return True
    return False


def _filter_covered(rule: str, requested: str) -> bool:
    r_levels, q_levels = rule.split("/"), requested.split("/")
    if "#" in r_levels:
        raise TopicError(f"rule {rule!r}: '#' rules are not used")
    if len(r_levels) != len(q_levels):
        return False
    # '+' in a rule covers one level (a name or '+'), never '#', which also spans the parent
    # level and any depth below.
    return all(r == q or (r == "+" and q != "#") for r, q in zip(r_levels, q_levels))
