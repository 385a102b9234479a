"""The Windows backend's fast-path ops (issue 10), through the Python API:
the emulated multishot recv (zero-byte WSARecv, then reads of what is
there), silent sends, and poll ops through the AFD poll and through its
zero-byte fallback.  Windows only (run under Wine by tests/wine/run.sh);
the generic contract is tests/test_fastpath.py, on every backend."""

from __future__ import annotations

import errno
import socket
import sys
import time

import pytest

import iocp
from tests.helpers import close_all, tcp_pair

pytestmark = pytest.mark.skipif(sys.platform != "win32", reason="Windows backend")

WAIT = 20.0  # seconds per expected completion; Wine is slow


def next_completion(port: iocp.CompletionPort, timeout: float = WAIT) -> iocp.Completion:
    """The next completion, or a test failure after `timeout` seconds."""
    got = port.get(timeout=timeout)
    assert got is not None, f"no completion within {timeout} s"
    return got


def nothing_for(port: iocp.CompletionPort, seconds: float) -> None:
    """Asserts that no completion arrives within `seconds`."""
    got = port.get(timeout=seconds)
    assert got is None, f"unexpected completion {got!r}"


@pytest.fixture
def win_port(make_port):
    """An iocp port (the only backend on Windows)."""
    return make_port(backend="iocp")


def test_multishot_recv_idle_pins_no_buffer_and_ends_at_eof(win_port):
    """An armed multishot recv on an idle connection holds no port buffer;
    each arrival is one completion with `more`; the peer's close ends it."""
    port = win_port
    client, server = tcp_pair()
    port.register(server)
    op = port.recv(server, 0, multishot=True)
    nothing_for(port, 0.1)
    assert port.stats()["live_buffers"] == 0
    got = bytearray()
    for i in range(3):
        msg = f"message {i};".encode()
        client.sendall(msg)
        want = len(got) + len(msg)
        while len(got) < want:
            c = next_completion(port)
            assert c.operation is op and c.ok and c.more, c
            got += c.data
        assert port.stats()["live_buffers"] == 0
    assert bytes(got) == b"message 0;message 1;message 2;"
    client.close()
    c = next_completion(port)
    assert c.operation is op and c.ok and not c.more and c.eof and c.data == b""
    close_all(port, server)


def test_multishot_recv_keeps_the_bounded_queue(make_port):
    """20,000 bytes in 100-byte completions through a queue of 4: no batch
    is larger than the queue, the queue never overflows, every byte comes in
    order."""
    port = make_port(backend="iocp", queue_capacity=4)
    client, server = tcp_pair()
    port.register(server)
    payload = bytes((i * 7 + i // 251) & 0xFF for i in range(20000))
    client.sendall(payload)
    op = port.recv(server, 100, multishot=True)
    got = bytearray()
    deadline = time.monotonic() + 60
    while len(got) < len(payload):
        assert time.monotonic() < deadline, f"{len(got)} of {len(payload)} bytes"
        batch = port.get_many(64, timeout=1.0)
        assert len(batch) <= 4
        for c in batch:
            assert c.operation is op and c.ok and c.more and 0 < c.nbytes <= 100, c
            got += c.data
    assert bytes(got) == payload
    assert port.stats()["queue_peak"] <= 4
    op.cancel()
    c = next_completion(port)
    assert c.cancelled and not c.more
    close_all(port, server, client)


def test_multishot_recv_refuses_other_recvs_while_armed(win_port):
    """recv and recv_into on a socket with an armed multishot recv fail
    with EBUSY; after its cancel they work."""
    port = win_port
    client, server = tcp_pair()
    port.register(server)
    op = port.recv(server, 0, multishot=True)
    with pytest.raises(OSError) as e1:
        port.recv(server, 16)
    with pytest.raises(OSError) as e2:
        port.recv_into(server, bytearray(16))
    for e in (e1, e2):
        assert e.value.errno == errno.EBUSY, e.value
    op.cancel()
    c = next_completion(port)
    assert c.operation is op and c.cancelled and not c.more
    port.recv(server, 16)
    client.sendall(b"x")
    c = next_completion(port)
    assert c.ok and c.data == b"x"
    close_all(port, server, client)


def test_multishot_recv_unregister_and_close_end_it_cancelled(win_port):
    """Unregister, or closing the socket, ends an armed multishot recv as
    cancelled and leaves nothing behind (the fixture checks the counts)."""
    port = win_port
    client, server = tcp_pair()
    port.register(server)
    op = port.recv(server, 0, multishot=True)
    port.unregister(server)
    c = next_completion(port)
    assert c.operation is op and c.cancelled and not c.more
    port.register(server)
    op2 = port.recv(server, 0, multishot=True)
    server.close()
    c = next_completion(port)
    assert c.operation is op2 and c.cancelled and not c.more
    client.close()


def test_silent_sends_complete_without_callbacks_in_order(win_port):
    """Silent sends that succeed call nobody; a plain send after them
    completes as usual, and the peer reads every byte in order."""
    port = win_port
    client, server = tcp_pair()
    port.register(server)
    called: list[iocp.Completion] = []
    done: list[iocp.Completion] = []
    parts = [f"<{i}>".encode() for i in range(100)]
    for p in parts:
        port.send(server, p, called.append, silent=True)
    last = port.send(server, b"<end>", done.append)
    deadline = time.monotonic() + WAIT
    while not done:
        assert time.monotonic() < deadline, "the plain send never completed"
        port.run_once(0.05)
    assert done[0].operation is last and done[0].ok and done[0].nbytes == 5
    assert called == []
    assert port.stats()["live_ops"] == 0
    want = b"".join(parts) + b"<end>"
    got = bytearray()
    client.settimeout(WAIT)
    while len(got) < len(want):
        chunk = client.recv(65536)
        assert chunk
        got += chunk
    assert bytes(got) == want
    close_all(port, server, client)


@pytest.fixture(params=["afd", "fallback"])
def poll_port(request, make_port, monkeypatch) -> tuple[iocp.CompletionPort, str]:
    """An iocp port whose poll ops use the AFD poll, or the zero-byte
    fallback (IOCP_WIN_TEST_POLL_FALLBACK, read when the port is made)."""
    if request.param == "fallback":
        monkeypatch.setenv("IOCP_WIN_TEST_POLL_FALLBACK", "1")
    port = make_port(backend="iocp")
    monkeypatch.delenv("IOCP_WIN_TEST_POLL_FALLBACK", raising=False)
    return port, request.param


def test_poll_in_and_out(poll_port):
    """POLLOUT on a connected socket completes at once; POLLIN waits for
    data, then is level triggered until the data is read."""
    port, mode = poll_port
    client, server = tcp_pair()
    port.register(server)
    port.poll(server, iocp.POLLOUT)
    c = next_completion(port)
    assert c.ok and c.data == iocp.POLLOUT
    op = port.poll(server, iocp.POLLIN)
    nothing_for(port, 0.15)
    client.sendall(b"hi")
    c = next_completion(port)
    assert c.operation is op and c.ok and c.data == iocp.POLLIN and not c.more
    port.poll(server, iocp.POLLIN)
    c = next_completion(port)
    assert c.ok and c.data == iocp.POLLIN
    if mode == "afd":
        port.poll(server, iocp.POLLIN | iocp.POLLOUT)
        c = next_completion(port)
        assert c.ok and c.data == iocp.POLLIN | iocp.POLLOUT
    assert server.recv(16) == b"hi"
    close_all(port, server, client)


def test_poll_listener_is_readable_when_a_connection_waits(poll_port, listener):
    """A listening socket polls POLLIN when a connection is ready to accept
    (the fallback cannot poll a listener and says so with an error)."""
    port, mode = poll_port
    port.register(listener)
    if mode == "fallback":
        # A zero-byte WSARecv cannot wait on a listener: a clear error.
        op = port.poll(listener, iocp.POLLIN)
        c = next_completion(port)
        assert c.operation is op and not c.more
        assert isinstance(c.error, OSError) and c.error.winerror == 10057, c.error  # WSAENOTCONN
        port.unregister(listener)
        return
    op = port.poll(listener, iocp.POLLIN)
    nothing_for(port, 0.1)
    client = socket.create_connection(listener.getsockname(), timeout=WAIT)
    c = next_completion(port)
    assert c.operation is op and c.ok and c.data == iocp.POLLIN
    conn, _ = listener.accept()
    conn.close()
    client.close()
    port.unregister(listener)


def test_multishot_poll_reports_each_arrival_then_cancels(poll_port):
    """A multishot POLLIN reports (with `more`) each time data comes, goes
    quiet once the reader drained the socket, and ends cancelled."""
    port, mode = poll_port
    client, server = tcp_pair()
    port.register(server)
    op = port.poll(server, iocp.POLLIN, multishot=True)
    nothing_for(port, 0.1)
    for msg in (b"a", b"b"):
        client.sendall(msg)
        c = next_completion(port)
        assert c.operation is op and c.ok and c.more and c.data == iocp.POLLIN
        assert server.recv(16) == msg
        # Wine's socket state may lag the read by a moment (docs/windows.md):
        # a few late reports are allowed, then it must go quiet.
        for _ in range(5):
            c = port.get(timeout=0.15)
            if c is None:
                break
            assert c.more and c.data == iocp.POLLIN
        else:
            pytest.fail("multishot poll keeps reporting a drained socket")
    op.cancel()
    while True:
        c = next_completion(port)
        if not c.more:
            break
    assert c.operation is op and c.cancelled
    close_all(port, server, client)


def test_poll_sees_a_reset(poll_port):
    """A reset by the peer wakes a POLLIN poll: ERR|HUP through the AFD poll
    (the fallback's zero-byte recv may see it as end of stream, POLLIN)."""
    port, mode = poll_port
    client, server = tcp_pair()
    port.register(server)
    op = port.poll(server, iocp.POLLIN)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00")
    client.close()
    c = next_completion(port)
    assert c.operation is op and c.ok
    if mode == "afd":
        assert c.data & (iocp.POLLERR | iocp.POLLHUP), c.data
    else:
        assert c.data in (iocp.POLLERR | iocp.POLLHUP, iocp.POLLIN), c.data
    close_all(port, server)


def test_single_issuer_multishot_echo_with_silent_sends(make_port):
    """The event-loop shape on Windows: a single-issuer port driven by
    run_once, one armed multishot recv echoing every arrival with a silent
    send; 200 messages come back whole and in order, nothing leaks."""
    port = make_port(backend="iocp", single_issuer=True)
    client, server = tcp_pair()
    port.register(server)
    ended: list[iocp.Completion] = []

    def on_data(c: iocp.Completion) -> None:
        if c.more:
            port.send(server, c.data, silent=True)
        else:
            ended.append(c)

    op = port.recv(server, 0, on_data, multishot=True)
    client.settimeout(WAIT)
    for i in range(200):
        msg = b"echo %03d|" % i * (1 + i % 5)
        client.sendall(msg)
        got = bytearray()
        deadline = time.monotonic() + WAIT
        while len(got) < len(msg):
            assert time.monotonic() < deadline, f"message {i}: {len(got)} of {len(msg)}"
            port.run_once(0.01)
            client.setblocking(False)
            try:
                got += client.recv(65536)
            except BlockingIOError:
                pass
            finally:
                client.setblocking(True)
        assert bytes(got) == msg
    client.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + WAIT
    while not ended:
        assert time.monotonic() < deadline, "no end of stream"
        port.run_once(0.05)
    assert ended[0].operation is op and ended[0].eof and not ended[0].more
    close_all(port, server, client)
