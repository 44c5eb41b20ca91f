"""StartVm between the tender processes of one host, without gRPC (issue 17, item 5).

A VM-clone fork to a warm-pool process of the same host spent 1-3 ms of the
parent's fork in gRPC: a streaming call (the request iterator consumed on a
thread, HTTP/2 framing and flow control) to carry one header and a snapshot
of a few hundred KiB.  Each pool process therefore also listens on a Unix
socket next to its gRPC one (``<its socket>.vm``, in the pool's directory,
which only the tender's user can enter), where a request is one header and
the snapshot as they are, and the reply one JSON line.  A forking VM keeps
its connections (one per target process, more while forks overlap), so a
fork pays no dial.  What a request may make the process hold, and what it
answers, are the gRPC call's (``PeerServicer.launch``); gRPC stays the way
in from peer tenders, the relay and the supervisor's first VM.

Wire format, little endian::

    request   magic b"UFV1", header_len u32, snapshot_len u64,
              header (UTF-8 JSON: the VmStart fields), snapshot
    reply     reply_len u32, reply (UTF-8 JSON): {"ok": true, "pid", "host_pid",
              "host", "restore_seconds"} or {"ok": false, "code": a gRPC status
              name, "details"}; after a refusal the process stops writing, reads
              what the sender still sends (to EOF) and hangs up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: the local StartVm socket of a pool process is its gRPC socket's path + this
SUFFIX = ".vm"
MAGIC = b"UFV1"
REQUEST = struct.Struct("<4sIQ")  # magic, header length, snapshot length
REPLY = struct.Struct("<I")
MAX_HEADER = 64 << 10
MAX_REPLY = 64 << 10
#: seconds a request, once begun, may take to arrive (a stuck sender frees its thread)
READ_TIMEOUT = 30.0
#: connections one process serves at once (each holds a thread)
MAX_CONNECTIONS = 64
#: threads waiting in accept: a new connection is served by the thread that took it,
#: with no thread to start first (starting one took 0.1-0.4 ms on a 2-vCPU host, all
#: of it in the first fork to a fresh pool process: issue 17, item 1); each makes its
#: replacement once its first reply is sent
ACCEPTORS = 2


@dataclass
class Started:
    """The reply to a StartVm (as the gRPC call's VmStarted)."""

    pid: int
    host_pid: int
    host: str
    restore_seconds: float
    #: called once the reply is on its way (the server side: the VM's thread starts
    #: then, so that its restore does not hold the GIL the reply needs)
    then: Callable[[], None] | None = None


class StartFailed(Exception):
    """The process refused the VM or could not be reached; ``code`` is a gRPC status
    name (UNAVAILABLE: not reached), ``details()`` as a grpc.RpcError's."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self._details = details

    def details(self) -> str:
        return self._details


class Refused(Exception):
    """What the server side raises to refuse a request (``code``: a gRPC status name)."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def local_path(address: str) -> str | None:
    """The local StartVm socket of the pool process at ``unix:PATH``; None for others."""
    return address[5:] + SUFFIX if address.startswith("unix:") else None


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise EOFError(f"connection closed after {got} of {n} bytes")
        got += k
    return buf


# -- client: a forking VM ---------------------------------------------------------------
class Connections:
    """Kept connections to local StartVm sockets, by path (idle ones only)."""

    def __init__(self, per_path: int = 4) -> None:
        self.per_path = per_path
        self._lock = threading.Lock()
        self._idle: dict[str, list[socket.socket]] = {}

    def start(
        self, address: str, start: dict[str, Any], snapshot: bytes, timeout: float = 30.0
    ) -> Started:
        path = local_path(address)
        if path is None:
            raise ValueError(f"not a local pool process: {address[:80]!r}")
        head = json.dumps(start, separators=(",", ":")).encode()
        sock = self._take(path)
        try:
            if sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(path)
            sock.settimeout(timeout)
            sock.sendall(REQUEST.pack(MAGIC, len(head), len(snapshot)) + head)
            sock.sendall(snapshot)
            (n,) = REPLY.unpack(_recv_exact(sock, REPLY.size))
            if n > MAX_REPLY:
                raise ValueError(f"reply of {n} bytes")
            reply = json.loads(_recv_exact(sock, n))
        except (OSError, EOFError, ValueError) as e:
            if sock is not None:
                sock.close()
            raise StartFailed("UNAVAILABLE", f"{type(e).__name__}: {e}") from None
        if not reply.get("ok"):
            sock.close()  # it hangs up after a refusal
            raise StartFailed(str(reply.get("code")), str(reply.get("details"))[:1000])
        self._give(path, sock)
        return Started(
            int(reply["pid"]),
            int(reply["host_pid"]),
            str(reply["host"]),
            float(reply["restore_seconds"]),
        )

    def _take(self, path: str) -> socket.socket | None:
        with self._lock:
            idle = self._idle.get(path)
            return idle.pop() if idle else None

    def _give(self, path: str, sock: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault(path, [])
            if len(idle) < self.per_path:
                idle.append(sock)
                return
        sock.close()


# -- server: a pool process -----------------------------------------------------------------
#: (header, snapshot size, receive the snapshot into this buffer) -> Started; raises Refused
Launch = Callable[[dict[str, Any], int, Callable[[memoryview], None]], Started]


class Server:
    """A pool process's local StartVm socket: one thread per connection, each the
    thread that accepted it (``ACCEPTORS`` wait in accept)."""

    def __init__(self, path: str, launch: Launch) -> None:
        self.path = path
        self.launch = launch
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(path)
        self._sock.listen(64)
        self._conns = threading.BoundedSemaphore(MAX_CONNECTIONS)
        for _ in range(ACCEPTORS):
            self._new_acceptor()

    def _new_acceptor(self) -> None:
        threading.Thread(target=self._accept, name="localstart", daemon=True).start()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _accept(self) -> None:
        """Take the next connection and serve it to its end (a replacement accepts)."""
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # the socket is closed
            if self._conns.acquire(blocking=False):
                break
            conn.close()  # the forking side sees UNAVAILABLE and places it elsewhere
        replaced = False
        try:
            while self._one(conn):
                if not replaced:  # after the first reply, not before it
                    self._new_acceptor()
                    replaced = True
        except (OSError, EOFError) as e:
            log.debug("local StartVm connection ended: %s", e)
        except Exception:  # a bug: this connection ends, the process goes on
            log.exception("local StartVm failed")
        finally:
            conn.close()
            self._conns.release()
            if not replaced:
                self._new_acceptor()

    def _one(self, conn: socket.socket) -> bool:
        """Serve one request; False when the connection is over."""
        conn.settimeout(None)  # idle between forks for as long as the VM lives
        first = conn.recv(REQUEST.size, socket.MSG_PEEK)
        if not first:
            return False
        conn.settimeout(READ_TIMEOUT)
        magic, head_len, snap_len = REQUEST.unpack(_recv_exact(conn, REQUEST.size))
        try:
            if magic != MAGIC or head_len > MAX_HEADER:
                raise Refused("INVALID_ARGUMENT", "not a local StartVm request")
            try:
                start = json.loads(_recv_exact(conn, head_len))
            except ValueError as e:
                raise Refused("INVALID_ARGUMENT", f"start: {e}") from None
            if not isinstance(start, dict):
                raise Refused("INVALID_ARGUMENT", "start: not an object")

            def receive(into: memoryview) -> None:
                got = 0
                while got < snap_len:
                    k = conn.recv_into(into[got:snap_len])
                    if not k:
                        raise EOFError("the snapshot was cut short")
                    got += k

            started = self.launch(start, snap_len, receive)
        except Refused as e:
            _reply(conn, {"ok": False, "code": e.code, "details": e.details})
            # then hang up, but read what is still coming first: closing with bytes
            # unread would reset the connection, and the refusal with it
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(1 << 16):
                pass
            return False
        try:
            _reply(
                conn,
                {
                    "ok": True,
                    "pid": started.pid,
                    "host_pid": started.host_pid,
                    "host": started.host,
                    "restore_seconds": started.restore_seconds,
                },
            )
        finally:
            if started.then is not None:
                started.then()
        return True


def _reply(conn: socket.socket, reply: dict[str, Any]) -> None:
    data = json.dumps(reply).encode()
    conn.sendall(REPLY.pack(len(data)) + data)
