"""The epoll backend's fast path (issue 10), through the Python API.

- A re-posted recv on a TCP socket whose last read was short is not tried
  inline (that try was a wasted recv -> EAGAIN per ping-pong), and the
  rule that allows it never leaves data, EOF or urgent-mark data behind,
  nor applies to sockets where a short read proves nothing (unix stream
  with descriptors in flight).

The counters come from a test-only C hook in epoll.c
(iocp__epoll_test_counters: process-wide recv attempts that found nothing),
read with ctypes, so the tests take deltas around their own traffic.

Every wait is bounded; nothing here depends on timing.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import socket
import termios
import time

import pytest

import iocp
import iocp._core

from .helpers import close_all, tcp_pair

WAIT = 30.0  # seconds: a bound, never expected to be reached


def _counters() -> tuple[int, int]:
    """(recv attempts that got EAGAIN, of them inline at submit), process-wide."""
    lib = ctypes.CDLL(iocp._core.__file__)
    out = (ctypes.c_uint64 * 3)()
    lib.iocp__epoll_test_counters(out)
    return int(out[0]), int(out[1])


@pytest.fixture
def eport(backend: str, make_port) -> iocp.CompletionPort:
    """A leak-checked port on the epoll backend (the other backends skip)."""
    if backend != "epoll":
        pytest.skip("epoll backend behaviour")
    return make_port()


def _get(port: iocp.CompletionPort) -> iocp.Completion:
    """The next completion, or a failure after WAIT seconds."""
    c = port.get(timeout=WAIT)
    assert c is not None, "no completion within the bound"
    return c


def _queued_bytes(sock: socket.socket) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


def _wait_queued(sock: socket.socket, n: int) -> None:
    """Waits (bounded) until `sock` has at least n bytes queued to read."""
    deadline = time.monotonic() + WAIT
    while _queued_bytes(sock) < n:
        assert time.monotonic() < deadline, "bytes never arrived"
        time.sleep(0.001)


def _wait_acked(sock: socket.socket) -> None:
    """Waits (bounded) until the peer's TCP has acknowledged every byte
    `sock` sent (SIOCOUTQ is 0), so all of it sits in the peer's queue."""
    buf = array.array("i", [0])
    deadline = time.monotonic() + WAIT
    while True:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
        if buf[0] == 0:
            return
        assert time.monotonic() < deadline, "bytes never acknowledged"
        time.sleep(0.001)


def _harvest(port: iocp.CompletionPort) -> None:
    """One non-blocking poll with nothing armed: the backend takes the
    pending edges (and remembers them as readiness), delivering nothing."""
    assert port.get(timeout=0) is None


def test_ping_pong_makes_no_inline_recv_that_finds_nothing(eport):
    client, server = tcp_pair()
    eport.register(server)
    client.settimeout(WAIT)
    try:
        rounds = 200
        op = eport.recv(server, 65536)
        # (This first one was tried inline: a new socket may be readable.)
        total0, inline0 = _counters()
        for i in range(rounds):
            msg = b"%06d" % i + b"x" * 58
            client.sendall(msg)
            c = _get(eport)
            assert c.operation is op and c.data == msg
            eport.send(server, c.data)
            # Re-posted before the peer has anything to send: the socket is
            # drained (the read was short), so this must not try recv now.
            op = eport.recv(server, 65536)
            s = _get(eport)
            assert s.kind == "send" and s.nbytes == 64
            got = b""
            while len(got) < 64:
                got += client.recv(64 - len(got))
            assert got == msg
        total1, inline1 = _counters()
        assert inline1 - inline0 == 0
        # The poller never found an edge with nothing behind it either.
        assert total1 - total0 == 0
        op.cancel()
        assert _get(eport).cancelled
    finally:
        close_all(eport, server, client)


def test_a_full_read_is_followed_by_another_try(eport):
    # A read that filled the buffer proves nothing: the rest is read at once.
    client, server = tcp_pair()
    eport.register(server)
    try:
        client.sendall(b"a" * 100)
        _wait_acked(client)
        _harvest(eport)
        c = _get_after(eport, eport.recv(server, 60))
        assert c.data == b"a" * 60
        c = _get_after(eport, eport.recv(server, 60))
        assert c.data == b"a" * 40
    finally:
        close_all(eport, server, client)


def _get_after(port: iocp.CompletionPort, op: iocp.Operation) -> iocp.Completion:
    c = _get(port)
    assert c.operation is op
    return c


@pytest.mark.parametrize("harvest_first", [True, False])
def test_data_then_fin_short_read_still_reports_eof(eport, harvest_first):
    # The FIN came with the data's edge: after the short read no edge is
    # left, so the next recv must still run and return EOF.
    client, server = tcp_pair()
    eport.register(server)
    try:
        client.sendall(b"hello")
        client.shutdown(socket.SHUT_WR)
        _wait_acked(client)
        if harvest_first:
            _harvest(eport)
        c = _get_after(eport, eport.recv(server, 65536))
        assert c.data == b"hello"
        c = _get_after(eport, eport.recv(server, 65536))
        assert c.ok and c.data == b""
    finally:
        close_all(eport, server, client)


@pytest.mark.parametrize("harvest_first", [True, False])
def test_urgent_mark_does_not_strand_the_data_after_it(eport, harvest_first):
    # tcp_recvmsg stops at the urgent mark with data still queued behind
    # it and no new edge to come: the short-read rule must not apply.
    client, server = tcp_pair()
    eport.register(server)
    try:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(b"abc")
        client.send(b"!", socket.MSG_OOB)
        client.sendall(b"def")
        _wait_acked(client)
        if harvest_first:
            _harvest(eport)
        got = b""
        while got != b"abcdef":
            c = _get_after(eport, eport.recv(server, 65536))
            assert c.ok and c.data, (got, c)
            got += c.data
            assert len(got) <= 6, got
    finally:
        close_all(eport, server, client)


def test_unix_stream_stopped_short_by_passed_fds_keeps_reading(eport):
    # A unix stream read stops after a message that carries descriptors,
    # with more queued behind it: unix sockets keep the EAGAIN rule.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    eport.register(b)
    r, w = socket.socketpair()
    try:
        socket.send_fds(a, [b"x"], [r.fileno()])
        a.sendall(b"yz")
        _harvest(eport)
        got = b""
        while got != b"xyz":
            c = _get_after(eport, eport.recv(b, 65536))
            assert c.ok and c.data, (got, c)
            got += c.data
            assert len(got) <= 3, got
    finally:
        close_all(eport, b, a, r, w)


def test_udp_datagrams_are_each_read_after_a_short_read(eport):
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    eport.register(rx)
    try:
        for i in range(3):
            tx.sendto(b"d%d" % i, rx.getsockname())
        _wait_queued(rx, 1)
        _harvest(eport)
        seen = []
        for _ in range(3):
            c = _get_after(eport, eport.recv(rx, 2048))
            seen.append(c.data)
        assert seen == [b"d0", b"d1", b"d2"]
    finally:
        close_all(eport, rx, tx)
