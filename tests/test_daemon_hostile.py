"""The daemon under hostile conditions: a wrong clock, a full disk, an unusable state folder,
damaged files, a broker that refuses the site, a broker that loses an update it took.

In each case the daemon stays up, says what is wrong in one line per distinct problem (repeats
not logged), keeps what it has stored, and recovers once the condition clears. The service runs
in a thread of this process on the in-memory broker; its clocks are the tests' own.
"""

from __future__ import annotations

import errno
import json
import logging
import os

import pytest

from daemon_support import FakeCoordinator, Federation, tiny_weights, wait_for
from fednca.atomic import write_bytes
from fednca.notify import Notifier
from fednca.topics import COORDINATOR, SITE, Topics
from fednca.transport.base import PublishHandle
from fednca.transport.memory import MemoryBroker
from test_daemon_service import T0, FakeSensors, Running, Wall, status_of

RETRY = {"retry_base_s": 0.05}


@pytest.fixture
def fed(tmp_path):
    return Federation(tmp_path, sites=("site-a",))


@pytest.fixture
def broker():
    return MemoryBroker()


@pytest.fixture
def coordinator_clock():
    return Wall(T0)


@pytest.fixture
def coordinator(fed, broker, coordinator_clock):
    client = broker.client(client_id="coordinator", username="coordinator", password="c")
    if broker.federation is not None:
        broker.add_user("coordinator", password="c", role=COORDINATOR)
    client.connect()
    c = FakeCoordinator(client=client, federation=fed.federation, keys=fed.coordinator, registry=fed.registry,
                        clock=coordinator_clock)
    yield c.start()
    c.stop()


@pytest.fixture
def lines(caplog):
    """The daemon's log lines at WARNING and above, as text."""
    caplog.set_level(logging.INFO, logger="fednca.daemon")
    return lambda: [r.getMessage() for r in caplog.records
                    if r.name == "fednca.daemon" and r.levelno >= logging.WARNING]


def infos(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fednca.daemon" and r.levelno == logging.INFO]


class Disk:
    """The state folder's writer; ``full`` makes every write fail with ``code`` (a full disk by
    default; ``EACCES`` stands for a folder the daemon's user may not write, which root can)."""

    def __init__(self, code: int = errno.ENOSPC) -> None:
        self.code = code
        self.full = False
        self.refused = 0

    def __call__(self, path, data, *, mode=0o644) -> None:
        if self.full:
            self.refused += 1
            raise OSError(self.code, os.strerror(self.code), str(path))
        write_bytes(path, data, mode=mode)


class Watchdog(Notifier):
    """A notifier that counts watchdog pings (no systemd here)."""

    def __init__(self) -> None:
        super().__init__(env={})
        self.watchdog_interval = 0.05
        self.pings = 0

    def watchdog(self) -> bool:
        self.pings += 1
        return True


def slow_round(coordinator: FakeCoordinator, epochs: int = 1000) -> None:
    coordinator.train = coordinator.train.__class__(**{**coordinator.train.to_dict(), "local_epochs": epochs})


# ------------------------------------------------------------------------------------- clocks


@pytest.mark.parametrize("skew", [+7200.0, -7200.0])
def test_a_site_whose_clock_is_two_hours_off_trains_and_submits_by_the_time_left(fed, broker, coordinator, skew):
    site_clock = Wall(T0 + skew)
    d = Running(fed, broker, wall=site_clock)
    wait_for(lambda: d.service.client.connected, what="connected")
    slow_round(coordinator)
    coordinator.announce(round=1, deadline=T0 + 600, weights=tiny_weights())  # live: 600 s left
    wait_for(lambda: d.state.steps >= 5, what="training")
    assert d.state.phase == "training" and d.state.done_round == -1, "not taken for a round past its deadline"
    assert abs(d.service.inbox.clock_offset_s - skew) < 3
    wait_for(lambda: abs(status_of(broker).get("clock_offset_s", 0) - skew) < 3, what="offset in the telemetry")
    site_clock.advance(600)  # the round's time is up by the site's own clock, whatever it reads
    got = wait_for(lambda: coordinator.accepted.get(("site-a", 1)), what="partial update")
    assert got.partial and got.steps >= 5
    wait_for(lambda: d.state.phase == "idle" and d.state.last_receipt == "accepted", what="receipt")
    d.stop()


def test_a_round_announced_with_no_time_left_is_not_trained_and_says_so(fed, broker, coordinator, caplog, lines):
    d = Running(fed, broker, wall=Wall(T0 - 7200))  # by its own clock the deadline is 2 h away
    wait_for(lambda: d.service.client.connected, what="connected")
    coordinator.announce(round=4, deadline=T0, weights=tiny_weights())  # the final model: over already
    wait_for(lambda: d.state.done_round == 4, what="round taken as over")
    assert d.state.last_receipt == "past_deadline" and d.service.worker_pid is None
    wait_for(lambda: any("round 4 came after its deadline" in m for m in infos(caplog)), what="said so")
    d.stop()


def test_an_announcement_without_seconds_left_falls_back_to_the_deadline_with_one_warning(fed, broker, coordinator,
                                                                                          lines):
    coordinator.clock = None  # an older coordinator
    wall = Wall(T0)
    d = Running(fed, broker, wall=wall, gates={"max_temperature_c": 70.0}, sensors=FakeSensors(temperature=99.0))
    coordinator.announce(round=1, deadline=T0 + 600, weights=tiny_weights())
    wait_for(lambda: d.state.round is not None, what="round 1")
    assert abs(d.state.round.deadline - (T0 + 600)) < 3  # read against the site's wall clock
    coordinator.announce(round=2, deadline=T0 + 900, weights=tiny_weights())
    wait_for(lambda: d.state.round.round == 2, what="round 2")
    said = lines()
    assert len(said) == 1 and "no seconds_left" in said[0], said
    assert d.service.inbox.clock_offset_s is None
    d.stop()


# ---------------------------------------------------------------------------------- the disk


@pytest.mark.parametrize("code, advice", [(errno.ENOSPC, "free space on its disk"),
                                          (errno.EACCES, "let the daemon's user write there")])
def test_a_full_or_unwritable_disk_is_said_once_retried_and_recovered_from(fed, broker, coordinator, lines, code,
                                                                          advice):
    disk, dog = Disk(code), Watchdog()
    disk.full = True
    d = Running(fed, broker, writer=disk, **RETRY)
    d.service.notifier = dog
    coordinator.announce(round=1, deadline=T0 + 3600, weights=tiny_weights())
    wait_for(lambda: disk.refused >= 4, what="several tries to store the announcement")
    assert d.thread.is_alive() and d.state.round is None and d.service.inbox.holding
    assert len([m for m in lines() if os.strerror(code) in m]) == 1 and len(lines()) == 1
    assert advice in lines()[0] and str(d.cfg.state_dir) in lines()[0]
    pings = dog.pings
    wait_for(lambda: dog.pings > pings, what="the watchdog still pinged")
    assert os.strerror(code) in status_of(broker)["error"]
    disk.full = False
    got = wait_for(lambda: coordinator.accepted.get(("site-a", 1)), what="the update after the disk cleared")
    assert not got.partial and got.steps > 0
    wait_for(lambda: d.state.phase == "idle", what="idle")
    assert len(lines()) == 1
    d.stop()


def test_a_receipt_that_cannot_be_saved_keeps_the_update_in_the_outbox(fed, broker, coordinator, lines):
    disk = Disk()
    coordinator.receipts = False
    coordinator.announce(round=1, deadline=T0 + 3600, weights=tiny_weights())
    d = Running(fed, broker, writer=disk, **RETRY)
    wait_for(lambda: coordinator.accepted.get(("site-a", 1)), what="delivery")
    stored = d.service.folder.outbox.entries()
    assert len(stored) == 1
    disk.full = True
    coordinator.receipts = True
    coordinator._receipt("site-a", 1, stored[0][1], None)
    wait_for(lambda: disk.refused >= 3, what="tries to save the receipt")
    assert d.service.folder.outbox.entries() == stored, "a finished update is never dropped on an error"
    assert not d.service.folder.done_path.exists() and d.thread.is_alive()
    assert len(lines()) == 1 and "No space left" in lines()[0]
    disk.full = False
    wait_for(lambda: d.service.folder.outbox.entries() == [], what="outbox emptied once the receipt is saved")
    assert d.service.folder.load_done().round == 1 and len(lines()) == 1
    d.stop()


def test_a_state_folder_that_cannot_be_opened_is_waited_for_with_the_watchdog_pinged(fed, broker, coordinator,
                                                                                     lines):
    coordinator.announce(round=1, deadline=T0 + 3600, weights=tiny_weights())
    cfg = fed.config()
    cfg.state_dir.parent.mkdir(parents=True, exist_ok=True)
    cfg.state_dir.write_bytes(b"")  # in the way: not a folder
    dog = Watchdog()
    d = Running(fed, broker, **RETRY)
    d.service.notifier = dog
    wait_for(lambda: dog.pings >= 5, what="watchdog pings while waiting")
    assert d.thread.is_alive() and len(lines()) == 1 and "state folder" in lines()[0]
    assert "not a folder" in lines()[0]
    cfg.state_dir.unlink()
    wait_for(lambda: coordinator.accepted.get(("site-a", 1)), what="the round once the folder is usable")
    assert len(lines()) == 1
    d.stop()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes whatever the permissions say")
def test_an_unwritable_state_folder_is_waited_for(fed, broker, coordinator, lines):
    cfg = fed.config()
    cfg.state_dir.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(cfg.state_dir.parent, 0o500)
    try:
        d = Running(fed, broker, **RETRY)
        wait_for(lambda: len(lines()) == 1, what="one line")
        assert "Permission denied" in lines()[0] and d.thread.is_alive()
    finally:
        os.chmod(cfg.state_dir.parent, 0o700)
    wait_for(lambda: d.state.round is not None or d.service.client.connected, what="started")
    d.stop()


def test_damaged_files_are_moved_aside_and_the_round_is_trained_anyway(fed, broker, coordinator, lines):
    coordinator.announce(round=1, deadline=T0 + 3600, weights=tiny_weights())
    state = fed.config().state_dir
    (state / "outbox").mkdir(parents=True)
    os.chmod(state, 0o700)
    (state / "done.json").write_bytes(b"{not json")
    (state / "announcement.bin").write_bytes(b"FNCA garbage")
    (state / "checkpoint.safetensors").write_bytes(b"\xff" * 40)
    entry = state / "outbox" / ("r1-" + "ab" * 16 + ".update")
    entry.write_bytes(b"")
    d = Running(fed, broker, **RETRY)
    got = wait_for(lambda: coordinator.accepted.get(("site-a", 1)), what="round 1 trained despite the damage")
    assert not got.partial and got.steps > 0
    for name in ("done.json", "announcement.bin", "checkpoint.safetensors", f"outbox/{entry.name}"):
        assert (state / f"{name}.corrupt").is_file(), name
    assert (state / "done.json.corrupt").read_bytes() == b"{not json"
    said = lines()
    for name in ("done.json", "announcement.bin", "checkpoint.safetensors", entry.name):
        assert len([m for m in said if name in m and "moved to" in m]) == 1, (name, said)
    wait_for(lambda: d.state.phase == "idle", what="idle")
    d.stop()


# -------------------------------------------------------------------------------- the broker


def test_a_refused_site_stays_up_says_so_once_and_connects_when_readmitted(fed, tmp_path, lines):
    broker = MemoryBroker(federation="fed")
    broker.add_user("site-a", password="revoked", role=SITE)  # not the password the site holds
    client = broker.client(client_id="site-a", username="site-a", password="secret")
    tries = []
    connect = client.connect
    client.connect = lambda timeout=10.0: (tries.append(1), connect(timeout))[1]
    d = Running(fed, broker, client=client, **RETRY)
    wait_for(lambda: len(tries) >= 4, what="repeated tries with a back-off")
    assert d.thread.is_alive() and not client.connected
    said = lines()
    assert len(said) == 1 and "refused site site-a" in said[0] and "revoked" in said[0], said
    assert "refused" in status_of_error(d)
    broker.add_user("site-a", password="secret", role=SITE)  # re-enrolled
    wait_for(lambda: client.connected, what="connected once readmitted")
    assert len(lines()) == 1
    d.stop()


def status_of_error(d: Running) -> str:
    return d.service._snapshot().error or ""


class LosesFirstUpdate:
    """A client whose broker acknowledges the first update and then loses it (a full queue)."""

    def __init__(self, client, topic: str) -> None:
        self._client, self._topic = client, topic
        self.lost: list[bytes] = []

    def publish(self, topic, payload, *, qos=1, retain=False):
        if topic == self._topic and not self.lost:
            self.lost.append(payload)
            handle = PublishHandle(topic)
            handle.settle(0)  # PUBACK, then nothing
            return handle
        return self._client.publish(topic, payload, qos=qos, retain=retain)

    def __getattr__(self, name):
        return getattr(self._client, name)


def test_an_update_the_broker_lost_is_sent_again_long_before_resend_s(fed, broker, coordinator):
    wall = Wall(T0)
    client = LosesFirstUpdate(broker.client(client_id="daemon-site-a"), Topics("fed").updates("site-a"))
    d = Running(fed, broker, client=client, wall=wall)
    wait_for(lambda: d.service.client.connected, what="connected")
    coordinator.announce(round=1, deadline=T0 + 600, weights=tiny_weights())
    wait_for(lambda: client.lost and d.state.phase == "submitted", what="the first update lost")
    stored = d.service.folder.outbox.entries()
    assert coordinator.deliveries == [] and len(stored) == 1
    assert client.lost == [d.service.folder.outbox.get(*stored[0])]
    assert d.cfg.outbox.resend_s == 900.0
    wall.advance(61)  # a tenth of the < 600 s left, at least 30 s: far below resend_s
    got = wait_for(lambda: coordinator.accepted.get(("site-a", 1)), what="the update sent again")
    assert got.update_id == stored[0][1] and coordinator.deliveries == [("site-a", stored[0][1])]
    wait_for(lambda: d.state.phase == "idle" and d.state.last_receipt == "accepted", what="receipt")
    d.stop()
