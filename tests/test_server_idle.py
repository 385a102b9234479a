"""iocp.Server's idle sweep, on every backend and in both modes: it sleeps
until the earliest moment a connection can have been idle for
``idle_timeout`` (not every second whatever the timeout), and still closes
an idle connection with a TimeoutError.  Delays are read, not timed."""

from __future__ import annotations

import socket
import threading
from typing import Any, List

import pytest

from iocp.server import Connection, Protocol, Server


class Echo(Protocol):
    def __init__(self) -> None:
        self.lost: List[Any] = []
        self.gone = threading.Event()

    def data_received(self, conn: Connection, data: bytes) -> None:
        conn.send(data)

    def connection_lost(self, conn: Connection, exc: BaseException | None) -> None:
        self.lost.append(exc)
        self.gone.set()


@pytest.mark.parametrize("threads", [1, 2])
def test_sweep_sleeps_until_the_earliest_deadline(backend: str, threads: int) -> None:
    proto = Echo()
    server = Server(lambda: proto, "127.0.0.1", 0, backend=backend, idle_timeout=30.0)
    server.start(threads)
    delays: List[float] = []
    swept = threading.Event()
    real = server._loop.call_later

    def recording(delay: float, fn: Any) -> bool:
        delays.append(delay)
        swept.set()
        return real(delay, fn)

    try:
        with socket.create_connection(server.address, timeout=5) as c:
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
            server._loop.call_later = recording  # type: ignore[method-assign]
            server._loop.call_soon(server._idle_check)
            assert swept.wait(5)
            # The connection was just active: no sweep is due for about
            # the whole timeout (it was every second before).
            assert 25.0 < delays[0] <= 30.0, delays
            assert not proto.lost
    finally:
        server._loop.call_later = real  # type: ignore[method-assign]
        server.shutdown(5)


@pytest.mark.parametrize("threads", [1, 2])
def test_idle_connection_is_closed(backend: str, threads: int) -> None:
    proto = Echo()
    server = Server(lambda: proto, "127.0.0.1", 0, backend=backend, idle_timeout=0.2)
    server.start(threads)
    try:
        with socket.create_connection(server.address, timeout=5) as c:
            c.sendall(b"x")
            assert c.recv(1) == b"x"
            assert proto.gone.wait(5)
            assert isinstance(proto.lost[0], TimeoutError)
            c.settimeout(5)
            try:
                assert c.recv(1) == b""
            except ConnectionResetError:
                pass
    finally:
        server.shutdown(5)
