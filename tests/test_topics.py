"""Topic names, id validation, parsing and the access rules (pure)."""

import pytest

from fednca import topics
from fednca.topics import COORDINATOR, SITE, TopicError, Topics, allowed

F = "clinics"
T = Topics(F)


def test_topic_names():
    assert T.round == "fednca/clinics/round"
    assert T.events == "fednca/clinics/events"
    assert T.updates("site-1") == "fednca/clinics/updates/site-1"
    assert T.receipts("a_b") == "fednca/clinics/receipts/a_b"
    assert T.status("x") == "fednca/clinics/status/x"
    assert T.all_updates == "fednca/clinics/updates/+"
    assert T.all_status == "fednca/clinics/status/+"


@pytest.mark.parametrize(
    "bad", ["", "A", "site/1", "site+", "s#", "-lead", "_lead", "a" * 64, "é", "a b", None, 7]
)
def test_invalid_ids_are_refused(bad):
    with pytest.raises(TopicError):
        topics.check_id(bad, what="site")
    with pytest.raises(TopicError):
        Topics(bad)


def test_longest_valid_id():
    assert topics.check_id("a" * 63, what="site") == "a" * 63


def test_invalid_site_in_topic_name():
    with pytest.raises(TopicError, match="site 'a/b'"):
        T.updates("a/b")


@pytest.mark.parametrize(
    "topic, kind, site",
    [
        ("fednca/clinics/round", "round", None),
        ("fednca/clinics/events", "events", None),
        ("fednca/clinics/updates/s1", "updates", "s1"),
        ("fednca/clinics/receipts/s1", "receipts", "s1"),
        ("fednca/clinics/status/s-2", "status", "s-2"),
    ],
)
def test_parse_round_trip(topic, kind, site):
    parsed = T.parse(topic)
    assert (parsed.kind, parsed.site) == (kind, site)


@pytest.mark.parametrize(
    "topic",
    [
        "fednca/other/round",
        "fednca/clinics/round/x",
        "fednca/clinics/updates",
        "fednca/clinics/updates/+",
        "fednca/clinics/updates/a/b",
        "fednca/clinics/status/BAD",
        "fednca/clinics/nothing",
        "fednca/clinics/events/s1",
        "",
    ],
)
def test_parse_refuses_unknown_topics(topic):
    with pytest.raises(TopicError):
        T.parse(topic)


# (user, role, action, topic, expected): the DESIGN's table, written out case by case.
CASES = [
    ("s1", SITE, "write", T.updates("s1"), True),
    ("s1", SITE, "write", T.status("s1"), True),
    ("s1", SITE, "read", T.round, True),
    ("s1", SITE, "read", T.receipts("s1"), True),
    ("s1", SITE, "write", T.updates("s2"), False),
    ("s1", SITE, "write", T.status("s2"), False),
    ("s1", SITE, "read", T.receipts("s2"), False),
    ("s1", SITE, "read", T.updates("s2"), False),
    ("s1", SITE, "read", T.updates("s1"), False),
    ("s1", SITE, "read", T.status("s2"), False),
    ("s1", SITE, "read", T.events, False),
    ("s1", SITE, "write", T.round, False),
    ("s1", SITE, "write", T.receipts("s1"), False),
    ("s1", SITE, "write", T.events, False),
    ("s1", SITE, "write", "fednca/other/updates/s1", False),
    ("s1", SITE, "read", "fednca/other/round", False),
    ("coordinator", COORDINATOR, "read", T.updates("s1"), True),
    ("coordinator", COORDINATOR, "read", T.status("s2"), True),
    ("coordinator", COORDINATOR, "write", T.round, True),
    ("coordinator", COORDINATOR, "write", T.receipts("s1"), True),
    ("coordinator", COORDINATOR, "write", T.events, True),
    ("coordinator", COORDINATOR, "write", T.updates("s1"), False),
    ("coordinator", COORDINATOR, "write", T.status("s1"), False),
    ("coordinator", COORDINATOR, "read", T.receipts("s1"), False),
    ("coordinator", COORDINATOR, "read", T.round, False),
    ("coordinator", COORDINATOR, "read", T.events, False),
    ("coordinator", COORDINATOR, "write", "fednca/other/round", False),
    ("coordinator", COORDINATOR, "read", "$SYS/broker/uptime", False),
    ("s1", SITE, "subscribe", T.round, True),
    ("s1", SITE, "subscribe", T.receipts("s1"), True),
    ("s1", SITE, "subscribe", "fednca/clinics/receipts/+", False),
    ("s1", SITE, "subscribe", "fednca/clinics/#", False),
    ("s1", SITE, "subscribe", "#", False),
    ("coordinator", COORDINATOR, "subscribe", T.all_updates, True),
    ("coordinator", COORDINATOR, "subscribe", T.updates("s9"), True),
    ("coordinator", COORDINATOR, "subscribe", T.all_status, True),
    ("coordinator", COORDINATOR, "subscribe", "fednca/clinics/updates/#", False),
    ("coordinator", COORDINATOR, "subscribe", "fednca/clinics/+/s1", False),
    ("s1", "admin", "read", T.round, False),
    ("BAD/", SITE, "read", T.round, False),
    ("s1", SITE, "write", "fednca/clinics/updates/+", False),
]


@pytest.mark.parametrize("user, role, action, topic, expected", CASES)
def test_allowed_table(user, role, action, topic, expected):
    assert allowed(user=user, role=role, action=action, topic=topic, federation=F) is expected


def test_unknown_action_is_an_error():
    with pytest.raises(TopicError, match="action"):
        allowed(user="s1", role=SITE, action="delete", topic=T.round, federation=F)


def test_rules_are_the_single_table():
    site_rules = topics.rules(role=SITE, user="s1", federation=F)
    assert {(r.access, r.topic_filter) for r in site_rules} == {
        ("write", T.updates("s1")),
        ("write", T.status("s1")),
        ("read", T.round),
        ("read", T.model),
        ("read", T.receipts("s1")),
    }
    observer_rules = topics.rules(role=topics.OBSERVER, user="fednca-status", federation=F)
    assert {(r.access, r.topic_filter) for r in observer_rules} == {
        ("read", T.round), ("read", T.model), ("read", T.all_status), ("read", T.events),
        ("read", T.prefix + "receipts/+"),
    }  # and no write
    with pytest.raises(TopicError, match="role"):
        topics.rules(role="admin", user="x", federation=F)
