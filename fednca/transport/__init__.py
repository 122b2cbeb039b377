"""Message transport: one small client interface, an MQTT (paho) and an in-memory implementation.

``base`` holds the interface and its errors, ``memory`` the in-process broker, ``mqtt`` the paho
adapter (import ``fednca.transport.mqtt`` where a real broker is used).
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
from .memory import MemoryBroker, MemoryClient

__all__ = [
    "Client",
    "ConnectRefused",
    "InvalidTopic",
    "MemoryBroker",
    "MemoryClient",
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
