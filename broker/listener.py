"""Where mosquitto listens versus the address sites are told: ``init``'s broker flags, checked.

Two addresses are easy to confuse. ``--broker`` is the public URL written into every enrolment
bundle (``mqtts://clinic-hub.example:8883``): a name or address sites can reach. ``--listen`` is
the socket mosquitto binds (``0.0.0.0:8883``, all interfaces). A bind-all address must never
reach a site, so ``--broker mqtt://0.0.0.0:1883`` is refused with the two flags to use instead.

The scheme decides TLS and nothing else may contradict it: ``mqtts://`` needs ``--tls-name``
(the names and addresses the server certificate is issued for, which must include the URL's
host, or sites would refuse the certificate), ``mqtt://`` refuses ``--tls-name``, and the
listener's port must be the URL's. Each mistake is a :class:`ConfigError` that names the flag.
The same rules hold for ``coordinator.yaml`` (:func:`check_config`), naming its keys.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from fednca.errors import ConfigError
from fednca.transport.base import TransportError
from fednca.transport.mqtt import parse_url

from . import tls

LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class ListenerPlan:
    url: str  # what sites (and the coordinator) connect to
    address: str  # what mosquitto binds
    port: int
    tls_names: tuple[str, ...]  # empty: a plain listener


def _unspecified(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def _listen(text: str, default_port: int) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":") if text.count(":") == 1 or text.startswith("[") else ("", "", "")
    if not sep:
        host, port_text = text, str(default_port)
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
        port = int(port_text)
    except ValueError:
        raise ConfigError("--listen", f"{text!r}: give ADDRESS:PORT with an IP address, e.g. 0.0.0.0:8883") from None
    if not 1 <= port <= 65535:
        raise ConfigError("--listen", f"{text!r}: {port} is not a TCP port")
    return host, port


def plan_listener(*, broker: str, listen: str | None = None, tls_names: list[str] | tuple[str, ...] = ()) -> ListenerPlan:
    """The listener ``init`` writes for these flags, or a ConfigError naming the flag at fault."""
    try:
        address = parse_url(broker)
    except TransportError as e:
        raise ConfigError("--broker", str(e)) from None
    if _unspecified(address.host):
        raise ConfigError("--broker", f"{address.host} is the address mosquitto binds, not one sites can reach: "
                          f"give the hub's name or address (--broker {'mqtts' if address.tls else 'mqtt'}"
                          f"://HUB:{address.port}) and bind all interfaces with --listen {address.host}:{address.port}")
    if listen is None:
        bind, port = ("127.0.0.1" if address.host in LOOPBACK else "0.0.0.0"), address.port
    else:
        bind, port = _listen(listen, address.port)
    if port != address.port:
        raise ConfigError("--listen", f"port {port} differs from the port sites are told in --broker ({address.port})")
    names: tuple[str, ...] = ()
    if address.tls:
        names = tls.check_names(list(tls_names), field="--tls-name")
        if not tls.covers(names, address.host):
            raise ConfigError("--tls-name", f"the certificate would not name {address.host}, the host in --broker: "
                              f"add --tls-name {address.host}")
    elif tls_names:
        raise ConfigError("--tls-name", "is for an mqtts:// broker; --broker is mqtt:// (no TLS)")
    return ListenerPlan(url=str(address), address=bind, port=port, tls_names=names)


def check_config(*, url: str, port: int, tls_names: tuple[str, ...] | list[str]) -> None:
    """The same agreement between ``broker.url`` and the ``mosquitto`` section of coordinator.yaml."""
    address = parse_url(url)
    if _unspecified(address.host):
        raise ConfigError("broker.url", f"{address.host} is a bind address; sites cannot connect to it")
    if address.tls and not tls_names:
        raise ConfigError("mosquitto.tls_names", "an mqtts:// broker.url needs the names of the server certificate")
    if not address.tls and tls_names:
        raise ConfigError("mosquitto.tls_names", "given, but broker.url is mqtt:// (no TLS)")
    if address.tls and not tls.covers(tuple(tls_names), address.host):
        raise ConfigError("mosquitto.tls_names", f"must include {address.host}, the host in broker.url")
    if port != address.port:
        raise ConfigError("mosquitto.port", f"{port} differs from the port in broker.url ({address.port})")
