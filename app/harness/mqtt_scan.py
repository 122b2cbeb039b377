"""Where MQTT packets start in a byte stream, so the link emulator can act at a chosen moment of
one: "the link goes down once 4 KB of the site's update has reached the broker" is then a fact of
the bytes, not a guess at when the site will get there.

Pure: :class:`PacketScanner` is fed the bytes of one direction of one connection, in order, in
chunks of any size, and returns a :class:`PacketStart` for each packet that begins in them, with
its offset in the stream and its whole length; a PUBLISH also carries its topic. Only fixed
headers and PUBLISH topics are read (MQTT 3.1.1 and 5 lay them out alike: a type byte, the
remaining length as a variable-length integer, then for PUBLISH a two-byte topic length and the
topic); the rest of each packet is skipped without being looked at. A stream that is not MQTT
yields whatever its bytes happen to say, and never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PUBLISH", "PacketScanner", "PacketStart"]

PUBLISH = 3  # the packet type in the high nibble of the first byte
_MAX_VARINT = 4  # bytes of the remaining length, at most


@dataclass(frozen=True, kw_only=True)
class PacketStart:
    """A packet that begins at ``offset`` of the stream and is ``length`` bytes long (headers included)."""

    kind: int  # the MQTT packet type (1 CONNECT ... 3 PUBLISH ... 14 DISCONNECT)
    offset: int
    length: int
    topic: str | None = None  # a PUBLISH's topic (undecodable bytes replaced)


class PacketScanner:
    """The packets of one direction of one connection, fed in order."""

    def __init__(self) -> None:
        self._offset = 0  # stream offset of the next byte fed
        self._skip = 0  # bytes of the current packet left to pass over
        self._head = bytearray()  # the current packet's first bytes, until its header is read
        self._head_at = 0

    def feed(self, data: bytes) -> list[PacketStart]:
        out: list[PacketStart] = []
        i, n = 0, len(data)
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            if not self._head:
                self._head_at = self._offset + i
            self._head.append(data[i])
            i += 1
            start = _parse(bytes(self._head), self._head_at)
            if start is not None:
                out.append(start)
                self._skip = max(0, start.length - len(self._head))
                self._head = bytearray()
        self._offset += n
        return out


def _parse(head: bytes, at: int) -> PacketStart | None:
    """The packet whose first bytes are ``head``, or None while more of its header is needed."""
    remaining, multiplier, used = 0, 1, 0
    for used in range(1, _MAX_VARINT + 1):
        if len(head) <= used:
            return None
        byte = head[used]
        remaining += (byte & 0x7F) * multiplier
        multiplier *= 128
        if not byte & 0x80:
            break
    header = 1 + used
    length = header + remaining
    kind = head[0] >> 4
    if kind != PUBLISH or remaining < 2:
        return PacketStart(kind=kind, offset=at, length=length)
    if len(head) < header + 2:
        return None
    topic_len = int.from_bytes(head[header:header + 2], "big")
    end = header + 2 + min(topic_len, remaining - 2)
    if len(head) < end:
        return None
    return PacketStart(kind=kind, offset=at, length=length, topic=head[header + 2:end].decode("utf-8", "replace"))
