"""The daemon on a link that goes away, on the in-memory broker with a real trainer child: an
update cut off on its way is sent again once, without a second training or a second copy on the
link; a model download interrupted by a reconnect is stored and taken once."""

from __future__ import annotations

import logging
from pathlib import Path

from daemon_support import tiny_weights, wait_for
from fednca.atomic import write_bytes
from fednca.transport.base import DEFAULT_MAX_PACKET_SIZE, Message
from fednca.transport.memory import MemoryBroker, MemoryClient
from test_daemon_service import Running, Wall, broker, coordinator, fed  # noqa: F401  (the same fixtures)

T0 = 2_000_000_000.0


def test_an_update_cut_off_on_its_way_goes_out_once_after_the_link_returns_and_is_not_trained_again(
        fed, broker, coordinator, caplog):
    caplog.set_level(logging.INFO, logger="fednca.daemon")
    coordinator.announce(round=1, deadline=T0 + 3600, weights=tiny_weights())
    wall = Wall()
    d = Running(fed, broker, wall=wall, telemetry={"interval_s": 3600.0})
    wait_for(lambda: d.state.phase == "training", what="training")
    broker.stop()  # the link goes down while the site trains: its update cannot leave
    wait_for(lambda: d.state.phase == "submitted", what="the update stored and published")
    [(rnd, uid)] = d.service.folder.outbox.entries()
    assert d.service.uploads.in_flight(rnd, uid)  # waiting in the client for the broker
    wall.advance(1000.0)  # past the resend time (a tenth of the round's hour, 360 s): the lifecycle resends
    wait_for(lambda: d.state.outbox and d.state.outbox[0].resends >= 1, what="the resend")
    assert "still on its way to the broker: not published again" in caplog.text
    broker.start()  # the link is back: the client sends what it held
    wait_for(lambda: d.state.phase == "idle" and d.state.done_round == 1, what="the receipt")
    assert coordinator.deliveries == [("site-a", uid)]  # one copy crossed the link
    assert len(coordinator.accepted) == 1
    trained = [r.getMessage() for r in caplog.records if "started for round 1" in r.getMessage()]
    assert len(trained) == 1, trained  # the round was not trained again
    d.stop()


class DropsDuringTheModel(MemoryClient):
    """A client whose link drops while the first round announcement (the global model) is being
    taken in: the message is never acknowledged, so the broker sends it again after the reconnect."""

    def __init__(self, *, broker: MemoryBroker, client_id: str) -> None:
        super().__init__(broker=broker, client_id=client_id, username=None, password=None, will=None,
                         clean_start=False, max_packet_size=DEFAULT_MAX_PACKET_SIZE)
        self.models: list[Message] = []

    def receive(self, timeout: float = 0.0) -> Message | None:
        m = super().receive(timeout)
        if m is not None and m.topic.endswith("/round"):
            self.models.append(m)
            if len(self.models) == 1:
                self._broker.drop(self.client_id)  # reconnects at once: the broker runs
        return m


def test_a_reconnect_during_the_model_download_stores_and_takes_the_model_once(fed, broker, coordinator):
    writes: list[str] = []

    def counting(path: Path, data: bytes, *, mode: int) -> None:
        writes.append(Path(path).name)
        write_bytes(path, data, mode=mode)

    client = DropsDuringTheModel(broker=broker, client_id="daemon-site-a")
    d = Running(fed, broker, client=client, writer=counting, telemetry={"interval_s": 3600.0})
    wait_for(lambda: len(client.subscriptions) >= 2 and client.connected, what="the daemon subscribed")
    before = broker.traffic("daemon-site-a").bytes_out
    coordinator.announce(round=1, deadline=T0 + 3600, weights=tiny_weights())
    wait_for(lambda: d.state.round is not None and d.state.round.round == 1, what="round 1 taken")
    wait_for(lambda: len(client.models) >= 2, what="the model sent again after the reconnect")
    wait_for(lambda: d.state.phase in ("training", "submitted", "idle"), what="training")
    assert client.reconnects == 1
    assert [m.dup for m in client.models] == [False, True]  # the unacknowledged copy, and no retained one
    size = len(client.models[0].payload)
    assert broker.traffic("daemon-site-a").bytes_out - before < 2.5 * size  # two copies, not three
    assert writes.count("announcement.bin") == 1 and writes.count("model.safetensors") == 1, writes
    d.stop()
