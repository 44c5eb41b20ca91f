"""The listener broker (transports/listeners.py): TCP listeners shared by VMs.

The broker is a plain object the supervisor calls under its lock; these tests
drive it directly with the real pipe broker it shares connections through.
The end-to-end behaviour (prefork_http's workers in VMs of their own behind a
published port, sock_inet's child VM connecting to its parent's listener) is in
test_published.py and test_sockets.py.
"""

from __future__ import annotations

import errno

from tender_service.transports.broker import POLL_ERR, POLL_HUP, POLL_IN, PipeBroker
from tender_service.transports.listeners import Connection, ListenerBroker

AF_INET, AF_INET6 = 2, 10
SERVER, OTHER, CLIENT = 2, 3, 4


def brokers() -> tuple[PipeBroker, ListenerBroker]:
    pipes = PipeBroker()
    return pipes, ListenerBroker(pipes)


def test_one_connection_goes_to_one_accept_in_arrival_order() -> None:
    pipes, lb = brokers()
    lid = lb.create(SERVER, AF_INET, 80)
    lb.add_ref(lid, OTHER)
    got: list[tuple[int, object]] = []
    lb.accept(lid, SERVER, False, lambda r: got.append((SERVER, r)))
    lb.accept(lid, OTHER, False, lambda r: got.append((OTHER, r)))
    assert got == [] and lb.poll(lid) == 0
    first = lb.connect(lid, CLIENT, ("127.0.0.1", 40000))
    assert first is not None
    assert got == [(SERVER, first)]  # the first waiter, and only it
    second = lb.connect(lid, CLIENT, ("127.0.0.1", 40001))
    assert got[1] == (OTHER, second)
    assert lb.stats()["accepted"] == 2


def test_accepted_connection_is_a_byte_stream_each_way() -> None:
    pipes, lb = brokers()
    lid = lb.create(SERVER, AF_INET, 80)
    conn = lb.connect(lid, CLIENT, ("127.0.0.1", 40000))
    assert conn is not None and lb.poll(lid) == POLL_IN
    got: list[object] = []
    lb.accept(lid, SERVER, True, got.append)
    assert got == [conn] and lb.poll(lid) == 0
    wrote: list[tuple[int, bool]] = []
    pipes.write(conn.rx, CLIENT, b"GET /", False, lambda n, sig: wrote.append((n, sig)))
    pipes.write(conn.tx, SERVER, b"200", False, lambda n, sig: wrote.append((n, sig)))
    assert wrote == [(5, False), (3, False)]
    data: list[object] = []
    pipes.read(conn.rx, SERVER, 100, True, data.append)
    pipes.read(conn.tx, CLIENT, 100, True, data.append)
    assert data == [b"GET /", b"200"]
    pipes.close(conn.tx, SERVER, "w")  # the server closes: the client reads EOF
    pipes.read(conn.tx, CLIENT, 100, True, data.append)
    assert data[-1] == b""


def test_nonblocking_accept_with_nothing_queued_is_eagain() -> None:
    _, lb = brokers()
    lid = lb.create(SERVER, AF_INET, 80)
    got: list[object] = []
    lb.accept(lid, SERVER, True, got.append)
    assert got == [-errno.EAGAIN]


def test_only_a_holder_may_accept() -> None:
    _, lb = brokers()
    lid = lb.create(SERVER, AF_INET, 80)
    got: list[object] = []
    lb.accept(lid, OTHER, False, got.append)
    lb.accept(lid + 1, SERVER, False, got.append)
    assert got == [-errno.EBADF, -errno.EBADF]


def test_last_close_drops_the_queue_and_the_clients_see_eof() -> None:
    pipes, lb = brokers()
    lid = lb.create(SERVER, AF_INET, 80)
    lb.add_ref(lid, OTHER)
    conn = lb.connect(lid, CLIENT, ("127.0.0.1", 40000))
    assert conn is not None
    lb.close(lid, SERVER)
    assert lb.for_port(80) == lid  # OTHER still holds it
    lb.drop_holder(OTHER)  # its VM is gone
    assert lb.for_port(80) is None and lb.stats()["dropped"] == 1
    assert pipes.poll(conn.tx, False) == POLL_HUP  # no server will ever write
    assert pipes.poll(conn.rx, True) & POLL_ERR  # nor read
    assert lb.connect(lid, CLIENT, ("127.0.0.1", 40001)) is None  # refused


def test_a_parked_accept_holds_the_listener_until_its_vm_is_gone() -> None:
    _, lb = brokers()
    lid = lb.create(SERVER, AF_INET, 80)
    got: list[object] = []
    lb.accept(lid, SERVER, False, got.append)
    lb.close(lid, SERVER)  # another thread of the VM closes the fd meanwhile
    conn = lb.connect(lid, CLIENT, ("127.0.0.1", 40000))
    assert isinstance(conn, Connection) and got == [conn]  # as Linux: the accept goes on
    lb.accept(lid, OTHER, False, got.append)
    assert got[-1] == -errno.EBADF


def test_for_port_prefers_a_waiting_listener_and_knows_families() -> None:
    _, lb = brokers()
    a = lb.create(SERVER, AF_INET, 80)
    b = lb.create(OTHER, AF_INET, 80)
    v6 = lb.create(OTHER, AF_INET6, 81)
    lb.accept(b, OTHER, False, lambda r: None)
    assert {lb.for_port(80) for _ in range(4)} == {b}
    assert lb.for_port(81, AF_INET) is None and lb.for_port(81, AF_INET6) == v6
    lb.connect(b, CLIENT, ("127.0.0.1", 1))  # b's accept is served: both are in turn now
    assert {lb.for_port(80) for _ in range(4)} == {a, b}


def test_a_poller_is_told_of_the_next_connection_once() -> None:
    """A VM in poll on a shared listener registers a watch (``poll``'s second
    argument); the next connection calls it, once; a VM that is gone is not called."""
    _, lb = brokers()
    lid = lb.create(SERVER, AF_INET, 80)
    lb.add_ref(lid, OTHER)
    woken: list[int] = []
    assert lb.poll(lid, (SERVER, lambda: woken.append(SERVER))) == 0
    assert lb.poll(lid, (OTHER, lambda: woken.append(OTHER))) == 0
    lb.drop_holder(OTHER)  # its VM ended: nobody to tell
    assert woken == []
    lb.connect(lid, CLIENT, ("127.0.0.1", 40000))
    assert woken == [SERVER]
    lb.connect(lid, CLIENT, ("127.0.0.1", 40001))
    assert woken == [SERVER]  # once: it polls again to hear of the next one
