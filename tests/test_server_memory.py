"""What an idle connection of iocp.Server holds on the Python side, on every
backend: objects counted (gc-tracked objects per connection), not timed.

The single-thread mode (the stream core) keeps, per connection: the
Connection, its Stream, the user's protocol and the socket -- no bound
method (the stream keeps the protocol's data_received as its class's
function, send/write are C functions of the class, the hooks are the
connection class's functions), no hooks object, no extra-info dict, no
address tuple (the peer is kept raw in the stream).  The bound below is
those four plus one of slack (17 objects before the hooks were folded into
one object, 10 before the Stream kept its hooks and addresses itself)."""

from __future__ import annotations

import gc
import socket
import time
from typing import Any, List

import pytest

from iocp import _core
from iocp.server import Connection, Server

HAVE_STREAM = hasattr(_core, "Stream")
N = 64
MAX_OBJECTS_PER_CONN = 5


class Echo:
    def data_received(self, conn: Connection, data: bytes) -> None:
        conn.send(data)


def _wait(pred: Any, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return bool(pred())


def _open_idle(port: int, n: int) -> List[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"x" * 64)
        socks.append(s)
    for s in socks:  # each echoed once: set up, read, written, now idle
        got = b""
        while len(got) < 64:
            chunk = s.recv(64 - len(got))
            assert chunk
            got += chunk
    return socks


@pytest.mark.skipif(not HAVE_STREAM, reason="the core has no Stream")
def test_idle_connection_objects_are_bounded(backend: str) -> None:
    server = Server(Echo, "127.0.0.1", 0, backend=backend, backlog=256)
    server.start(1)
    socks: List[socket.socket] = []
    try:
        port = server.address[1]
        for s in _open_idle(port, 4):  # warm up: first-use caches
            s.close()
        assert _wait(lambda: not server.connections)
        gc.collect()
        before = len(gc.get_objects())
        socks = _open_idle(port, N)
        assert _wait(lambda: len(server.connections) == N)
        gc.collect()
        # Less the test's own client socket of each connection; a few
        # objects of slack for the whole (a table growing, a cache).
        grown = len(gc.get_objects()) - before - N
        assert grown <= N * MAX_OBJECTS_PER_CONN + 8, grown / N
        conns = server.connections
        assert all(hasattr(c, "_stream") for c in conns)
        # The threaded mode's state (its slots) is not carried along, nor
        # what the owner already holds (loop, port, settings, limits).
        owned = ("_mail", "_lock", "_loop", "_port", "_cfg", "_high", "_low", "_limit", "_exc")
        assert not any(hasattr(type(c), name) for c in conns for name in owned)
        # The addresses are the stream's, and right.
        mine = {s.getsockname() for s in socks}
        assert {c.peername for c in conns} == mine
        assert {c.sockname for c in conns} == {("127.0.0.1", port)}
        # No bound method of the connection or of its protocol is kept.
        for c in conns[:4]:
            for obj in (c, c.protocol):
                for ref in gc.get_referrers(obj):
                    assert getattr(ref, "__self__", None) is not obj, ref
    finally:
        for s in socks:
            s.close()
        stats = server.shutdown(5)
    assert stats["connections"] == 0
    for key in ("live_ops", "inflight", "pinned_buffers", "live_buffers"):
        assert stats.get(key, 0) == 0, stats
