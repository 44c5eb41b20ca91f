"""The wire format of a worker <-> supervisor channel, version 2 (``PROTOCOL_VERSION``).

Versioned like Firecracker's snapshots: a connection opens with a hello that
names the protocol version, and a peer speaking another version is refused
with a clear error instead of being misparsed.  After the hellos, frames flow:
a fixed 24-byte little-endian header, then the payload.  A declared payload
length above ``MAX_PAYLOAD`` is a ``ProtocolError`` raised before anything is
allocated, so a corrupt or hostile peer cannot make us allocate.

Message type numbers belong to the layer above (the supervisor protocol);
frames only carry them, so this module defines none.

Hello layout: ``HELLO_MAGIC`` (4 bytes), u16 version, u16 transport kind,
u32 JSON length, then a JSON object of at most ``MAX_HELLO_JSON`` bytes.
"""

from __future__ import annotations

import enum
import json
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

HEADER = struct.Struct("<BBHIIqI")  # type, flags, reserved, req, pipe, arg, length
HEADER_SIZE = HEADER.size  # 24
MAX_PAYLOAD = 1 << 20
MAX_FRAME = HEADER_SIZE + MAX_PAYLOAD

HELLO_MAGIC = b"UFP1"
#: 2: an shm channel's segment is the answering side's sealed memfd, sent with its hello
PROTOCOL_VERSION = 2
HELLO_HEADER = struct.Struct("<4sHHI")  # magic, version, transport kind, JSON length
MAX_HELLO_JSON = 64 << 10
HELLO_TIMEOUT = 10.0
#: descriptors taken with a hello (a segment, a wake-up pipe, rings and other VMs' wake-up
#: pipes: supervisor.HELLO_RINGS and HELLO_WAKERS at most); Linux's SCM_MAX_FD
_MAX_FDS = 253


class ProtocolError(Exception):
    """The peer sent bytes that are not this version's protocol: the stream is unusable."""


class ChannelClosed(Exception):
    """The channel is closed: locally, by the peer, or because the peer died."""


class TransportKind(enum.IntEnum):
    """Transport numbers as they appear in the hello."""

    TCP = 1
    SHM = 2

    @classmethod
    def parse(cls, name: str) -> TransportKind:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(f"unknown transport {name!r} (expected 'tcp' or 'shm')") from None

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(slots=True)
class Frame:
    """One message; ``req`` matches replies to requests, ``pipe`` names a cross-VM pipe."""

    type: int
    flags: int = 0
    req: int = 0
    pipe: int = 0
    arg: int = 0
    payload: bytes = b""


@dataclass(slots=True, frozen=True)
class Hello:
    """What a peer announced when the connection opened."""

    kind: str
    info: dict[str, Any]


def encode_header(frame: Frame) -> bytes:
    """The 24-byte header; ValueError for a field out of range or an oversized payload."""
    n = len(frame.payload)
    if n > MAX_PAYLOAD:
        raise ValueError(f"payload of {n} bytes exceeds MAX_PAYLOAD ({MAX_PAYLOAD})")
    try:
        return HEADER.pack(frame.type, frame.flags, 0, frame.req, frame.pipe, frame.arg, n)
    except struct.error as e:
        raise ValueError(f"frame field out of range: {e}") from None


def encode(frame: Frame) -> bytes:
    """Header and payload as one byte string."""
    return encode_header(frame) + bytes(frame.payload)


def decode_header(data: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, ...]:
    """(type, flags, req, pipe, arg, length), validated: reserved is 0, length in bounds."""
    if len(data) - offset < HEADER_SIZE:
        raise ProtocolError(f"short frame header: {len(data) - offset} of {HEADER_SIZE} bytes")
    typ, flags, reserved, req, pipe, arg, length = HEADER.unpack_from(data, offset)
    if reserved != 0:
        raise ProtocolError(f"reserved header field is {reserved:#x}, not 0")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"declared payload length {length} exceeds MAX_PAYLOAD ({MAX_PAYLOAD})")
    return typ, flags, req, pipe, arg, length


def encode_hello(kind: str, info: dict[str, Any]) -> bytes:
    """The hello bytes announcing ``kind`` with the JSON object ``info``."""
    transport = TransportKind.parse(kind)
    body = json.dumps(info, separators=(",", ":")).encode()
    if len(body) > MAX_HELLO_JSON:
        raise ValueError(f"hello JSON of {len(body)} bytes exceeds {MAX_HELLO_JSON}")
    return HELLO_HEADER.pack(HELLO_MAGIC, PROTOCOL_VERSION, transport, len(body)) + body


def decode_hello_header(data: bytes) -> tuple[str, int]:
    """(transport kind, JSON length) from the fixed part of a hello, validated."""
    magic, version, kind, length = HELLO_HEADER.unpack(data)
    if magic != HELLO_MAGIC:
        raise ProtocolError(f"bad hello magic {magic!r} (expected {HELLO_MAGIC!r})")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version}")
    try:
        transport = TransportKind(kind)
    except ValueError:
        raise ProtocolError(f"unknown transport kind {kind} in hello") from None
    if length > MAX_HELLO_JSON:
        raise ProtocolError(f"hello JSON length {length} exceeds {MAX_HELLO_JSON}")
    return transport.label, length


def decode_hello_json(body: bytes) -> dict[str, Any]:
    try:
        info = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"hello JSON does not parse: {e}") from None
    if not isinstance(info, dict):
        raise ProtocolError(f"hello JSON is a {type(info).__name__}, not an object")
    return info


def write_hello(
    sock: socket.socket, kind: str, info: dict[str, Any], fds: Sequence[int] = ()
) -> None:
    """Send a hello; ``fds`` (a Unix socket only) travel with its first byte (SCM_RIGHTS)."""
    data = encode_hello(kind, info)
    if not fds:
        sock.sendall(data)
        return
    sent = socket.send_fds(sock, [data], list(fds))
    if sent < len(data):
        sock.sendall(data[sent:])


def read_hello(
    sock: socket.socket, timeout: float | None = HELLO_TIMEOUT, fds: list[int] | None = None
) -> Hello:
    """Read and validate one hello; a silent peer is a ProtocolError after ``timeout``.
    With ``fds``, the descriptors the peer attached to it are appended there (the
    caller owns them, also when this raises); without, the kernel drops any."""
    previous = sock.gettimeout()
    sock.settimeout(timeout)
    try:
        kind, length = decode_hello_header(recv_exact(sock, HELLO_HEADER.size, fds))
        return Hello(kind, decode_hello_json(recv_exact(sock, length)))
    except TimeoutError:
        raise ProtocolError(f"no complete hello within {timeout} s") from None
    finally:
        sock.settimeout(previous)


def recv_exact(sock: socket.socket, n: int, fds: list[int] | None = None) -> bytes:
    """Exactly n bytes; ChannelClosed if the stream ends first.  With ``fds``, the
    first read also takes the descriptors sent with those bytes (SCM_RIGHTS)."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        try:
            if fds is not None and got == 0:
                data, more, _, _ = socket.recv_fds(sock, n, _MAX_FDS, socket.MSG_CMSG_CLOEXEC)
                fds += more
                k = len(data)
                view[:k] = data
            else:
                k = sock.recv_into(view[got:])
        except (ConnectionResetError, BrokenPipeError) as e:
            raise ChannelClosed(f"connection lost: {e}") from None
        if k == 0:
            raise ChannelClosed(f"peer closed the connection after {got} of {n} bytes")
        got += k
    return bytes(buf)
