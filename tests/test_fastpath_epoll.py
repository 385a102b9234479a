"""The epoll backend's fast path (issue 10), through the Python API.

- A re-posted recv on a TCP socket whose last read was short is not tried
  inline (that try was a wasted recv -> EAGAIN per ping-pong), and the
  rule that allows it never leaves data, EOF or urgent-mark data behind,
  nor applies to sockets where a short read proves nothing (unix stream
  with descriptors in flight).

The counters come from a test-only C hook in epoll.c
(iocp__epoll_test_counters: recv attempts that found nothing and eventfd
wakes, counted per thread), read with ctypes; the tests take deltas around
their own traffic, all of which runs on the thread that reads them.

Every wait is bounded; nothing here depends on timing.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

import iocp
import iocp._core

from .helpers import close_all, tcp_pair

# POSIX modules: on Windows (the Wine run) this epoll-only file skips.
fcntl = pytest.importorskip("fcntl")
termios = pytest.importorskip("termios")

WAIT = 30.0  # seconds: a bound, never expected to be reached


def _counters3() -> tuple[int, int, int]:
    """(recv attempts that got EAGAIN, of them inline at submit, eventfd
    wakes) made by the calling thread."""
    lib = ctypes.CDLL(iocp._core.__file__)
    out = (ctypes.c_uint64 * 3)()
    assert lib.iocp__epoll_test_counters(out, len(out)) == len(out)
    return int(out[0]), int(out[1]), int(out[2])


def _counters() -> tuple[int, int]:
    """(recv attempts that got EAGAIN, of them inline at submit) made by the
    calling thread."""
    total, inline, _ = _counters3()
    return total, inline


@pytest.fixture
def eport(backend: str, make_port) -> iocp.CompletionPort:
    """A leak-checked port on the epoll backend (the other backends skip)."""
    if backend != "epoll":
        pytest.skip("epoll backend behaviour")
    return make_port()


@contextlib.contextmanager
def _registered_pair(
    port: iocp.CompletionPort,
) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A loopback (client, server) TCP pair with the server end registered
    on `port`; both unregistered and closed at the end."""
    client, server = tcp_pair()
    port.register(server)
    try:
        yield client, server
    finally:
        close_all(port, server, client)


@pytest.fixture
def pair(eport: iocp.CompletionPort) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, server) on `eport`, the server end registered."""
    with _registered_pair(eport) as p:
        yield p


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


def _cancel(port: iocp.CompletionPort, op: iocp.Operation) -> None:
    """Cancels `op` and takes its last completion: cancelled, no MORE."""
    op.cancel()
    c = _get(port)
    assert c.operation is op and c.cancelled and not c.more


def _harvest(port: iocp.CompletionPort) -> None:
    """One non-blocking poll with nothing armed: the backend takes the
    pending edges (and remembers them as readiness), delivering nothing."""
    assert port.get(timeout=0) is None


def test_ping_pong_makes_no_inline_recv_that_finds_nothing(eport, pair):
    client, server = pair
    client.settimeout(WAIT)
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


def test_a_full_read_is_followed_by_another_try(eport, pair):
    # A read that filled the buffer proves nothing: the rest is read at once.
    client, server = pair
    client.sendall(b"a" * 100)
    _wait_acked(client)
    _harvest(eport)
    c = _get_after(eport, eport.recv(server, 60))
    assert c.data == b"a" * 60
    c = _get_after(eport, eport.recv(server, 60))
    assert c.data == b"a" * 40


def _get_after(port: iocp.CompletionPort, op: iocp.Operation) -> iocp.Completion:
    c = _get(port)
    assert c.operation is op
    return c


def _recv_until(port: iocp.CompletionPort, sock: socket.socket, want: bytes) -> None:
    """One recv after another on `sock` until `want` has come, each a
    successful read of something, never more than `want`."""
    got = b""
    while got != want:
        c = _get_after(port, port.recv(sock, 65536))
        assert c.ok and c.data, (got, c)
        got += c.data
        assert len(got) <= len(want), got


@pytest.mark.parametrize("harvest_first", [True, False])
def test_data_then_fin_short_read_still_reports_eof(eport, pair, harvest_first):
    # The FIN came with the data's edge: after the short read no edge is
    # left, so the next recv must still run and return EOF.
    client, server = pair
    client.sendall(b"hello")
    client.shutdown(socket.SHUT_WR)
    _wait_acked(client)
    if harvest_first:
        _harvest(eport)
    c = _get_after(eport, eport.recv(server, 65536))
    assert c.data == b"hello"
    c = _get_after(eport, eport.recv(server, 65536))
    assert c.ok and c.data == b""


@pytest.mark.parametrize("harvest_first", [True, False])
def test_urgent_mark_does_not_strand_the_data_after_it(eport, pair, harvest_first):
    # tcp_recvmsg stops at the urgent mark with data still queued behind
    # it and no new edge to come: the short-read rule must not apply.
    client, server = pair
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.sendall(b"abc")
    client.send(b"!", socket.MSG_OOB)
    client.sendall(b"def")
    _wait_acked(client)
    if harvest_first:
        _harvest(eport)
    _recv_until(eport, server, b"abcdef")


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
        _recv_until(eport, b, b"xyz")
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


# ---- multishot recv ------------------------------------------------------


class _Sender(threading.Thread):
    """Writes `data` to a blocking socket in 64-byte pieces."""

    def __init__(self, sock: socket.socket, data: bytes) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.data = data
        self.error: BaseException | None = None

    def run(self) -> None:
        self.sock.settimeout(WAIT)
        try:
            for i in range(0, len(self.data), 64):
                self.sock.sendall(self.data[i:i + 64])
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_multishot_recv_through_a_full_bounded_queue_loses_nothing(backend, make_port):
    if backend != "epoll":
        pytest.skip("epoll backend behaviour")
    port = make_port(queue_capacity=4)
    msgs = 3000
    data = b"".join(b"%063d\n" % i for i in range(msgs))
    with _registered_pair(port) as (client, server):
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        op = port.recv(server, 64, multishot=True)
        # Armed on an idle socket: no buffer is taken.
        assert port.stats()["live_buffers"] == 0
        sender = _Sender(client, data)
        sender.start()
        got = bytearray()
        deadline = time.monotonic() + WAIT
        while len(got) < len(data):
            assert time.monotonic() < deadline, len(got)
            # Take few at a time: the queue (4) stays full while the
            # socket still has bytes, and poll() must stop and resume.
            for c in port.get_many(max=3, timeout=WAIT):
                assert c.operation is op and c.more and c.ok
                assert 0 < len(c.data) <= 64
                got += c.data
        sender.join(WAIT)
        assert sender.error is None
        assert bytes(got) == data
        stats = port.stats()
        assert stats["queue_peak"] <= 4
        assert stats["live_buffers"] == 0
        # The budget stopped poll() with bytes left many times over, and
        # it resumed every time: one completion per 64-byte read.
        assert stats["completions"] >= msgs
        client.shutdown(socket.SHUT_WR)
        c = _get(port)
        assert c.operation is op and not c.more and c.ok and c.data == b""
        assert op.done


def test_multishot_recv_ping_pong_never_reads_an_empty_socket(eport, pair):
    client, server = pair
    client.settimeout(WAIT)
    op = eport.recv(server, 0, multishot=True)
    _harvest(eport)   # a new socket may be readable: that first try finds nothing
    total0, _ = _counters()
    for i in range(100):
        msg = b"%06d" % i * 8
        client.sendall(msg)
        got = b""
        while len(got) < len(msg):
            c = _get(eport)
            assert c.operation is op and c.more
            got += c.data
        assert got == msg
    total1, _ = _counters()
    # Each arrival was read once, short: never a recv that found nothing.
    assert total1 - total0 == 0
    assert eport.stats()["live_buffers"] == 0
    _cancel(eport, op)


def test_multishot_recv_per_completion_size_fits_the_arrival(eport, pair):
    # One read of 64 KiB at most (the default cap), each handed out in a
    # buffer of the size that came.
    client, server = pair
    big = bytes(range(256)) * 1024          # 256 KiB
    sender = _Sender(client, big)
    op = eport.recv(server, 0, multishot=True)
    sender.start()
    got = bytearray()
    while len(got) < len(big):
        c = _get(eport)
        assert c.operation is op and c.more
        assert 0 < len(c.data) <= 65536
        got += c.data
    sender.join(WAIT)
    assert bytes(got) == big
    client.close()
    c = _get(eport)
    assert c.operation is op and not c.more and c.data == b""


# ---- poll ------------------------------------------------------------------


def test_poll_one_shot_is_level_triggered(eport, pair):
    client, server = pair
    client.sendall(b"x")
    _wait_acked(client)
    _harvest(eport)                 # the edge is gone
    op = eport.poll(server, iocp.POLLIN)
    c = _get(eport)
    assert c.operation is op and c.data == iocp.POLLIN and not c.more
    # Still unread: ready again at once.
    op = eport.poll(server, iocp.POLLIN)
    c = _get(eport)
    assert c.operation is op and c.data == iocp.POLLIN
    assert server.recv(10) == b"x"
    # Now nothing to read: it waits for the next arrival.
    op = eport.poll(server, iocp.POLLIN)
    _harvest(eport)
    assert not op.done
    client.sendall(b"y")
    c = _get(eport)
    assert c.operation is op and c.data == iocp.POLLIN
    # Writable: at once, with only what was asked.
    op = eport.poll(server, iocp.POLLOUT)
    c = _get(eport)
    assert c.operation is op and c.data == iocp.POLLOUT


def test_poll_multishot_is_edge_triggered(eport, pair):
    client, server = pair
    client.sendall(b"a")
    _wait_acked(client)
    # (Taken now: an edge still pending when the poll is armed would
    # also be reported, after the "ready when armed" completion.)
    _harvest(eport)
    op = eport.poll(server, iocp.POLLIN, multishot=True)
    c = _get(eport)                 # ready when armed
    assert c.operation is op and c.more and c.data == iocp.POLLIN
    _harvest(eport)                 # undrained, but no new edge: silence
    assert eport.stats()["queued"] == 0
    for _ in range(3):
        client.sendall(b"b")
        c = _get(eport)
        assert c.operation is op and c.more and c.data & iocp.POLLIN
    assert server.recv(10) == b"abbb"
    client.shutdown(socket.SHUT_WR)
    c = _get(eport)                 # EOF is readable
    assert c.operation is op and c.more and c.data & iocp.POLLIN
    _cancel(eport, op)


def test_poll_coexists_with_a_pending_recv(eport, pair):
    client, server = pair
    recv_op = eport.recv(server, 100)
    _harvest(eport)
    poll_op = eport.poll(server, iocp.POLLIN)
    send_op = eport.send(server, b"out")
    seen = {}
    c = _get(eport)
    seen[c.operation] = c
    client.sendall(b"hello")
    while len(seen) < 3:
        c = _get(eport)
        seen[c.operation] = c
    assert seen[recv_op].data == b"hello"
    assert seen[poll_op].data == iocp.POLLIN
    assert seen[send_op].nbytes == 3
    assert client.recv(10) == b"out"


@pytest.mark.parametrize("how", ["cancel", "unregister"])
def test_pending_polls_complete_cancelled(eport, pair, how):
    client, server = pair
    _harvest(eport)
    a = eport.poll(server, iocp.POLLIN)
    b = eport.poll(server, iocp.POLLIN, multishot=True)
    if how == "cancel":
        a.cancel()
        b.cancel()
    else:
        eport.unregister(server)
    got = {_get(eport).operation: True for _ in range(2)}
    assert set(got) == {a, b}
    assert a.done and b.done


# ---- silent sends ------------------------------------------------------------


def _wchan_waiting_threads() -> int:
    """Threads of this process asleep in epoll_wait (from /proc), or -1."""
    try:
        n = 0
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/wchan") as f:
                if "epoll_wait" in f.read():
                    n += 1
        return n
    except OSError:
        return -1


def test_silent_inline_sends_on_the_dispatching_thread_wake_no_poller(backend, make_port):
    if backend != "epoll":
        pytest.skip("epoll backend behaviour")
    port = make_port(concurrency=2)
    client, server = tcp_pair()
    port.register(server)
    client.settimeout(WAIT)
    result: dict[str, object] = {}

    def cb(_c: iocp.Completion) -> None:
        # Let the other loop thread fall asleep in epoll_wait first (where
        # /proc tells), so a wake would have someone to wake.
        deadline = time.monotonic() + 5
        while _wchan_waiting_threads() == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        w0 = _counters3()[2]
        for i in range(50):
            port.send(server, b"%04d" % i, silent=True)
        result["wakes"] = _counters3()[2] - w0
        port.stop()

    threads = [threading.Thread(target=port.run, kwargs={"timeout": WAIT}) for _ in range(2)]
    try:
        for t in threads:
            t.start()
        port.post(callback=cb)
        for t in threads:
            t.join(WAIT)
        assert not any(t.is_alive() for t in threads)
        assert result["wakes"] == 0
        want = b"".join(b"%04d" % i for i in range(50))
        got = b""
        while len(got) < len(want):
            got += client.recv(4096)
        assert got == want
    finally:
        port.stop()
        for t in threads:
            t.join(WAIT)
        close_all(port, server, client)


def test_silent_and_plain_sends_keep_their_order(make_port):
    # Every backend: silent sends (plain and gathered), some inline and
    # some queued behind a full send buffer, interleave with plain ones;
    # the bytes arrive in submission order and only the plain ones report.
    port = make_port()
    client, server = tcp_pair()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    port.register(client)
    reported: list[int] = []
    pieces: list[bytes] = []
    plain: list[iocp.Operation] = []
    try:
        for i in range(60):
            b = bytes([i % 250 + 1])
            if i % 3 == 0:
                data = b * 20_000
                plain.append(port.send(client, data, lambda c, i=i: reported.append(i)))
                pieces.append(data)
            elif i % 3 == 1:
                data = b * 30_000
                port.send(client, data, lambda c, i=i: reported.append(-i), silent=True)
                pieces.append(data)
            else:
                parts = [b * 10_000, bytearray(b * 5_000)]
                port.sendmsg(client, parts, lambda c, i=i: reported.append(-i), silent=True)
                pieces.extend(bytes(p) for p in parts)
        want = b"".join(pieces)
        got = bytearray()
        server.setblocking(False)
        deadline = time.monotonic() + WAIT
        while len(got) < len(want) or len(reported) < len(plain):
            assert time.monotonic() < deadline, (len(got), reported)
            port.run(timeout=0.01)
            try:
                while len(got) < len(want):
                    got += server.recv(1 << 16)
            except BlockingIOError:
                pass
        assert bytes(got) == want
        assert reported == [i for i in range(60) if i % 3 == 0]
        assert all(op.done for op in plain)
    finally:
        close_all(port, client, server)


def test_multishot_recv_waits_at_the_pool_bound_and_resumes(backend, make_port, monkeypatch):
    # IOCP_EPOLL_POOL_MAX (the test knob behind recv_pool_max): at most 256
    # bytes handed out and not given back, so a poll() hands out four
    # 64-byte reads, the op waits armed, and it resumes when the batch's
    # buffers come back -- every byte, in order.
    if backend != "epoll":
        pytest.skip("epoll backend behaviour")
    monkeypatch.setenv("IOCP_EPOLL_POOL_MAX", "256")
    port = make_port()
    msgs = 40
    data = b"".join(b"%063d\n" % i for i in range(msgs))
    with _registered_pair(port) as (client, server):
        client.sendall(data)
        _wait_acked(client)
        op = port.recv(server, 64, multishot=True)
        got = bytearray()
        deadline = time.monotonic() + WAIT
        batches = []
        while len(got) < len(data):
            assert time.monotonic() < deadline, len(got)
            batch = port.get_many(max=1024, timeout=WAIT)
            batches.append(len(batch))
            for c in batch:
                assert c.operation is op and c.more and len(c.data) == 64
                got += c.data
        assert bytes(got) == data
        assert max(batches) <= 4, batches
        assert port.stats()["live_buffers"] == 0
        op.cancel()
        assert _get(port).cancelled
