"""The client of :mod:`iocp.server`: :class:`Client` and :func:`connect`.

Design note: a client is an endpoint with at most one connection.  It
connects with a ``connect`` operation on the port (trying each address
``getaddrinfo`` gives, blocking the caller with a timeout), then hands the
socket to a :class:`~iocp.server.Connection` exactly as the server does.  On
a port it owns it runs one loop thread; on a given port whoever runs that
port runs the callbacks.
"""

from __future__ import annotations

import errno
import inspect
import socket
import threading
import warnings
from typing import Any, Callable, Dict, List, Tuple

from iocp.server._endpoint import _Endpoint
from iocp.server._util import DEFAULT_PORT, _close_quietly, _fmt_addr, _unregister_close, log
from iocp.server.connection import Connection


class Client(_Endpoint):
    """A client connection on a completion port, with the same protocol shape.

    ``Client(handler, host, port).connect()`` connects (blocking, with a
    timeout) and returns the :class:`Connection`; the completion loop runs
    on a background thread unless ``completion_port`` is given (then whoever
    runs that port runs the callbacks).  Use :func:`connect` for the
    one-liner and ``with`` to close.
    """

    def __init__(
        self,
        handler: Any,
        host: str | None = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        path: str | None = None,
        family: int = 0,
        read_size: int = 64 * 1024,
        write_high_water: int | None = None,
        write_low_water: int | None = None,
        write_limit: int | None = None,
        backend: str | None = None,
        port_factory: Callable[[], Any] | None = None,
        completion_port: Any = None,
    ) -> None:
        super().__init__(
            handler,
            read_size=read_size,
            write_high_water=write_high_water,
            write_low_water=write_low_water,
            write_limit=write_limit,
            backend=backend,
            port_factory=port_factory,
            completion_port=completion_port,
        )
        self.host = host
        self.port = port
        self.path = path
        self.family = family
        self.connection: Connection | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once the connection is lost (or the client closed)."""
        return self._closed or (self.connection is not None and not self._conns)

    def connect(self, timeout: float | None = 10.0) -> Connection:
        """Connect and return the connection; raises OSError (e.g. ConnectionRefusedError)."""
        if self.connection is not None:
            raise RuntimeError("already connected")
        if self.path is not None:
            targets: List[Tuple[int, Any]] = [(socket.AF_UNIX, self.path)]
        else:
            targets = [
                (fam, addr)
                for fam, _, _, _, addr in socket.getaddrinfo(
                    self.host, self.port, self.family, socket.SOCK_STREAM
                )
            ]
        self._loop = self._make_loop(1)
        self._single = self._use_streams(self._loop, 1)
        if self._given_port is None:
            self._loop.start(1, name="iocp-client")
        err: OSError = OSError(errno.EADDRNOTAVAIL, "no address to connect to")
        try:
            for fam, addr in targets:
                try:
                    return self._connect_one(fam, addr, timeout)
                except OSError as exc:
                    err = exc
        except BaseException:
            self._stop_loop()
            raise
        self._stop_loop()
        raise err

    def _connect_one(self, fam: int, addr: Any, timeout: float | None) -> Connection:
        sock = socket.socket(fam, socket.SOCK_STREAM)
        port = self._loop.port
        done = threading.Event()
        result: List[Any] = []

        def on_connect(c: Any) -> None:
            result.append(c)
            done.set()

        try:
            port.register(sock)
            op = port.connect(sock, addr, callback=on_connect)
        except BaseException:
            _close_quietly(sock)
            raise
        if not done.wait(timeout):
            op.cancel()
            done.wait(2.0)
            _unregister_close(port, sock)
            raise TimeoutError(f"connect to {_fmt_addr(addr)} timed out")
        c = result[0]
        if c.error is not None or c.cancelled:
            _unregister_close(port, sock)
            raise c.error if c.error is not None else ConnectionError("connect cancelled")
        try:
            peer = sock.getpeername()
        except OSError:
            peer = addr
        try:
            conn = self._new_connection(sock, peer)  # the factory may refuse (TypeError)
        except BaseException:
            _unregister_close(port, sock)
            raise
        with self._lock:
            self._conns[conn] = None
        self.connection = conn
        conn._begin_any()
        return conn

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the connection is lost; False on timeout."""
        return self._wait_for(lambda: not self._conns, 1e9 if timeout is None else timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Close the connection (flushing), wait up to ``timeout``, stop the loop."""
        if self._closed:
            return
        conn = self.connection
        if conn is not None:
            conn.close()
            if not self.wait_closed(timeout):
                conn.abort()
                self.wait_closed(2.0)
        self._closed = True
        self._stop_loop()

    def _stop_loop(self) -> None:
        loop = getattr(self, "_loop", None)
        if loop is None:
            return
        # As for Server.shutdown: return only once every call we posted has
        # run and, on our own port, nothing is in flight or queued.
        if not loop.settle(5.0):
            log.warning("client: operations still outstanding 5 s after close")
        if loop.owned:
            loop.port.close()

    def __enter__(self) -> Client:
        if self.connection is None:
            self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()



_MISSING: Any = object()


def connect(
    _a: Any = _MISSING,
    _b: Any = _MISSING,
    _c: Any = _MISSING,
    /,
    *,
    timeout: float | None = 10.0,
    **kwargs: Any,
) -> Client:
    """``connect(handler, host="127.0.0.1", port=9527, *, timeout=10.0, **kwargs)``

    Connect and return the connected :class:`Client`.  The arguments come
    in the order of :class:`Client` and :class:`Server` (handler first, as
    in ``loop.create_connection(protocol_factory, host, port)``), by
    position or by name.  ``handler`` is a protocol factory as for
    :class:`Server`; other keyword arguments go to :class:`Client`.
    ``client.connection.send(...)`` writes, ``client.close()`` (or
    ``with``) closes.

    The old order ``connect(host, port, handler)`` still works, with a
    DeprecationWarning: a host is a ``str`` (or None), which no handler is,
    so a first positional argument of that type means the old order.
    """
    pos = [a for a in (_a, _b, _c) if a is not _MISSING]
    legacy = bool(pos) and (pos[0] is None or isinstance(pos[0], (str, bytes)))
    names = ("host", "port", "handler") if legacy else ("handler", "host", "port")
    if legacy:
        warnings.warn(
            "connect(host, port, handler) is deprecated: use connect(handler, host, port), "
            "the order of Client and Server",
            DeprecationWarning,
            stacklevel=2,
        )
    args: Dict[str, Any] = {"host": "127.0.0.1", "port": DEFAULT_PORT}
    for name, value in zip(names, pos):
        if name in kwargs:
            raise TypeError(f"connect() got multiple values for argument {name!r}")
        args[name] = value
    for name in ("handler", "host", "port"):
        if name in kwargs:
            args[name] = kwargs.pop(name)
    if "handler" not in args:
        raise TypeError("connect() missing the argument 'handler' (a protocol factory)")
    client = Client(args["handler"], args["host"], args["port"], **kwargs)
    client.connect(timeout)
    return client


connect.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [
        inspect.Parameter("handler", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("host", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="127.0.0.1"),
        inspect.Parameter("port", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=DEFAULT_PORT),
        inspect.Parameter("timeout", inspect.Parameter.KEYWORD_ONLY, default=10.0),
        inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD),
    ],
    return_annotation=Client,
)
