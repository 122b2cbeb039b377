"""A session belongs to its user: another authenticated user cannot take it over.

Run on both brokers. The in-memory broker refuses a client id bound to another user with
ConnectRefused; mosquitto, with the ids bound (``use_username_as_clientid``), gives the intruder
its own user name as client id instead. Either way the owner keeps its one connection and goes on
receiving. A message that must arrive after the attempt is the marker: no test waits for
something not to happen.
"""

from __future__ import annotations

import pytest

from fednca import topics
from fednca.topics import Topics
from fednca.transport import ConnectRefused, SubscribeRefused
from fednca.transport.base import NOT_AUTHORIZED
from fednca.transport.memory import MemoryBroker
from fednca.transport.mqtt import MqttClient
from fednca_broker.mosquitto import render_conf

FED = "fed"
SITES = ("site-a", "site-b")
T = Topics(FED)
WAIT = 5.0


class Memory:
    refuses = True

    def __init__(self) -> None:
        self.broker = MemoryBroker(federation=FED)
        for user in ("coordinator", *SITES):
            role = topics.COORDINATOR if user == "coordinator" else topics.SITE
            self.broker.add_user(user, password=f"{user}-secret", role=role)

    def make(self, user: str, client_id: str, **kwargs):
        return self.broker.client(client_id=client_id, username=user, password=f"{user}-secret", **kwargs)


class Mosquitto:
    refuses = False

    def __init__(self, running) -> None:
        self.running = running

    def make(self, user: str, client_id: str, **kwargs):
        return MqttClient(url=self.running.url, client_id=client_id, username=user,
                          password=self.running.passwords[user], reconnect_min_delay=0.05,
                          reconnect_max_delay=0.2, **kwargs)  # fmt: skip


@pytest.fixture(params=["memory", "mosquitto"])
def broker(request):
    if request.param == "memory":
        harness = Memory()
    else:
        harness = Mosquitto(request.getfixturevalue("mosquitto_factory")(federation=FED, sites=SITES,
                                                                          bind_client_ids=True))  # fmt: skip
    made = []

    def make(user, client_id, **kwargs):
        client = harness.make(user, client_id, **kwargs)
        made.append(client)
        return client

    harness.client = make
    yield harness
    for client in made:
        client.disconnect()


def receive(client):
    message = client.receive(WAIT)
    assert message is not None, f"{client.client_id} received nothing within {WAIT} s"
    client.ack(message)
    return message


def owner_and_coordinator(broker, owner_id):
    owner = broker.client("site-a", owner_id)
    assert owner.connect(WAIT)
    owner.subscribe(T.receipts("site-a"), 1)
    coordinator = broker.client("coordinator", "coordinator")
    assert coordinator.connect(WAIT)
    coordinator.publish(T.receipts("site-a"), b"before").result(WAIT)
    assert receive(owner).payload == b"before"
    return owner, coordinator


def attempt(broker, user, client_id):
    intruder = broker.client(user, client_id, clean_start=True)
    if broker.refuses:
        with pytest.raises(ConnectRefused, match="bound to another user"):
            intruder.connect(WAIT)
    else:
        assert intruder.connect(WAIT)  # mosquitto: connected, under its own user name
    return intruder


@pytest.mark.parametrize("owner_id", ["site-a", "fednca-fed-site-a"])
def test_another_user_cannot_take_over_a_session(broker, owner_id):
    owner, coordinator = owner_and_coordinator(broker, owner_id)
    intruder = attempt(broker, "site-b", owner_id)
    coordinator.publish(T.receipts("site-a"), b"after").result(WAIT)
    assert receive(owner).payload == b"after"
    # mosquitto cuts the old connection before it answers the new one: the marker, published after
    # the attempt, would have come on a second connection had the session been taken over.
    assert owner.connected and owner.connections == 1
    assert not broker.refuses or not intruder.connected


def test_the_coordinator_session_cannot_be_taken_by_a_site(broker):
    coordinator = broker.client("coordinator", "coordinator")
    assert coordinator.connect(WAIT)
    coordinator.subscribe(T.all_updates, 1)
    site = broker.client("site-a", "site-a")
    assert site.connect(WAIT)
    attempt(broker, "site-b", "coordinator")
    site.publish(T.updates("site-a"), b"update").result(WAIT)
    assert receive(coordinator).payload == b"update"
    assert coordinator.connected and coordinator.connections == 1


def test_no_user_can_hold_another_users_id_before_it_connects(broker):
    squatter = attempt(broker, "site-b", "site-a")
    owner, coordinator = owner_and_coordinator(broker, "site-a")
    assert owner.connections == 1
    assert not broker.refuses or not squatter.connected


def test_a_user_may_still_take_back_its_own_session(broker):
    first = broker.client("site-a", "site-a")
    assert first.connect(WAIT)
    first.disconnect()
    again = broker.client("site-a", "site-a")
    assert again.connect(WAIT)
    assert again.connections == 1


def test_the_conf_binds_ids_on_every_listener():
    from fednca_broker.mosquitto import MosquittoSettings, TLSListener

    tls = TLSListener(cafile="/c/ca.pem", certfile="/c/s.pem", keyfile="/c/s.key")
    conf = render_conf(MosquittoSettings(federation=FED, folder="/srv/fed", tls=tls, bind_client_ids=True))
    blocks = conf.split("\nlistener ")[1:]
    assert len(blocks) == 2 and all("use_username_as_clientid true" in b for b in blocks)
    unbound = render_conf(MosquittoSettings(federation=FED, folder="/srv/fed"))
    assert "use_username_as_clientid" not in unbound


def test_with_ids_bound_no_second_view_takes_the_coordinators_account(tmp_path):
    from fednca.errors import ConfigError
    from fednca_broker.clients import broker_client
    from fednca_broker.config import CoordinatorConfig, FederationConfig, MosquittoConfig

    cfg = CoordinatorConfig(folder=tmp_path, federation=FederationConfig(name=FED),
                            mosquitto=MosquittoConfig(bind_client_ids=True))  # fmt: skip
    with pytest.raises(ConfigError, match="cut the coordinator off"):
        broker_client(cfg, client_id="fednca-status-1", clean_start=True)


def test_an_observer_reads_what_the_views_show_and_writes_nothing():
    broker = MemoryBroker(federation=FED)
    broker.add_user("coordinator", password="c", role=topics.COORDINATOR)
    broker.add_user("site-a", password="a", role=topics.SITE)
    broker.add_user("watcher", password="w", role=topics.OBSERVER)
    watcher = broker.client(client_id="watcher", username="watcher", password="w")
    assert watcher.connect(WAIT)
    for topic_filter in (T.round, T.all_status, T.events, T.prefix + "receipts/+"):
        watcher.subscribe(topic_filter, 1)
    with pytest.raises(SubscribeRefused):
        watcher.subscribe(T.all_updates, 1)
    coordinator = broker.client(client_id="coordinator", username="coordinator", password="c")
    site = broker.client(client_id="site-a", username="site-a", password="a")
    assert coordinator.connect(WAIT) and site.connect(WAIT)
    site.publish(T.status("site-a"), b"idle", retain=True).result(WAIT)
    coordinator.publish(T.receipts("site-a"), b"receipt").result(WAIT)
    assert [receive(watcher).payload for _ in range(2)] == [b"idle", b"receipt"]
    for topic in (T.round, T.events, T.status("site-a"), T.updates("site-a"), T.receipts("site-a")):
        handle = watcher.publish(topic, b"forged")
        assert handle.wait(WAIT) and handle.reason_code == NOT_AUTHORIZED, topic
    assert not any(topics.allowed(user="watcher", role=topics.OBSERVER, action="write", topic=t, federation=FED)
                   for t in (T.round, T.events, T.status("site-a"), T.updates("site-a"), T.receipts("site-a")))


# -- the files `fednca coordinator init` writes, with nothing turned on by hand -------------------------


@pytest.fixture
def federation(tmp_path):
    """A federation made by init and enroll (default configuration), its own mosquitto running."""
    from fednca.keys import SiteKeys
    from fednca_app import harness
    from fednca_app.cli import main
    from fednca_broker.config import load_config

    if harness.mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    folder = tmp_path / "fed"
    url = f"mqtt://127.0.0.1:{harness.free_port()}"
    assert main(["coordinator", "init", str(folder), "--federation", FED, "--broker", url]) == 0
    for site in SITES:
        key = bytes(SiteKeys.generate().verify_key).hex()
        assert main(["coordinator", "enroll", str(folder), site, key, "--out", str(tmp_path / site)]) == 0
    cfg = load_config(folder / "coordinator.yaml")
    broker = harness.Mosquitto.for_coordinator(cfg)
    broker.start()
    made = []

    def client(user, client_id, **kwargs):
        password = (tmp_path / user / "mqtt-password").read_text().strip()
        made.append(MqttClient(url=url, client_id=client_id, username=user, password=password,
                               reconnect_min_delay=0.05, reconnect_max_delay=0.2, **kwargs))  # fmt: skip
        return made[-1]

    yield cfg, client
    for c in made:
        c.disconnect()
    broker.stop()


def coordinator_with_a_site(cfg, client):
    from fednca_broker.clients import broker_client

    coordinator = broker_client(cfg)
    assert coordinator.connect(WAIT)
    coordinator.subscribe(T.all_updates, 1)
    site = client("site-a", f"fednca-{FED}-site-a")
    assert site.connect(WAIT)
    return coordinator, site


def test_by_default_no_site_takes_over_the_coordinators_or_another_sites_session(federation):
    cfg, client = federation
    assert cfg.mosquitto.bind_client_ids
    assert "use_username_as_clientid true" in cfg.mosquitto_settings().conf_path.read_text()
    coordinator, site = coordinator_with_a_site(cfg, client)
    try:
        site.subscribe(T.receipts("site-a"), 1)
        for n, stolen in enumerate((cfg.client_id, f"fednca-{FED}-site-a")):
            intruder = client("site-b", stolen, clean_start=True)
            assert intruder.connect(WAIT)  # under its own user name: nobody's session but its own
            site.publish(T.updates("site-a"), b"update %d" % n).result(WAIT)
            assert receive(coordinator).payload == b"update %d" % n
            coordinator.publish(T.receipts("site-a"), b"receipt %d" % n).result(WAIT)
            assert receive(site).payload == b"receipt %d" % n
            intruder.disconnect()
        assert coordinator.connections == 1 and site.connections == 1
    finally:
        coordinator.disconnect()


def test_fednca_status_beside_the_running_coordinator_leaves_its_session_alone(federation, capsys):
    """Two status views at once share the observer's one session and both print the table; the
    coordinator keeps its one connection throughout."""
    import json

    from fednca_app.cli import main
    from fednca_broker.clients import observer_client
    from fednca_broker.config import STATUS_OBSERVER

    cfg, client = federation
    coordinator, site = coordinator_with_a_site(cfg, client)
    try:
        site.publish(T.status("site-a"), b"offline", retain=True).result(WAIT)
        other = observer_client(cfg, STATUS_OBSERVER)  # another fednca status, already running
        assert other.client_id == STATUS_OBSERVER and other.connect(WAIT)
        capsys.readouterr()
        assert main(["status", str(cfg.folder), "--json", "--wait", "1.0"]) == 0
        view = json.loads(capsys.readouterr().out)
        assert [(s["site"], s["state"]) for s in view["sites"]] == [("site-a", "offline")]
        other.subscribe(T.all_status, 1)  # the earlier view, back in its session, still reads the table
        assert receive(other).topic == T.status("site-a")
        other.disconnect()
        site.publish(T.updates("site-a"), b"after the views").result(WAIT)
        assert receive(coordinator).payload == b"after the views"
        assert coordinator.connected and coordinator.connections == 1
    finally:
        coordinator.disconnect()
