"""Small helpers shared by the tests."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import iocp


def tcp_pair(family: int = socket.AF_INET) -> tuple[socket.socket, socket.socket]:
    """A connected (client, server) TCP pair over loopback, made blocking."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family) as ls:
        ls.bind((host, 0))
        ls.listen(1)
        ls.settimeout(10)  # bounds the set-up; the pair itself is blocking
        client = socket.socket(family)
        client.settimeout(10)
        client.connect(ls.getsockname()[:2])
        server, _ = ls.accept()
    client.settimeout(None)
    server.settimeout(None)
    return client, server


def close_all(port, *socks: socket.socket) -> None:
    """Unregisters (if registered) and closes sockets."""
    for s in socks:
        try:
            port.unregister(s)
        except (ValueError, OSError):
            pass
        s.close()


def pump(port: iocp.CompletionPort, until, timeout: float = 10.0) -> None:
    """Runs the port one turn at a time until `until()` is true; fails the
    test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out pumping the port"
        port.run_once(0.05)
