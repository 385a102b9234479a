"""iocp.server, issue 11 fixes: shutdown after start(threads=0),
Connection.pause_reading/resume_reading, one argument order for connect()
and Client, and asyncio-style handlers refused up front.  Every backend."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from typing import Any, List

import pytest

from iocp.server import Connection, Protocol, Server

LEAK_KEYS = ("live_ops", "inflight", "pinned_buffers", "live_buffers", "queued")


def assert_no_leaks(stats: dict) -> None:
    for key in LEAK_KEYS:
        if key in stats:
            assert stats[key] == 0, stats
    assert stats.get("connections", 0) == 0, stats


def recv_until_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(out)
        out += chunk


def recv_exact(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def run_port_until(port: Any, pred: Any, timeout: float = 5.0) -> bool:
    """Drive a port on this thread (as a start(threads=0) user does) until pred()."""
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        port.run(timeout=0.02)
    return bool(pred())


class Echo(Protocol):
    def data_received(self, conn: Connection, data: bytes) -> None:
        conn.send(data)


# --------------------------------------------------------------------------
# shutdown() after start(threads=0)


class Burst(Protocol):
    """Queues a payload larger than the socket buffers at once."""

    payload = os.urandom(2 * 1024 * 1024)

    def __init__(self) -> None:
        self.made = threading.Event()

    def connection_made(self, conn: Connection) -> None:
        conn.send(self.payload)
        self.made.set()


def _small_rcvbuf_client(addr: Any) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(addr)
    return s


def test_shutdown_after_start_threads0_drains(backend: str) -> None:
    """No loop thread: shutdown() runs the port itself until every buffered
    byte is written and nothing is left."""
    proto = Burst()
    srv = Server(lambda: proto, port=0, backend=backend, drain_timeout=20.0,
                 write_limit=8 << 20).start(threads=0)
    s = _small_rcvbuf_client(srv.address)
    try:
        assert run_port_until(srv.completion_port, proto.made.is_set)
        got: List[bytes] = []
        reader = threading.Thread(target=lambda: got.append(recv_until_eof(s, 20)))
        reader.start()
        final = srv.shutdown()
        reader.join(25)
        assert not reader.is_alive()
    finally:
        s.close()
    assert got == [Burst.payload]
    assert_no_leaks(final)
    assert srv.completion_port.closed


@pytest.mark.parametrize("where", ["callback", "signal"])
def test_shutdown_inside_the_callers_run_threads0(backend: str, where: str) -> None:
    """start(threads=0) and shutdown() from a callback or a signal handler of
    the caller's completion_port.run(): nothing can run the port there.
    Before the fix it spun until drain_timeout, then returned with the
    connection and 17 operations left (live_ops 17).  Now it refuses at
    once, with the server untouched, and request_shutdown() makes the
    caller's run() return so that shutdown() drains afterwards."""
    if where == "signal" and not hasattr(signal, "setitimer"):
        pytest.skip("needs signal.setitimer")
    proto = Burst()
    srv = Server(lambda: proto, port=0, backend=backend, drain_timeout=20.0,
                 write_limit=8 << 20).start(threads=0)
    port = srv.completion_port
    errors: List[BaseException] = []

    def stop(*_args: Any) -> None:
        try:
            srv.shutdown()
        except RuntimeError as exc:
            errors.append(exc)
        srv.request_shutdown()

    s = _small_rcvbuf_client(srv.address)
    got: List[bytes] = []
    reader = threading.Thread(target=lambda: got.append(recv_until_eof(s, 30)))
    try:
        assert run_port_until(port, proto.made.is_set)
        if where == "signal":
            old = signal.signal(signal.SIGALRM, stop)
            signal.setitimer(signal.ITIMER_REAL, 0.05)
        else:
            port.post(callback=lambda _c: stop())
        try:
            began = time.monotonic()
            port.run(timeout=30)  # returns once request_shutdown() stopped it
            assert time.monotonic() - began < 25, "request_shutdown() did not stop run()"
        finally:
            if where == "signal":
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
        assert len(errors) == 1 and "request_shutdown" in str(errors[0])
        assert srv.connections  # refused before anything was stopped
        reader.start()
        final = srv.shutdown()
        reader.join(35)
        assert not reader.is_alive()
    finally:
        s.close()
    assert got == [Burst.payload]
    assert_no_leaks(final)
