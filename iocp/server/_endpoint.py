"""What :class:`~iocp.server.Server` and :class:`~iocp.server.Client` share.

Design note: an endpoint resolves the handler into a protocol factory,
validates the connection settings once (:class:`_Settings`), makes its loop
(on a port it owns or one it was given) and keeps the table of live
connections, whose changes wake :meth:`_Endpoint._wait_for`.
"""

from __future__ import annotations

import inspect
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, List

from iocp._core import CompletionPort
from iocp.server._loop import _Loop
from iocp.server._util import Address
from iocp.server.connection import (
    Connection,
    _Owner,
    _Stream,
    _StreamConnection,
    _ThreadedConnection,
)

ProtocolFactory = Callable[[], Any]


# How many positional arguments (after self) each protocol method receives:
# the connection first, unlike asyncio, whose methods take no transport
# argument after connection_made.
_ARITY = {
    "connection_made": 1,
    "data_received": 2,
    "eof_received": 1,
    "connection_lost": 2,
    "pause_writing": 1,
    "resume_writing": 1,
}


def _takes(fn: Any, n: int) -> bool:
    """True unless ``fn``'s signature surely cannot take ``n`` positionals."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read: trust it
        return True
    params = list(sig.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return True
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    return len(required) <= n <= len(positional)


def _check_protocol(cls: type) -> None:
    """Refuse, with a clear TypeError, a protocol class written for asyncio.

    Its methods would be called with the connection as an extra first
    argument and fail on the first event (or worse, misbehave), so it is
    caught here, when the Server or Client is made (or, for a factory,
    when it makes its first protocol).
    """
    aio = sys.modules.get("asyncio")  # not imported: cls cannot be an asyncio protocol
    if aio is not None and issubclass(cls, aio.BaseProtocol):
        raise TypeError(
            f"{cls.__qualname__} is an asyncio protocol (an asyncio."
            f"{next(b for b in cls.__mro__ if b.__module__.startswith('asyncio')).__qualname__}"
            "): its methods take no connection argument.  iocp.server calls "
            "data_received(conn, data), eof_received(conn), connection_lost(conn, exc) ...: "
            "subclass iocp.server.Protocol instead, or serve the asyncio protocol with "
            "iocp.aio (loop.create_server)"
        )
    for name, n in _ARITY.items():
        raw = inspect.getattr_static(cls, name, None)
        if isinstance(raw, staticmethod):
            fn, n_all = raw.__func__, n
        elif isinstance(raw, classmethod):
            fn, n_all = raw.__func__, n + 1
        elif inspect.isfunction(raw):
            fn, n_all = raw, n + 1  # self
        else:
            continue
        if not _takes(fn, n_all):
            args = ", ".join(("conn", "data" if name == "data_received" else "exc")[: n])
            raise TypeError(
                f"{cls.__qualname__}.{name} must take ({args}): iocp.server passes the "
                "connection first (an asyncio-style protocol does not fit; see "
                "iocp.server.Protocol, or use iocp.aio for asyncio protocols)"
            )
    if getattr(cls, "data_received", None) is None and hasattr(cls, "get_buffer"):
        raise TypeError(
            f"{cls.__qualname__} is a buffered (get_buffer/buffer_updated) protocol: "
            "iocp.server calls data_received(conn, data); use iocp.aio for it"
        )


class _CheckedFactory:
    """A user factory whose products are checked once per protocol class."""

    __slots__ = ("fn", "seen")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.seen: set[type] = set()

    def __call__(self) -> Any:
        protocol = self.fn()
        cls = type(protocol)
        if cls not in self.seen:
            _check_protocol(cls)
            self.seen.add(cls)
        return protocol


def _as_factory(handler: Any) -> ProtocolFactory:
    """Resolve ``handler`` into a zero-argument protocol factory."""
    if isinstance(handler, type):
        _check_protocol(handler)
        return handler
    aio = sys.modules.get("asyncio")
    if (aio is not None and isinstance(handler, aio.BaseProtocol)) or hasattr(
        handler, "data_received"
    ):
        _check_protocol(type(handler))
        return lambda: handler  # one shared instance
    if callable(handler):
        return _CheckedFactory(handler)
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
        # Keyed by the connection itself (identity hash: no int per entry),
        # in admission order.
        self._conns: Dict[Connection, None] = {}
        # One thread dispatches the port: connections go on the stream core.
        self._single = False
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def _use_streams(self, loop: _Loop, threads: int) -> bool:
        """The single-thread mode: the stream core, on a port of our own that
        at most one thread runs.  A shared port may be run by any number of
        threads, so its connections stay on the threaded path."""
        return (
            _Stream is not None
            and loop.owned
            and threads <= 1
            and isinstance(loop.port, CompletionPort)  # a stream needs the real port
        )

    def _make_loop(self, threads: int) -> _Loop:
        """The loop for ``threads`` loop threads (0: the caller runs the port).

        With at most one loop thread, every thread that starts an operation
        either is the loop thread or only starts operations and then sleeps
        or waits (start(), shutdown(), a user's send()), so the port is
        cooperative: on io_uring a completion does not interrupt its
        submitter.  With several loop threads, any of them may be waiting
        while another, busy in a callback, started the operation."""
        if self._given_port is not None:
            return _Loop(self._given_port, owned=False)
        if self._port_factory is not None:
            return _Loop(self._port_factory(), owned=True)
        return _Loop(CompletionPort(backend=self._backend, cooperative=threads <= 1), owned=True)

    @property
    def connections(self) -> List[Connection]:
        """A snapshot of the open connections."""
        with self._lock:
            return list(self._conns)

    @property
    def completion_port(self) -> Any:
        """The :class:`iocp.CompletionPort` in use (None before start)."""
        loop = getattr(self, "_loop", None)
        return loop.port if loop is not None else None

    def _new_connection(self, sock: socket.socket, peer: Address) -> Connection:
        sockname: Address = None
        if not self._single:  # a stream reads its own addresses
            try:
                sockname = sock.getsockname()
            except OSError:
                pass
        if sock.family in (socket.AF_INET, getattr(socket, "AF_INET6", -1)):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        protocol = self._factory()
        cls = _StreamConnection if self._single else _ThreadedConnection
        conn = cls(self, sock, protocol, peer, sockname)
        return conn

    def _forget(self, conn: Connection) -> None:
        with self._lock:
            self._conns.pop(conn, None)
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
