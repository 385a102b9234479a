"""What :class:`~iocp.server.Server` and :class:`~iocp.server.Client` share.

Design note: an endpoint resolves the handler into a protocol factory,
validates the connection settings once (:class:`_Settings`), makes its loop
(on a port it owns or one it was given) and keeps the table of live
connections, whose changes wake :meth:`_Endpoint._wait_for`.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Callable, Dict, List

from iocp._core import CompletionPort
from iocp.server._loop import _Loop
from iocp.server._util import Address
from iocp.server.connection import Connection, _Owner

ProtocolFactory = Callable[[], Any]


def _as_factory(handler: Any) -> ProtocolFactory:
    """Resolve ``handler`` into a zero-argument protocol factory."""
    if isinstance(handler, type):
        return handler
    if hasattr(handler, "data_received"):
        return lambda: handler  # one shared instance
    if callable(handler):
        return handler  # type: ignore[no-any-return]
    if isinstance(handler, (str, bytes)):
        raise TypeError(
            f"handler must be a protocol factory, not the address {handler!r}: the order "
            "is Server(handler, host, port), Client(handler, host, port), "
            "connect(handler, host, port)"
        )
    raise TypeError(
        "handler must be a protocol factory (e.g. a Protocol subclass) or an object "
        f"with a data_received method, not {type(handler).__name__}"
    )


class _Settings:
    """Per-server (or client) connection settings."""

    def __init__(
        self,
        read_size: int,
        write_high_water: int | None,
        write_low_water: int | None,
        write_limit: int | None,
    ) -> None:
        if read_size <= 0:
            raise ValueError("read_size must be positive")
        high = 64 * 1024 if write_high_water is None else int(write_high_water)
        low = high // 4 if write_low_water is None else int(write_low_water)
        if not 0 <= low <= high:
            raise ValueError("need 0 <= write_low_water <= write_high_water")
        limit = max(16 * high, 1024 * 1024) if write_limit is None else int(write_limit)
        if limit < high:
            raise ValueError("write_limit must be >= write_high_water")
        self.read_size = int(read_size)
        self.high = high
        self.low = low
        self.limit = limit



class _Endpoint(_Owner):
    """Holds the loop, settings and live connections of a server or client."""

    _loop: _Loop

    def __init__(
        self,
        handler: Any,
        *,
        read_size: int,
        write_high_water: int | None,
        write_low_water: int | None,
        write_limit: int | None,
        backend: str | None,
        port_factory: Callable[[], Any] | None,
        completion_port: Any,
    ) -> None:
        self._factory = _as_factory(handler)
        self._settings = _Settings(read_size, write_high_water, write_low_water, write_limit)
        self._backend = backend
        self._port_factory = port_factory
        self._given_port = completion_port
        self._conns: Dict[int, Connection] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def _make_loop(self) -> _Loop:
        if self._given_port is not None:
            return _Loop(self._given_port, owned=False)
        if self._port_factory is not None:
            return _Loop(self._port_factory(), owned=True)
        return _Loop(CompletionPort(backend=self._backend), owned=True)

    @property
    def connections(self) -> List[Connection]:
        """A snapshot of the open connections."""
        with self._lock:
            return list(self._conns.values())

    @property
    def completion_port(self) -> Any:
        """The :class:`iocp.CompletionPort` in use (None before start)."""
        loop = getattr(self, "_loop", None)
        return loop.port if loop is not None else None

    def _new_connection(self, sock: socket.socket, peer: Address) -> Connection:
        try:
            sockname: Address = sock.getsockname()
        except OSError:
            sockname = None
        if sock.family in (socket.AF_INET, getattr(socket, "AF_INET6", -1)):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        protocol = self._factory()
        conn = Connection(self, sock, protocol, peer, sockname)
        return conn

    def _forget(self, conn: Connection) -> None:
        with self._lock:
            self._conns.pop(id(conn), None)
            self._changed.notify_all()

    def _wait_for(self, pred: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(min(left, 0.1))
        return True

    def _port_stats(self) -> Dict[str, Any]:
        port = self.completion_port
        if port is None:
            return {}
        try:
            return dict(port.stats())
        except Exception:
            return {}
