"""A socket closed without `unregister` must not poison its handle value.

The system hands a closed socket's value (a descriptor on Linux, a handle
on Windows) to a later socket: Linux at once (lowest free descriptor),
Windows soon (freed handle-table slots are reused).  The port still has the
old socket under that value.  Registering the new socket must succeed, the
old socket's pending ops must end (cancelled, exactly once) and the new
socket must work.  Runs on every backend.
"""

from __future__ import annotations

import socket

import pytest

import iocp
from tests.helpers import close_all, tcp_pair

# How many sockets to open while looking for the reused value.  Linux and
# Wine give it to the very next socket; Windows within a few.
MAX_TRIES = 256
TIMEOUT = 10.0


def socket_with_value(value: int) -> socket.socket:
    """A new TCP socket whose fileno() is `value` (bounded search).

    Every socket tried and not returned is closed before returning.
    """
    tried: list[socket.socket] = []
    try:
        for _ in range(MAX_TRIES):
            s = socket.socket()
            if s.fileno() == value:
                return s
            tried.append(s)
        pytest.fail(f"no new socket got the value {value} in {MAX_TRIES} tries")
    finally:
        for t in tried:
            t.close()


def get(port: iocp.CompletionPort) -> iocp.Completion:
    """The next completion, or fail the test after TIMEOUT."""
    c = port.get(timeout=TIMEOUT)
    assert c is not None, "no completion within the timeout"
    return c


def round_trip(port: iocp.CompletionPort, sock: socket.socket, addr: tuple,
               listener: socket.socket) -> None:
    """Connects `sock` (registered) to `listener` through the port, then
    sends one message each way through the port."""
    listener.settimeout(TIMEOUT)
    port.connect(sock, addr)
    c = get(port)
    assert c.kind == "connect" and c.ok, c.error
    peer, _ = listener.accept()
    try:
        peer.settimeout(TIMEOUT)
        port.send(sock, b"ping")
        c = get(port)
        assert c.kind == "send" and c.ok and c.nbytes == 4, c.error
        got = b""
        while len(got) < 4:
            chunk = peer.recv(4 - len(got))
            assert chunk, "peer saw end of stream"
            got += chunk
        assert got == b"ping"
        peer.sendall(b"pong")
        got = b""
        while len(got) < 4:
            port.recv(sock, 4 - len(got))
            c = get(port)
            assert c.kind == "recv" and c.ok and not c.eof, c.error
            got += c.data
        assert got == b"pong"
    finally:
        peer.close()


def test_reused_value_registers_and_works(make_port, listener) -> None:
    """Close a registered socket without unregister; the next socket given
    its value registers and does a round trip."""
    port = make_port()
    old = socket.socket()
    port.register(old)
    value = old.fileno()
    old.close()  # no unregister: the port still has `value`
    new = socket_with_value(value)
    try:
        port.register(new)
        round_trip(port, new, listener.getsockname(), listener)
    finally:
        close_all(port, new)
    assert port.stats()["inflight"] == 0


def test_reused_value_ends_the_old_sockets_ops(make_port, listener) -> None:
    """A recv pending on the closed socket ends cancelled, exactly once, and
    never touches the new socket that took its value."""
    port = make_port()
    client, server = tcp_pair()
    try:
        port.register(server)
        value = server.fileno()
        stale = port.recv(server, 100)
        server.close()  # pending recv, no unregister
        new = socket_with_value(value)
        try:
            port.register(new)
            # Windows aborts the recv at close, the Linux backends when the
            # value is registered again; either way it ends now.  No data
            # was ever sent to it, so it cannot have succeeded.
            c = get(port)
            assert c.operation is stale
            assert c.cancelled and c.data is None, (c.error, c.data)
            round_trip(port, new, listener.getsockname(), listener)
            assert port.get(timeout=0) is None
        finally:
            close_all(port, new)
    finally:
        client.close()
    assert port.stats()["inflight"] == 0


def test_same_open_socket_still_refused(port) -> None:
    """Taking over a reused value must not let the same open socket be
    registered twice."""
    s = socket.socket()
    try:
        port.register(s)
        with pytest.raises((ValueError, OSError)):
            port.register(s)
    finally:
        close_all(port, s)
