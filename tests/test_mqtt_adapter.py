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
