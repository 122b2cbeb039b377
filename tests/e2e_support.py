"""A federation of real processes on a real mosquitto, for the end-to-end and fault tests.

:class:`Federation` sets the federation up with :func:`fednca_app.harness.set_up` (as ``fednca demo
--broker`` does: ``fednca coordinator init``/``enroll``, each site's keys, bundle and daemon YAML)
with a tiny model, then runs it with :class:`fednca_app.harness.ProcessParties`: mosquitto with the
generated configuration, password file and ACL, ``fednca coordinator run`` and one ``fednca
daemon`` per site, each in a process group of its own, any of which it can kill, stop and
restart. A site may reach the broker through a link (:func:`relay`) that can go down, or through
a link of any profile (``links``); so may the coordinator (``coordinator_link``).
:class:`Listener` records what a broker user receives.

mosquitto binds client ids to users (the default), so each broker account has one session, and a
second client on an account that a running party uses would take that party's session over. So
the tests' extra clients never share a running party's account: what they only read comes
through :meth:`Federation.observe` (views of one client on the read-only observer account),
a test-only site account comes from :meth:`Federation.enroll` (the operator's ``enroll``), and a
client that must speak as a running site (to send that site's own update again) gets its account
from :meth:`Federation.borrow`, which holds the site's daemon still meanwhile.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable

from fednca.config import preset, train_preset
from fednca.keys import SiteKeys
from fednca.topics import matches
from fednca.transport.base import Message
from fednca.transport.mqtt import MqttClient
from fednca_app import harness
from fednca_app.cli import main
from fednca_app.harness.link_proxy import Link
from fednca_app.harness.links import Outages, Profile
from fednca_broker.cli import KILL_ENV
from fednca_broker.store import RoundStore
from mosquitto_fixture import MOSQUITTO

FEDERATION = "demo"
STOP_TIMEOUT = harness.STOP_TIMEOUT
MODEL = preset(input_size=16, steps=(3, 2))  # a tiny model: a round takes seconds
TRAIN = train_preset(local_epochs=1, batch_size=2)


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str,
               federation: "Federation | None" = None) -> Any:
    """Poll ``condition`` until it is truthy; fail after ``timeout`` s, naming ``what`` (a bound, not a
    measurement). With ``federation``, fail at once when one of its processes died unexpectedly."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if federation is not None:
            federation.check_alive()
        if time.monotonic() > deadline:
            tail = federation.tails() if federation is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{tail}")
        time.sleep(0.05)


HOLDING = Profile(name="relay", outages=Outages(refuse=False))  # no shaping; held while down
COORDINATOR_LINK = "coordinator"  # the name of the coordinator's link among a federation's links


def relay(*, broker_port: int) -> Link:
    """A link between one party and mosquitto that carries bytes as they come and can go down: the
    harness's link emulator with a profile that shapes nothing.

    ``outage()`` drops the connections it carries (the broker sees the party vanish and publishes
    its will) and holds the party's next connections without answering, its bytes waiting in the
    socket; ``restore()`` connects them to the broker, so the party's reconnect completes at once
    instead of after its back-off. ``stats.held`` counts the connections held.
    """
    return Link(profile=HOLDING, target_port=broker_port)


class Listener:
    """A broker client with a user's credentials that keeps every message it is sent (persistent
    session, so it also gets what was queued for it across a broker restart)."""

    def __init__(self, *, url: str, username: str, password: str, client_id: str, topics: list[str]) -> None:
        self.client = MqttClient(url=url, client_id=client_id, username=username, password=password)
        if not self.client.connect(10):
            raise AssertionError(f"{client_id}: cannot connect to {url} as {username}")
        for topic in topics:
            self.client.subscribe(topic, 1)
        self._messages: list[Message] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"listen-{client_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            message = self.client.receive(0.1)
            if message is not None:
                self.client.ack(message)
                with self._lock:
                    self._messages.append(message)

    @property
    def messages(self) -> list[Message]:
        with self._lock:
            return list(self._messages)

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, 1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


class View:
    """What one :class:`Listener` received on some topics since the view was made."""

    def __init__(self, *, listener: Listener, topics: list[str]) -> None:
        self._listener, self._topics = listener, topics
        self._start = len(listener.messages)

    @property
    def messages(self) -> list[Message]:
        return [m for m in self._listener.messages[self._start:] if any(matches(t, m.topic) for t in self._topics)]


class Federation:
    """One federation folder and the processes that run it."""

    def __init__(self, *, root: Path, sites: int, rounds: int, quorum: int, grace: float,
                 relayed: tuple[str, ...] = (), initial_model: Path | None = None, train: Any = TRAIN,
                 round_settings: dict[str, Any] | None = None, links: Mapping[str, Profile] | None = None,
                 coordinator_link: Profile | None = None) -> None:
        """``relayed`` sites reach mosquitto through a :func:`relay`, ``links`` sites through a link
        of that profile. With ``coordinator_link``, the port the federation's configuration names
        is that link's, and mosquitto listens on another port that every site (and every client of
        the test) reaches directly or through its own link: only the coordinator (and the
        harness's monitor, which reads the configuration too) crosses the coordinator's link."""
        if MOSQUITTO is None:
            raise RuntimeError("mosquitto is not installed")
        self.root = root
        self.port = harness.free_port()  # the port of the configuration's broker.url
        self.broker_port = harness.free_port() if coordinator_link is not None else self.port  # mosquitto's
        self.url = f"mqtt://127.0.0.1:{self.broker_port}"
        profiles: dict[str, Profile] = {name: HOLDING for name in relayed} | dict(links or {})
        ports = {}
        if coordinator_link is not None:
            profiles[COORDINATOR_LINK] = coordinator_link
            ports[COORDINATOR_LINK] = self.port
        self.links = harness.Links(profiles=profiles, target_port=self.broker_port, ports=ports)
        self.relays = {name: self.links[name] for name in relayed}
        site_urls = {f"site{i}": self.url for i in range(sites)} if coordinator_link is not None else {}
        site_urls |= {name: self.links[name].url for name in profiles if name != COORDINATOR_LINK}
        # Short chunks and telemetry; a site behind a link connects to it.
        self.folder_paths = harness.set_up(
            root / "work", federation=FEDERATION, sites=sites, rounds=rounds, quorum=quorum,
            url=f"mqtt://127.0.0.1:{self.port}", model=MODEL, train=train,
            grace=grace, train_images=8, seed=0, chunk_s=0.2, telemetry_s=1.0, site_urls=site_urls,
            initial_model=initial_model, round_settings=round_settings)
        self.folder = self.folder_paths.folder
        self.sites = [s.name for s in self.folder_paths.sites]
        self.site_paths = {s.name: s for s in self.folder_paths.sites}
        self.cfg = self.folder_paths.config()
        self.store = RoundStore(root=self.cfg.store_root, federation=FEDERATION)
        self.logs = root / "logs"
        self.logs.mkdir()
        self.processes = harness.ProcessParties(federation=self.folder_paths, log_dir=self.logs)
        self._listeners: list[Listener] = []
        self._clients: list[MqttClient] = []
        self._observer: Listener | None = None
        self._enrolled: dict[str, str] = {}  # test-only site accounts: name -> password

    # -- credentials and state --------------------------------------------------------------------

    def password(self, user: str) -> str:
        return self._enrolled.get(user) or self.folder_paths.password(user)

    def enroll(self, name: str) -> str:
        """A test-only site account, enrolled as an operator enrols a site (``fednca coordinator
        enroll``); its daemon never runs. Enrol before :meth:`start_broker`, or mosquitto is told
        to read its files again. Returns the name."""
        bundle = self.root / "enrolled" / name
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["coordinator", "enroll", str(self.folder), name, bytes(SiteKeys.generate().verify_key).hex(),
                         "--out", str(bundle)]) == 0, f"enrolling {name} failed"  # fmt: skip
        self._enrolled[name] = (bundle / "mqtt-password").read_text().strip()
        if self.processes.mosquitto is not None and self.processes.mosquitto.process.running():
            self.processes.mosquitto.reload()
        return name

    def observe(self, topics: list[str]) -> View:
        """What the read-only observer account (the harness monitor's) receives on these topics
        (below the federation's prefix) from now on. Every view shares one client, since the
        account has one session; it is closed by :meth:`close`."""
        full = [f"fednca/{FEDERATION}/{t}" for t in topics]
        if self._observer is None:
            user = self.folder_paths.monitor_user
            self._observer = self.listener(user, user, [])
        view = View(listener=self._observer, topics=full)
        for topic in full:
            self._observer.subscribe(topic)
        return view

    @contextlib.contextmanager
    def borrow(self, site: str, *, timeout: float = 60.0) -> Iterator[MqttClient]:
        """A client connected with ``site``'s own account while its daemon is held still.

        With one session per account the two cannot both be connected, so: once the site's outbox
        is empty (its receipts are in, so that nothing is sent again on its reconnect), its
        process group is stopped (SIGSTOP); the client takes over the site's session (kept: what
        arrives for the site meanwhile waits in it), is disconnected on leaving, and the daemon
        continues (SIGCONT) and reconnects to its session.
        """
        outbox = self.state_dir(site) / "outbox"
        wait_until(lambda: not list(outbox.glob("*.update")), timeout=timeout,
                   what=f"{site}'s outbox to empty", federation=self)
        group = self.processes.parties[site].pid
        os.killpg(group, signal.SIGSTOP)
        try:
            client = MqttClient(url=self.url, client_id=f"fednca-{FEDERATION}-{site}", username=site,
                                password=self.password(site))
            try:
                if not client.connect(10):
                    raise AssertionError(f"cannot connect to {self.url} as {site}")
                yield client
            finally:
                client.disconnect()
        finally:
            os.killpg(group, signal.SIGCONT)

    def listener(self, user: str, client_id: str, topics: list[str]) -> Listener:
        """A :class:`Listener` on these topics (below the federation's prefix); closed by :meth:`close`."""
        listener = Listener(url=self.url, username=user, password=self.password(user), client_id=client_id,
                            topics=[f"fednca/{FEDERATION}/{t}" for t in topics])
        self._clients.append(listener.client)
        self._listeners.append(listener)
        return listener

    def client(self, user: str, client_id: str) -> MqttClient:
        """A connected client with ``user``'s credentials; disconnected by :meth:`close`. An account
        no running party uses: a site whose daemon is not running, or one from :meth:`enroll`."""
        client = MqttClient(url=self.url, client_id=client_id, username=user, password=self.password(user))
        self._clients.append(client)
        if not client.connect(10):
            raise AssertionError(f"{client_id}: cannot connect to {self.url} as {user}")
        return client

    def state_dir(self, site: str) -> Path:
        return self.site_paths[site].state_dir

    def log(self, name: str) -> str:
        return self.processes.log(name)

    def records(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.store.read_log() if kind is None or r.get("kind") == kind]

    def aggregated(self, round: int) -> bool:
        return any(r["round"] == round for r in self.records("round_aggregated"))

    def site_logged(self, site: str, pattern: str) -> re.Match[str] | None:
        return re.search(pattern, self.log(site), re.MULTILINE)

    # -- processes --------------------------------------------------------------------------------

    def start_broker(self) -> None:
        self.processes.start_broker(port=None if self.broker_port == self.port else self.broker_port)

    def start_coordinator(self, *, kill_after: str | None = None) -> None:
        """``fednca coordinator run``; with ``kill_after``, it SIGKILLs itself at that point of a round."""
        env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
        if kill_after:
            env[KILL_ENV] = kill_after
        self.processes.start_coordinator(env=env, expect_exit=bool(kill_after))

    def start_site(self, site: str, *, wrapper: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        """``site``'s daemon; ``wrapper`` runs it under another program (``faketime``), ``env`` adds to its environment."""
        self.processes.start_site(site, wrapper=wrapper, env=env)

    def start(self, *, kill_coordinator_after: str | None = None) -> None:
        """The coordinator and every site (after :meth:`start_broker`)."""
        self.start_coordinator(kill_after=kill_coordinator_after)
        for site in self.sites:
            self.start_site(site)

    def returncode(self, name: str) -> int | None:
        return self.processes.returncode(name)

    def kill(self, name: str) -> None:
        """SIGKILL the party's whole process group (a daemon with its trainer): a power cut."""
        self.processes.kill(name)

    def stop(self, name: str) -> int:
        """SIGTERM and wait; the exit status."""
        try:
            return self.processes.stop(name)
        except harness.HarnessError as e:
            raise AssertionError(str(e)) from None

    def restart(self, name: str) -> None:
        self.processes.restart(name)

    def check_alive(self) -> None:
        """Fail when a party exited that was not killed or stopped on purpose (the coordinator may
        finish with status 0)."""
        failed = self.processes.failure()
        if failed is not None:
            raise AssertionError(failed)

    def tails(self, *names: str) -> str:
        return self.processes.tails(*names)

    def close(self) -> None:
        """Stop every process this federation started, gently, then by SIGKILL to each group; fail if
        any process of those groups is left alive."""
        for listener in self._listeners:
            listener.stop()
        for client in self._clients:
            client.disconnect()
        try:
            left = self.processes.close()
        finally:
            self.links.close()
        assert not left, f"processes left behind: {left}"
