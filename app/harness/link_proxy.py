"""The link emulator's sockets: a TCP proxy on 127.0.0.1 that carries a party's bytes to the broker
as a bad link would (this kernel has no netem, so the link is emulated in user space).

A :class:`Link` listens on a free 127.0.0.1 port and forwards each connection to ``target_port``
on 127.0.0.1, both directions through the pure schedule of :mod:`.links`: every chunk read is
given its arrival time by the link's lane (bandwidth, latency, jitter, shared by all the link's
connections) and written when that time comes. When an outage starts, every connection the link
carries is dropped; while it lasts, a new connection is refused (accepted and closed at once) or,
with ``refuse: false``, held unanswered until the link is up again. A cut closes a connection after
part of a chunk. :meth:`Link.outage` starts an outage now (a partition on demand) and :meth:`Link.restore` ends it,
:meth:`Links.storm` drops every connection of every link at once (a reconnect storm).
:meth:`Link.on_publish` runs an action (an outage, say) once a given number of bytes of a PUBLISH on
a given topic has reached the target: the bytes going up are scanned for MQTT packet headers
(:mod:`.mqtt_scan`), so a test can cut a site's upload in its middle, whenever the site gets there.
Both directions are scanned: :attr:`Link.publishes` counts the PUBLISH packets that began to cross
each way, per topic (a retransmission or a second copy of a retained message shows there).

Threads, not asyncio, as the relay of the end-to-end tests: one accepts, one watches the outage
windows, and each connection has a reader and a writer per direction. Reads are bounded (a small
queue per direction) so a fast sender is held back by the link, as TCP would hold it. Every
thread ends on :meth:`Link.close`; the proxy only ever talks to 127.0.0.1.
"""

from __future__ import annotations

import queue
import socket
from collections import Counter
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from .links import Cutter, OutagePlan, Profile, cutters, lanes
from .mqtt_scan import PUBLISH, PacketScanner, PacketStart

CHUNK = 1024  # bytes read at a time: at 64 kbit/s a chunk takes 128 ms to cross
QUEUED = 16  # chunks in flight per direction before the reader stops reading
UNTIL_RESTORED_S = 1e9  # an outage with no length given lasts until restore(): in effect, for ever

__all__ = ["CHUNK", "Link", "LinkStats", "Links", "PublishTrigger"]


@dataclass
class LinkStats:
    """What a link did, for tests and reports."""

    connections: int = 0  # connections forwarded to the target
    refused: int = 0  # connections refused while the link was down
    held: int = 0  # connections held while the link was down
    dropped: int = 0  # connections dropped by an outage or a storm
    outages: int = 0  # times the link went down (profile windows and :meth:`Link.outage`)
    cut: int = 0  # connections cut mid-message
    up_bytes: int = 0  # delivered to the target
    down_bytes: int = 0  # delivered to the party


@dataclass(kw_only=True)
class PublishTrigger:
    """``action`` runs once, when ``after_bytes`` of a PUBLISH on ``topic`` (its whole length, if
    shorter) have reached the target; ``fired`` is set just before."""

    topic: str
    after_bytes: int
    action: Callable[[], None]
    fired: threading.Event = field(default_factory=threading.Event)


class _Upstream:
    """What one connection's party has sent, as packets: where each trigger's moment falls in the
    stream (found by the reader) and how far the stream has been delivered (the writer)."""

    def __init__(self) -> None:
        self.scanner = PacketScanner()
        self.marks: list[tuple[int, PublishTrigger]] = []  # (stream offset, trigger), under the link's lock
        self.delivered = 0


class _Connection:
    def __init__(self, *, party: socket.socket, target: socket.socket) -> None:
        self.sockets = (party, target)
        self.closed = threading.Event()
        self.upstream = _Upstream()
        self.downstream = PacketScanner()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for s in self.sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already gone
            s.close()


class Link:
    """One emulated link from a party to ``target_port`` on 127.0.0.1; ``port`` is where the party connects."""

    def __init__(self, *, profile: Profile, target_port: int, clock: Callable[[], float] = time.monotonic,
                 port: int = 0) -> None:
        self.profile = profile
        self.target_port = target_port
        self._clock = clock
        self._start = clock()
        self.plan = OutagePlan(outages=profile.outages)
        self._lanes = lanes(profile)
        self._lock = threading.Lock()
        self._open: list[_Connection] = []
        self._count = 0
        self._triggers: list[PublishTrigger] = []
        self.publishes: Counter[tuple[str, str | None]] = Counter()  # (direction, topic): PUBLISH packets begun
        self.stats = LinkStats()
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", port))  # 0: a free port
        self.port: int = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, name="link-accept", daemon=True),
                         threading.Thread(target=self._watch, name="link-outages", daemon=True)]
        for t in self._threads:
            t.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def now(self) -> float:
        """Seconds since the link started: the time of its profile's outage windows."""
        return self._clock() - self._start

    def down(self) -> bool:
        return self.plan.down(self.now())

    def outage(self, for_s: float | None = None) -> None:
        """The link goes down now for ``for_s`` seconds, or until :meth:`restore` when not given
        (its connections are dropped at once)."""
        now = self.now()
        self.plan.add(now, now + (UNTIL_RESTORED_S if for_s is None else for_s))
        self.drop()
        self._wake.set()

    def on_publish(self, topic: str, *, after_bytes: int, action: Callable[[], None]) -> PublishTrigger:
        """Run ``action`` (in a thread of the link) once ``after_bytes`` of the next PUBLISH on
        ``topic`` sent up this link have reached the target."""
        trigger = PublishTrigger(topic=topic, after_bytes=after_bytes, action=action)
        with self._lock:
            self._triggers.append(trigger)
        return trigger

    def restore(self) -> None:
        """The link comes up now: outages started by :meth:`outage` end (the profile's stay)."""
        self.plan.end_added(self.now())
        self._wake.set()

    def drop(self) -> int:
        """Drop every connection the link carries; how many."""
        with self._lock:
            conns, self._open = self._open, []
            self.stats.dropped += len(conns)
        for c in conns:
            c.close()
        return len(conns)

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
        except OSError:
            pass
        self._listener.close()
        self.drop()
        for t in self._threads:
            t.join(timeout=5)

    # -- threads ----------------------------------------------------------------------------

    def _watch(self) -> None:
        """Drop the link's connections when each outage starts, and count the outages."""
        was_down = False
        while not self._closed.is_set():
            now = self.now()
            window = self.plan.next_window(now)
            wait = None if window is None else (window[0] - now if window[0] > now else window[1] - now)
            self._wake.wait(wait)
            self._wake.clear()
            down = not self._closed.is_set() and self.down()
            if down and not was_down:
                self._count_stat("outages", 1)
            if down:
                self.drop()
            was_down = down

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                party, _ = self._listener.accept()
            except OSError:
                return
            if self.down():
                refuse = self.profile.outages.refuse
                self._count_stat("refused" if refuse else "held", 1)
                if refuse:
                    party.close()
                    continue
            threading.Thread(target=self._serve, args=(party,), name="link-conn", daemon=True).start()

    def _serve(self, party: socket.socket) -> None:
        while self.down() and not self._closed.is_set():  # held: wait for the link to come up
            window = self.plan.next_window(self.now())
            # polled, as :meth:`restore` may end the outage early (or an injected clock jump ahead)
            self._closed.wait(0.05 if window is None else min(0.1, max(0.01, window[1] - self.now())))
        try:
            target = socket.create_connection(("127.0.0.1", self.target_port), timeout=5.0)
            target.settimeout(None)
        except OSError:
            party.close()  # the broker is down: the party retries
            return
        conn = _Connection(party=party, target=target)
        with self._lock:
            if self._closed.is_set():
                conn.close()
                return
            index, self._count = self._count, self._count + 1
            self._open.append(conn)
            self.stats.connections += 1
        cut = cutters(self.profile, connection=index)
        for d, (src, dst) in (("up", (party, target)), ("down", (target, party))):
            chunks: queue.Queue[tuple[float, bytes, str | None]] = queue.Queue(maxsize=QUEUED)
            threading.Thread(target=self._read, args=(conn, src, chunks, d, cut[d]), name=f"link-{d}-read",
                             daemon=True).start()
            threading.Thread(target=self._write, args=(conn, dst, chunks, d), name=f"link-{d}-write",
                             daemon=True).start()

    def _read(self, conn: _Connection, src: socket.socket, chunks: queue.Queue, d: str,
              cutter: Cutter | None) -> None:
        while not conn.closed.is_set():
            try:
                data = src.recv(CHUNK)
            except OSError:
                data = b""
            if d == "up" and data:
                self._scan(conn.upstream, data)
            elif data:
                self._count_publishes("down", conn.downstream.feed(data))
            cut = None if cutter is None or not data else cutter.cut_in(len(data))
            end = "cut" if cut is not None else ("eof" if not data else None)
            data = data if cut is None else data[:cut]
            with self._lock:
                at = self._lanes[d].send(len(data), self.now())
            if not _put(conn, chunks, (at, data, end)) or end is not None:
                return

    def _write(self, conn: _Connection, dst: socket.socket, chunks: queue.Queue, d: str) -> None:
        for at, data, end in _items(conn, chunks):
            if conn.closed.wait(max(0.0, at - self.now())):
                return
            try:
                dst.sendall(data)
            except OSError:
                end = end or "eof"
            self._count_stat(f"{d}_bytes", len(data))
            if d == "up" and data:
                self._delivered(conn.upstream, len(data))
            if end is not None:
                with self._lock:
                    self.stats.cut += end == "cut"
                    if conn in self._open:
                        self._open.remove(conn)
                conn.close()
                return

    def _scan(self, up: _Upstream, data: bytes) -> None:
        """Note where the triggers' moments fall among the PUBLISH packets that begin in ``data``."""
        packets = up.scanner.feed(data)
        self._count_publishes("up", packets)
        for packet in packets:
            if packet.kind != PUBLISH:
                continue
            with self._lock:
                for t in self._triggers:
                    if t.topic == packet.topic and not t.fired.is_set() and all(m[1] is not t for m in up.marks):
                        up.marks.append((packet.offset + max(1, min(t.after_bytes, packet.length)), t))

    def _count_publishes(self, direction: str, packets: list[PacketStart]) -> None:
        with self._lock:
            for p in packets:
                if p.kind == PUBLISH:
                    self.publishes[(direction, p.topic)] += 1

    def _delivered(self, up: _Upstream, n: int) -> None:
        """``n`` more bytes of the stream reached the target: run the triggers whose moment came."""
        due: list[PublishTrigger] = []
        with self._lock:
            up.delivered += n
            for mark in [m for m in up.marks if m[0] <= up.delivered]:
                up.marks.remove(mark)
                if not mark[1].fired.is_set():
                    mark[1].fired.set()
                    due.append(mark[1])
        for t in due:
            t.action()

    def _count_stat(self, name: str, n: int) -> None:
        with self._lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)


def _put(conn: _Connection, chunks: queue.Queue, item: tuple[float, bytes, str | None]) -> bool:
    while not conn.closed.is_set():
        try:
            chunks.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _items(conn: _Connection, chunks: queue.Queue) -> Iterator[tuple[float, bytes, str | None]]:
    while not conn.closed.is_set():
        try:
            yield chunks.get(timeout=0.1)
        except queue.Empty:
            continue


class Links:
    """A set of named links to one target (a broker), closed together; a context manager."""

    def __init__(self, *, profiles: Mapping[str, Profile], target_port: int,
                 clock: Callable[[], float] = time.monotonic, ports: Mapping[str, int] | None = None) -> None:
        """``ports`` gives a link the port it listens on (one written down in advance, in a daemon's
        YAML say); the others take a free one."""
        self.links = {name: Link(profile=p, target_port=target_port, clock=clock, port=(ports or {}).get(name, 0))
                      for name, p in profiles.items()}

    def __getitem__(self, name: str) -> Link:
        return self.links[name]

    def storm(self) -> int:
        """Drop every connection of every link at once; how many were dropped."""
        return sum(link.drop() for link in self.links.values())

    def close(self) -> None:
        for link in self.links.values():
            link.close()

    def __enter__(self) -> "Links":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
