"""Transports for VM-clone fork: one framed duplex channel per worker, over tcp or shm.

``frames`` is the versioned wire format; ``channel`` the two transports and
the handshake helpers a supervisor and its workers use.  The whole package
belongs to the VM-clone mode (see ``fork/__init__.py`` for each mode's modules).
"""

from tender_service.transports.channel import (
    DEFAULT_RING_SIZE,
    MIN_RING_SIZE,
    Channel,
    ShmChannel,
    ShmExhausted,
    TcpChannel,
    accept_channel,
    connect_channel,
)
from tender_service.transports.frames import (
    HEADER_SIZE,
    HELLO_MAGIC,
    MAX_FRAME,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    ChannelClosed,
    Frame,
    Hello,
    ProtocolError,
    TransportKind,
    decode_header,
    encode,
    encode_header,
    read_hello,
    write_hello,
)

__all__ = [
    "DEFAULT_RING_SIZE",
    "HEADER_SIZE",
    "HELLO_MAGIC",
    "MAX_FRAME",
    "MAX_PAYLOAD",
    "MIN_RING_SIZE",
    "PROTOCOL_VERSION",
    "Channel",
    "ChannelClosed",
    "Frame",
    "Hello",
    "ProtocolError",
    "ShmChannel",
    "ShmExhausted",
    "TcpChannel",
    "TransportKind",
    "accept_channel",
    "connect_channel",
    "decode_header",
    "encode",
    "encode_header",
    "read_hello",
    "write_hello",
]
