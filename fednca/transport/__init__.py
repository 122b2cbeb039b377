"""Message transport: one small client interface, an MQTT (paho) and an in-memory implementation.

``base`` holds the interface and its errors (re-exported here), ``memory`` the in-process broker,
``mqtt`` the paho adapter. Neither implementation loads with this package: a daemon or coordinator
on mosquitto imports ``fednca.transport.mqtt`` and never the in-memory broker, the demo and the
tests import ``fednca.transport.memory``; paho is imported in ``mqtt`` alone.
"""

from .base import (
    Client,
    ConnectRefused,
    InvalidTopic,
    Message,
    NotConnected,
    PayloadTooLarge,
    PublishHandle,
    PublishRefused,
    PublishTimeout,
    SubscribeRefused,
    TransportError,
    Will,
)

__all__ = [
    "Client",
    "ConnectRefused",
    "InvalidTopic",
    "Message",
    "NotConnected",
    "PayloadTooLarge",
    "PublishHandle",
    "PublishRefused",
    "PublishTimeout",
    "SubscribeRefused",
    "TransportError",
    "Will",
]
