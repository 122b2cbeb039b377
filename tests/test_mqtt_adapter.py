"""The paho adapter's own bookkeeping, driven through a fake paho client (no broker, no sleeping)."""

import paho.mqtt.client as paho
import pytest

from fednca.transport import TransportError
from fednca.transport.mqtt import MqttClient


class SilentPaho:
    """A paho client whose SUBSCRIBE is sent but never answered."""

    def __init__(self) -> None:
        self.mids = iter(range(7, 100))

    def subscribe(self, topic_filter: str, qos: int) -> tuple[int, int]:
        return paho.MQTT_ERR_SUCCESS, next(self.mids)


def test_a_subscription_that_times_out_leaves_no_waiter_behind():
    client = MqttClient(url="mqtt://127.0.0.1:1883", client_id="c")
    client._paho = SilentPaho()
    client._connected = True
    with pytest.raises(TransportError, match="no answer to the subscription 'a/b'"):
        client.subscribe("a/b", 1, timeout=0.0)
    assert client._sub_waits == {}
    assert client.subscriptions == {"a/b": 1}, "still made again after the next reconnect"


def test_connection_changes_are_logged_one_line_each_with_the_reason(caplog):
    import types

    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    client = MqttClient(url="mqtt://127.0.0.1:1883", client_id="coordinator")
    client._paho = SilentPaho()
    client._started = True
    ok = ReasonCode(PacketTypes.CONNACK, "Success")
    caplog.set_level("INFO", logger="fednca.transport")
    client._on_connect(client._paho, None, types.SimpleNamespace(session_present=False), ok, None)
    client._on_disconnect(client._paho, None, None, ReasonCode(PacketTypes.DISCONNECT, "Keep alive timeout"), None)
    client._on_connect(client._paho, None, types.SimpleNamespace(session_present=True), ok, None)
    client._on_connect(client._paho, None, None, ReasonCode(PacketTypes.CONNACK, "Not authorized"), None)
    client._started = False
    client._on_disconnect(client._paho, None, None, ReasonCode(PacketTypes.DISCONNECT, "Normal disconnection"), None)
    lines = [r.getMessage() for r in caplog.records if r.name == "fednca.transport"]
    assert len(lines) == 5
    assert lines[0].startswith("coordinator: connected to broker mqtt://127.0.0.1:1883") and "session new" in lines[0]
    assert "lost the broker" in lines[1] and "Keep alive timeout" in lines[1] and "reconnecting" in lines[1]
    assert lines[2].startswith("coordinator: reconnected") and "session kept" in lines[2]
    assert "refused the connection: Not authorized (code 135)" in lines[3]
    assert "disconnected from broker" in lines[4] and "Normal disconnection" in lines[4]
