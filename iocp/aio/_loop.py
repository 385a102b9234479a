"""iocp.aio.EventLoop: asyncio's proactor event loop on an iocp.CompletionPort.

Why BaseProactorEventLoop and not a loop of our own on BaseEventLoop:
CPython already has a complete, well-tested event loop for exactly this
model -- Windows' ProactorEventLoop, whose transports (streams, SSL through
sslproto, servers, datagrams) are written against a small "proactor"
interface of overlapped operations that each resolve one future.  That
interface maps one to one onto the completion port (see ``_proactor``), so
we reuse every transport and supply the proactor, and get the same
behaviour asyncio has on Windows, everywhere the port runs.  Where those
transports go wrong off Windows -- an error from shutdown() on a reset
socket skipping the close -- thin subclasses here fix them (the only place
that touches the transports' private parts; see docs/asyncio.md,
"Transports").  Datagrams have a transport of our own on the port's poll
ops (``_datagram``).  What the proactor loop lacks on POSIX we add here:
add_reader/add_writer (the port's poll ops, ``_readiness``), signal
handlers, pipes and subprocesses (the stdlib Unix pipe transports on that
readiness), Unix sockets.
"""

from __future__ import annotations

import collections
import errno
import os
import signal
import socket
import sys
import threading
import time
import warnings
from asyncio import events, futures, tasks
from asyncio.log import logger
from typing import Any

from iocp import _core
from iocp._core import CompletionPort

from . import _compat
from ._datagram import DatagramTransport, ready_call
from ._proactor import Proactor
from ._readiness import PortReadiness, fileobj_to_fd

# Every private stdlib name comes from _compat (version gates there).
_ProactorLoop: Any = _compat.BaseProactorEventLoop
_ProactorSocketTransport: Any = _compat.ProactorSocketTransport
_HAS_SETUP = _compat.HAS_RUN_FOREVER_SETUP
_DETACH_TAKES_TRANSPORT = _compat.DETACH_TAKES_TRANSPORT
_Handle = events.Handle
_Task = tasks.Task

# The loop iteration, call_soon and create_future in C (src/aioloop.pxi),
# on the stdlib's own Handle and Future objects; False (the Python code
# below runs) where the core cannot lay its hands on Handle's slots.
_C_LOOP: bool = _core.aio_setup(
    events.Handle, events.TimerHandle, futures.Future,
    _compat.base_run_once, _compat.base_call_soon, _compat.report_callback_error,
    _compat.MIN_SCHEDULED_TIMER_HANDLES, _compat.MIN_CANCELLED_TIMER_HANDLES_FRACTION,
    _compat.MAXIMUM_SELECT_TIMEOUT, _compat.BaseProactorEventLoop._process_events, Proactor,
)

try:
    import ssl as _ssl
except ImportError:  # pragma: no cover - Python built without OpenSSL
    _ssl = None  # type: ignore[assignment]

def _close_socket(sock: socket.socket) -> None:
    """shutdown(SHUT_RDWR) then close(), and neither may raise.

    The stdlib proactor transports shut a socket down before closing it
    (for Windows' sake) and let the error escape.  On Linux shutdown()
    raises ENOTCONN once the peer has reset, and always on an unconnected
    datagram socket (EBADF if the fd was closed behind our back); the
    socket is going away either way, so the error says nothing worth a
    traceback.  close() marks the socket closed before the close(2) call,
    so the fd is released even when that reports an error.
    """
    try:
        if sock.fileno() != -1:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class _ConnectionLostMixin:
    """connection_lost() for the proactor transports that always releases.

    The stdlib's ``_call_connection_lost`` calls ``protocol.connection_lost``
    and then, in a ``finally``, shuts the socket down, closes it and
    detaches from the server -- and an OSError from shutdown() skips the
    rest: the fd leaks, the loop's exception handler logs a traceback, and
    ``Server.wait_closed()`` never returns.  This replaces it: the same
    steps, in the same order (the socket stays open while the protocol's
    connection_lost runs), but the release cannot be cut short.  It also
    leaves the port first, so the socket's ops are cancelled before its fd
    can be reused.
    """

    _loop: Any
    _protocol: Any
    _sock: socket.socket | None
    _server: Any
    _conn_lost: int
    _closing: bool

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        sock = self._sock
        if sock is None:  # already released
            return
        try:
            proactor = self._loop._proactor
            if proactor is not None:
                proactor._unregister(sock)  # cancels its ops while the fd is ours
            self._protocol.connection_lost(exc)
        finally:
            self._release(sock)

    def _release(self, sock: socket.socket) -> None:
        self._sock = None
        if not self._conn_lost:  # later writes are dropped, not attempted
            self._conn_lost = 1
        self._called_connection_lost = True  # 3.10+ reads it in _force_close
        try:
            _close_socket(sock)
        finally:
            server, self._server = self._server, None
            if server is not None:
                if _DETACH_TAKES_TRANSPORT:
                    server._detach(self)
                else:
                    server._detach()

    if sys.version_info < (3, 10):

        def _force_close(self, exc: BaseException | None) -> None:
            # 3.9's returns at once if close() was called: a peer reset
            # while close() waits for pending writes then ends the writes
            # but never calls connection_lost.  Let it finish (3.10+ does).
            if self._sock is not None:
                self._closing = False
            super()._force_close(exc)  # type: ignore[misc]

    def __del__(self, _warn: Any = warnings.warn) -> None:
        # As newer Pythons do (3.9 calls close(), which needs an open loop).
        if self._sock is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()


class _SocketTransport(_ConnectionLostMixin, _ProactorSocketTransport):  # type: ignore[misc]
    """The stdlib proactor stream transport (TCP, Unix), releasing its
    socket whatever the socket reports (see _ConnectionLostMixin)."""

    _protocol_paused: bool
    _write_fut: Any
    _buffer: Any

    def set_protocol(self, protocol: Any) -> None:
        # "Paused" is the state of the protocol that got pause_writing(): a
        # new one -- start_tls() swaps in its SSLProtocol, right after a
        # large write maybe -- starts unpaused, so it must not get a
        # resume_writing() it never asked for (sslproto asserts on it).
        self._protocol_paused = False
        super().set_protocol(protocol)

    def close(self) -> None:
        # As the selector transports: while the queued writes drain after
        # close(), the protocol may still write -- sslproto sends its
        # close_notify from resume_writing(), once the buffer is low.  The
        # stdlib proactor marks the connection lost at once, dropping it.
        if self._closing:
            return
        draining = self._write_fut is not None or bool(self._buffer)
        super().close()
        if draining:
            self._conn_lost -= 1  # _release() sets it

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        # The write loop schedules this once the writes have drained after
        # close() -- and then calls resume_writing(), whose writes (see
        # close()) would be cut off.  So a graceful close waits for any
        # write that started since: the write loop schedules this again
        # when it is done.  A forced close (abort, error) has already
        # dropped the writes.
        if exc is None and (self._write_fut is not None or self._buffer) and not self._conn_lost:
            return
        super()._call_connection_lost(exc)


# Accept errors that leave the listening socket usable: the next accept may
# well succeed (the selector loops go on after them too).  Running out of
# descriptors or memory waits ACCEPT_RETRY_DELAY before trying again.
_ACCEPT_TRANSIENT = frozenset(
    getattr(errno, name)
    for name in ("ECONNABORTED", "ECONNRESET", "EPROTO", "EPERM", "EAGAIN", "EINTR")
    if hasattr(errno, name)
)
_ACCEPT_RESOURCES = frozenset(
    getattr(errno, name)
    for name in ("EMFILE", "ENFILE", "ENOBUFS", "ENOMEM")
    if hasattr(errno, name)
)
_ACCEPT_RETRY_DELAY = 1.0


class _Acceptor:
    """A listening socket's accept loop on one multishot accept.

    One armed ``port.accept(sock, multishot=True)`` per listening socket
    completes once per connection, inside ``run_once``'s dispatch, where
    the socket is only queued; one loop callback per batch then hands every
    queued socket to the protocol factory and a transport, as the stdlib
    proactor loop's accept loop does (one accept, one future and one loop
    iteration per connection there).  At most ``backlog`` accepted sockets
    wait for that callback: the completion that reaches the bound serves
    them at once, inside the dispatch.
    ``cancel()`` (``Server.close()``, ``loop.close()``) cancels the op and
    closes the sockets accepted but not yet served, and any the op still
    brings.  It stands in ``loop._accept_futures`` where the stdlib keeps
    its accept future; ``cancel()`` is all the loop asks of it there.
    """

    __slots__ = (
        "_loop", "_sock", "_factory", "_ssl", "_server", "_backlog",
        "_handshake_timeout", "_shutdown_timeout", "_op", "_pending",
        "_scheduled", "_closed", "_retry",
    )

    def __init__(
        self,
        loop: EventLoop,
        sock: socket.socket,
        protocol_factory: Any,
        sslcontext: Any,
        server: Any,
        backlog: int,
        ssl_handshake_timeout: Any,
        ssl_shutdown_timeout: Any,
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._factory = protocol_factory
        self._ssl = sslcontext
        self._server = server
        self._backlog = max(1, backlog)
        self._handshake_timeout = ssl_handshake_timeout
        self._shutdown_timeout = ssl_shutdown_timeout
        self._op: Any = None
        self._pending: collections.deque[tuple[socket.socket, Any]] = collections.deque()
        self._scheduled = False
        self._closed = False
        self._retry: Any = None  # the call_later of a retry after EMFILE & co.

    def arm(self) -> None:
        """Arms the multishot accept (no-op if armed, closed or waiting)."""
        self._retry = None
        if self._closed or self._op is not None:
            return
        loop = self._loop
        sock = self._sock
        try:
            if loop.is_closed():
                raise ConnectionAbortedError("the event loop is closed")
            port = loop._proactor._register(sock)
            # No peer tuple per connection: the stream reads the peer raw.
            self._op = port.accept(sock, self._on_accept, multishot=True, address=False)
        except (OSError, ValueError, RuntimeError) as exc:
            self._failed(exc)

    def _on_accept(self, c: Any) -> None:
        """The op's completions (run_once's dispatch): queued for one loop
        callback; at the bound, served at once."""
        if c.error is None and not c.cancelled:
            conn = c.data[0]
            if self._closed:
                conn.close()  # accepted as the server closed
            else:
                pending = self._pending
                pending.append(c.data)
                if len(pending) >= self._backlog:
                    self._serve()  # the bound: serve them now
                elif not self._scheduled:
                    self._scheduled = True
                    self._loop.call_soon(self._serve_soon)
        if c.more:
            return
        self._op = None  # its final completion
        if self._closed:
            return
        exc = c.error
        if exc is not None and not c.cancelled:
            code = getattr(exc, "errno", None)
            if code in _ACCEPT_TRANSIENT:
                pass
            elif code in _ACCEPT_RESOURCES:
                self._loop.call_exception_handler({
                    "message": "socket.accept() out of system resource",
                    "exception": exc,
                    "socket": _compat.TransportSocket(self._sock),
                })
                self._retry = self._loop.call_later(_ACCEPT_RETRY_DELAY, self.arm)
                return
            else:
                self._failed(exc)
                return
        self.arm()  # the backend ended it: a new one

    def _failed(self, exc: BaseException) -> None:
        """As the stdlib proactor loop: an accept that fails for good is
        reported and closes the listening socket."""
        loop = self._loop
        sock = self._sock
        if isinstance(exc, OSError) and sock.fileno() != -1 and not loop.is_closed():
            loop.call_exception_handler({
                "message": "Accept failed on a socket",
                "exception": exc,
                "socket": _compat.TransportSocket(sock),
            })
            self.cancel()
            proactor = loop._proactor
            if proactor is not None:
                proactor._unregister(sock)
            sock.close()
        elif loop._debug:
            logger.debug("Accept failed on socket %r", sock, exc_info=True)

    def _serve_soon(self) -> None:
        self._scheduled = False
        self._serve()

    def _serve(self) -> None:
        """A loop callback (or, at the bound, the op's completion): every
        queued socket gets its protocol and transport, in order."""
        loop = self._loop
        pending = self._pending
        while pending and not self._closed:
            conn, _ = pending.popleft()  # no address: the stream reads it
            if loop._debug:
                try:
                    addr = conn.getpeername()
                except OSError:
                    addr = None
                logger.debug("%r got a new connection from %r: %r", self._server, addr, conn)
            try:
                protocol = self._factory()
                if self._ssl is not None:
                    kwargs = {}
                    if self._shutdown_timeout is not None:  # 3.11+
                        kwargs["ssl_shutdown_timeout"] = self._shutdown_timeout
                    loop._make_ssl_transport(
                        conn, protocol, self._ssl, server_side=True,
                        server=self._server,
                        ssl_handshake_timeout=self._handshake_timeout, **kwargs,
                    )
                else:
                    loop._make_socket_transport(conn, protocol, server=self._server)
            except (SystemExit, KeyboardInterrupt):
                conn.close()
                raise
            except BaseException as exc:
                conn.close()
                loop.call_exception_handler({
                    "message": "Error setting up a connection accepted on a socket",
                    "exception": exc,
                    "socket": _compat.TransportSocket(self._sock),
                })

    def cancel(self) -> bool:
        """Stops accepting: cancels the op (its last completions close
        what it still brings) and closes the sockets not served yet.

        ``_op`` stays set until the op's final completion (``_on_accept``):
        a connection the op took before the cancel reached it (an AcceptEx
        that completed into its socket, its packet still queued) is closed
        only when that completion is dispatched, so ``_op is None`` is what
        says nothing accepted is left open."""
        if self._closed:
            return False
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        op = self._op
        if op is not None:
            try:
                op.cancel()
            except Exception:
                self._op = None  # no completion to wait for (the port is gone)
        while self._pending:
            self._pending.popleft()[0].close()
        return True


class EventLoop(_ProactorLoop):  # type: ignore[misc]
    """An asyncio event loop whose I/O goes through an iocp.CompletionPort.

    ``EventLoop(port=None, *, backend=None, queue_capacity=1024)``: pass a
    port of your own, or let the loop make one (``backend`` as in
    ``iocp.CompletionPort``): a single-issuer port, owned by the first
    thread that runs the loop, which must also close it.  The loop owns its
    port and closes it in ``close()``.
    """

    _self_reading_future: Any  # BaseProactorEventLoop's
    _fast_debug = False  # get_debug is a stored C callable (_bind_hot_paths)

    def __init__(
        self,
        port: CompletionPort | None = None,
        *,
        backend: str | None = None,
        queue_capacity: int = 1024,
    ) -> None:
        if port is None:
            # Single-issuer: only the loop's thread touches it (post() and
            # stop() stay thread-safe for call_soon_threadsafe).  Creating
            # the loop does not use it, so the owner is the running thread
            # (see Proactor.claim()).
            port = CompletionPort(
                backend=backend, queue_capacity=queue_capacity, single_issuer=True
            )
        elif not isinstance(port, CompletionPort):
            raise TypeError(f"expected an iocp.CompletionPort or None, got {type(port).__name__}")
        self._port = port
        self._readiness: PortReadiness | None = None
        self._signal_handlers: dict[int, events.Handle] = {}
        # The wakeup fd in effect before our first signal handler, put back
        # when the last one goes (None: we have not replaced it).
        self._saved_wakeup_fd: int | None = None
        # Unix server sockets to unlink when they stop serving (3.13+'s
        # create_unix_server(cleanup_socket=True) fills it).
        self._unix_server_sockets: dict[socket.socket, int] = {}
        self._init_proactor_loop(Proactor(port))
        self._bind_hot_paths()

    def _init_proactor_loop(self, proactor: Proactor) -> None:
        # BaseProactorEventLoop.__init__ (the same on 3.9 - 3.15) minus its
        # last step, signal.set_wakeup_fd(self-pipe) on the main thread:
        # a loop that handles no signal must leave the process's wakeup fd
        # alone, as the selector loops do (an outer loop or library may own
        # it).  add_signal_handler() installs ours.
        _compat.BaseEventLoop.__init__(self)
        self._proactor = proactor
        self._selector = proactor  # the stdlib's alias
        self._self_reading_future = None
        self._accept_futures: dict[int, Any] = {}
        proactor.set_loop(self)
        self._make_self_pipe()

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} backend={self._port.backend} "
            f"running={self.is_running()} closed={self.is_closed()}>"
        )

    @property
    def port(self) -> CompletionPort:
        """The loop's completion port (closed with the loop; stats() stays)."""
        return self._port

    @property
    def backend(self) -> str:
        return self._port.backend

    # ---- hot paths ---------------------------------------------------------
    # Every Future and Handle asks its loop get_debug() as it is made, and
    # call_soon / create_task / time run once or more per callback: in
    # BaseEventLoop they are Python frames calling more Python frames
    # (_check_closed, _call_soon, get_debug).  Here get_debug and time are
    # C callables stored on the instance, and call_soon / create_task do
    # their checks inline, deferring to BaseEventLoop's own in debug mode
    # (its thread and callback checks, source tracebacks) and for task
    # factories or arguments they do not know.  Behaviour is unchanged.

    def _bind_hot_paths(self) -> None:
        # Not where a subclass defines its own (a test clock, say).
        cls = type(self)
        if cls.time is _compat.BaseEventLoop.time:
            self.time = time.monotonic  # type: ignore[method-assign]
        self._fast_debug = cls.get_debug is _compat.BaseEventLoop.get_debug
        if self._fast_debug:
            self.get_debug = bool(self._debug).__bool__  # type: ignore[method-assign]

    def set_debug(self, enabled: bool) -> None:
        _compat.base_set_debug(self, enabled)
        if self._fast_debug:
            self.get_debug = bool(self._debug).__bool__  # type: ignore[method-assign]

    if _C_LOOP:
        # BaseEventLoop's in debug mode (the C code defers to it there).
        call_soon = _core.aio_call_soon
        _run_once = _core.aio_run_once
        create_future = _core.aio_create_future
    else:  # pragma: no cover - an interpreter whose Handle has other slots

        def call_soon(self, callback: Any, *args: Any, context: Any = None) -> events.Handle:
            if self._closed:
                raise RuntimeError("Event loop is closed")
            if self._debug:
                return _compat.base_call_soon(self, callback, *args, context=context)  # type: ignore[no-any-return]
            handle = _Handle(callback, args, self, context)
            self._ready.append(handle)
            return handle

    def create_task(
        self, coro: Any, *, name: Any = None, context: Any = None, **kwargs: Any
    ) -> Any:
        if kwargs or self._debug or self._task_factory is not None:
            if context is not None or _compat.PY311:
                kwargs["context"] = context
            return _compat.base_create_task(self, coro, name=name, **kwargs)
        if self._closed:
            raise RuntimeError("Event loop is closed")
        if context is None:
            return _Task(coro, loop=self, name=name)
        return _Task(coro, loop=self, name=name, context=context)

    # ---- transports ------------------------------------------------------

    def _make_socket_transport(self, sock, protocol, waiter=None, extra=None, server=None):  # type: ignore[no-untyped-def]
        # TCP and Unix stream sockets: the connection core (iocp/aio/_transport.py).
        from ._transport import TCPTransport, is_stream_socket

        if is_stream_socket(sock):
            return TCPTransport(self, sock, protocol, waiter, extra, server)
        return _SocketTransport(self, sock, protocol, waiter, extra, server)

    def _make_datagram_transport(self, sock, protocol, address=None, waiter=None, extra=None):  # type: ignore[no-untyped-def]
        # Our own, on the port's poll ops (see _datagram).
        return DatagramTransport(self, sock, protocol, address, waiter, extra)

    def _make_ssl_transport(  # type: ignore[no-untyped-def]
        self,
        rawsock,
        protocol,
        sslcontext,
        waiter=None,
        *,
        server_side=False,
        server_hostname=None,
        extra=None,
        server=None,
        **kwargs,
    ):
        ssl_protocol = _compat.SSLProtocol(
            self, protocol, sslcontext, waiter, server_side, server_hostname, **kwargs
        )
        self._make_socket_transport(rawsock, ssl_protocol, extra=extra, server=server)
        return ssl_protocol._app_transport

    # ---- servers -----------------------------------------------------------

    def _start_serving(  # type: ignore[no-untyped-def]
        self,
        protocol_factory,
        sock,
        sslcontext=None,
        server=None,
        backlog=100,
        ssl_handshake_timeout=None,
        ssl_shutdown_timeout=None,
    ):
        """Serves ``sock`` on one multishot accept (see _Acceptor), armed
        now: accepting starts before the caller's next step."""
        acceptor = _Acceptor(
            self, sock, protocol_factory, sslcontext, server, backlog,
            ssl_handshake_timeout, ssl_shutdown_timeout,
        )
        old = self._accept_futures.pop(sock.fileno(), None)
        if old is not None:
            old.cancel()
        self._accept_futures[sock.fileno()] = acceptor
        acceptor.arm()

    # ---- sock_* ----------------------------------------------------------
    # Each checks its socket as the selector loops do: never an SSLSocket,
    # and in debug mode a blocking socket is a ValueError (a blocking
    # socket would stall a selector loop; here it would only hide the bug
    # until the code runs on one).  Same exceptions, same words.

    def _check_sock(self, sock: socket.socket) -> None:
        if _ssl is not None and isinstance(sock, _ssl.SSLSocket):
            raise TypeError("Socket cannot be of type SSLSocket")
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    async def sock_recv(self, sock: socket.socket, n: int) -> bytes:
        self._check_sock(sock)
        if n == 0:  # as sock.recv(0) on a selector loop: nothing, at once
            return b""
        return await self._proactor.recv(sock, n)  # type: ignore[no-any-return]

    async def sock_recv_into(self, sock: socket.socket, buf: Any) -> int:
        self._check_sock(sock)
        if memoryview(buf).nbytes == 0:
            return 0
        return await self._proactor.recv_into(sock, buf)  # type: ignore[no-any-return]

    # Datagrams: the non-blocking call now, else when a poll op says the
    # socket is ready (see _datagram.ready_call).

    async def sock_recvfrom(self, sock: socket.socket, bufsize: int) -> tuple[bytes, Any]:
        self._check_sock(sock)
        return await ready_call(self, sock, False, lambda: sock.recvfrom(bufsize))  # type: ignore[no-any-return]

    async def sock_recvfrom_into(self, sock: socket.socket, buf: Any, nbytes: int = 0) -> Any:
        self._check_sock(sock)
        if not nbytes:
            nbytes = len(buf)
        return await ready_call(self, sock, False, lambda: sock.recvfrom_into(buf, nbytes))

    async def sock_sendto(self, sock: socket.socket, data: Any, address: Any) -> int:
        self._check_sock(sock)
        return await ready_call(self, sock, True, lambda: sock.sendto(data, address))  # type: ignore[no-any-return]

    async def sock_sendall(self, sock: socket.socket, data: Any) -> None:
        self._check_sock(sock)
        await self._proactor.send(sock, data)

    async def sock_accept(self, sock: socket.socket) -> tuple[socket.socket, Any]:
        self._check_sock(sock)
        conn, address = await self._proactor.accept(sock)
        conn.setblocking(False)  # as the selector loops give it
        return conn, address

    async def sock_connect(self, sock: socket.socket, address: Any) -> None:
        # Resolve names in the executor, as the selector loops do, rather
        # than in the port's connect (which would block the loop).
        self._check_sock(sock)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto, loop=self
            )
            address = resolved[0][4]
        await self._proactor.connect(sock, address)

    # ---- running -----------------------------------------------------------

    def _write_to_self(self) -> None:
        proactor = self._proactor
        if proactor is not None:
            proactor.wake()

    def _start_self_reading(self) -> None:
        # The running thread owns the port from here on (RuntimeError, before
        # the run starts, if another thread already does).
        self._proactor.claim()
        # Only signal numbers written by signal.set_wakeup_fd arrive here
        # (wake-ups are posted to the port); they are read and dropped.
        assert self._self_reading_future is None
        self.call_soon(self._loop_self_reading)

    def _stop_self_reading(self) -> None:
        port = self._port
        if self._proactor is not None and not port.closed:
            port.flush()  # the stream transports' queued writes go out as the run ends
        if self._self_reading_future is not None:
            self._self_reading_future.cancel()
            self._self_reading_future = None

    if _HAS_SETUP:

        def _run_forever_setup(self) -> None:
            self._start_self_reading()
            super()._run_forever_setup()

        def _run_forever_cleanup(self) -> None:
            try:
                super()._run_forever_cleanup()
            finally:
                self._stop_self_reading()

    else:

        def run_forever(self) -> None:
            self._check_closed()  # the stdlib's checks, before the claim
            self._check_running()
            try:
                self._start_self_reading()
                super().run_forever()
            finally:
                self._stop_self_reading()

    def close(self) -> None:
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        try:
            self._proactor.claim()  # only the port's owner can close it
        except RuntimeError as exc:
            raise RuntimeError(f"{self!r} cannot be closed here: {exc}") from None
        if not sys.is_finalizing():
            for sig in list(self._signal_handlers):
                self.remove_signal_handler(sig)  # the last one restores the wakeup fd
        else:
            self._signal_handlers.clear()
        if self._readiness is not None:
            self._readiness.close()
            self._readiness = None
        # BaseProactorEventLoop.close() minus its signal.set_wakeup_fd(-1),
        # which would drop a wakeup fd this loop never installed.
        self._stop_accept_futures()
        self._close_self_pipe()
        self._proactor.close()
        self._proactor = None  # type: ignore[assignment]
        self._selector = None  # type: ignore[assignment]
        _compat.BaseEventLoop.close(self)

    # ---- readiness: add_reader / add_writer --------------------------------

    def _readiness_thread(self) -> PortReadiness:
        """The loop's add_reader/add_writer registry (the name is the one
        the proactor's ``_ready_op`` calls): the port's poll ops, with a
        helper thread only for descriptors the port cannot take."""
        self._check_closed()
        if self._readiness is None:
            self._readiness = PortReadiness(self)
        return self._readiness

    def add_reader(self, fd: Any, callback: Any, *args: Any) -> None:
        """Calls ``callback(*args)`` whenever ``fd`` is readable, level-
        triggered as a selector loop (a poll op on the port; see
        docs/asyncio.md)."""
        self._readiness_thread().add(fileobj_to_fd(fd), False, callback, args)

    def remove_reader(self, fd: Any) -> bool:
        if self._readiness is None or self.is_closed():
            return False
        return self._readiness.remove(fileobj_to_fd(fd), False)

    def add_writer(self, fd: Any, callback: Any, *args: Any) -> None:
        """Calls ``callback(*args)`` whenever ``fd`` is writable."""
        self._readiness_thread().add(fileobj_to_fd(fd), True, callback, args)

    def remove_writer(self, fd: Any) -> bool:
        if self._readiness is None or self.is_closed():
            return False
        return self._readiness.remove(fileobj_to_fd(fd), True)

    # The stdlib Unix pipe transports call these.
    _add_reader = add_reader
    _remove_reader = remove_reader
    _add_writer = add_writer
    _remove_writer = remove_writer

    # ---- signals -----------------------------------------------------------

    def add_signal_handler(self, sig: int, callback: Any, *args: Any) -> None:
        """As the Unix selector loop: ``callback(*args)`` runs in the loop
        when signal ``sig`` arrives.  Main thread only."""
        if sys.platform == "win32":  # pragma: no cover
            raise NotImplementedError
        if _compat.iscoroutine(callback) or _compat.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        try:
            # Raises ValueError off the main thread, before anything
            # changed (as the selector loop words it).
            self._install_wakeup_fd()
        except (ValueError, OSError) as exc:
            raise RuntimeError(str(exc)) from None
        handle = events.Handle(callback, args, self, None)
        self._signal_handlers[sig] = handle
        try:
            signal.signal(sig, self._on_signal)
            signal.siginterrupt(sig, False)
        except OSError as exc:
            del self._signal_handlers[sig]
            if not self._signal_handlers:
                self._restore_wakeup_fd()
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught") from None
            raise

    def _install_wakeup_fd(self) -> None:
        # The self-pipe becomes the wakeup fd while we handle signals: a
        # signal arriving on another thread, or while the main thread
        # waits in the port, then completes the self-pipe recv and ends
        # the wait at once.  The previous fd is kept to be put back.
        fd = self._csock.fileno()
        previous = signal.set_wakeup_fd(fd)
        if self._saved_wakeup_fd is None and previous != fd:
            self._saved_wakeup_fd = previous

    def _restore_wakeup_fd(self) -> None:
        saved, self._saved_wakeup_fd = self._saved_wakeup_fd, None
        try:
            signal.set_wakeup_fd(-1 if saved is None else saved)
        except (ValueError, OSError) as exc:
            logger.info("set_wakeup_fd(%s) failed: %s", saved, exc)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # A Python-level handler: it runs in the main thread between
        # bytecodes; the port's waits end on EINTR (and wake every 50 ms on
        # the main thread), so it runs promptly even while the loop sleeps.
        handle = self._signal_handlers.get(signum)
        if handle is None or self.is_closed():
            return
        if handle._cancelled:
            self.remove_signal_handler(signum)
        else:
            self._add_callback_signalsafe(handle)

    def remove_signal_handler(self, sig: int) -> bool:
        self._check_signal(sig)
        try:
            del self._signal_handlers[sig]
        except KeyError:
            return False
        handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        try:
            signal.signal(sig, handler)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught") from None
            raise
        finally:
            if not self._signal_handlers:
                self._restore_wakeup_fd()
        return True

    def _check_signal(self, sig: int) -> None:
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"invalid signal number {sig}")

    # ---- pipes and subprocesses (POSIX) ------------------------------------

    if _compat.HAS_UNIX:

        def _make_read_pipe_transport(self, pipe, protocol, waiter=None, extra=None):  # type: ignore[no-untyped-def]
            return _compat.UnixReadPipeTransport(self, pipe, protocol, waiter, extra)

        def _make_write_pipe_transport(self, pipe, protocol, waiter=None, extra=None):  # type: ignore[no-untyped-def]
            return _compat.UnixWritePipeTransport(self, pipe, protocol, waiter, extra)

        async def _make_subprocess_transport(  # type: ignore[no-untyped-def]
            self, protocol, args, shell, stdin, stdout, stderr, bufsize, extra=None, **kwargs
        ):
            waiter = self.create_future()
            transp = _compat.UnixSubprocessTransport(
                self,
                protocol,
                args,
                shell,
                stdin,
                stdout,
                stderr,
                bufsize,
                waiter=waiter,
                extra=extra,
                **kwargs,
            )
            threading.Thread(
                target=self._wait_child,
                args=(transp.get_pid(), transp),
                name=f"iocp.aio-waitpid-{transp.get_pid()}",
                daemon=True,
            ).start()
            try:
                await waiter
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException:
                transp.close()
                await transp._wait()
                raise
            return transp

        def _wait_child(self, pid: int, transp: Any) -> None:
            try:
                _, status = os.waitpid(pid, 0)
                returncode = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                returncode = 255  # reaped by someone else, as asyncio's watchers say
                warnings.warn(
                    f"Unknown child process pid {pid}, will report returncode 255",
                    RuntimeWarning,
                    stacklevel=1,
                )
            try:
                self.call_soon_threadsafe(transp._process_exited, returncode)
            except RuntimeError:
                pass  # the loop is closed

        # asyncio's own (see _compat): the same argument checks, in the same
        # order and words, as the selector loop on this Python version.
        # They use only sock_connect, _create_connection_transport,
        # base_events.Server and _start_serving, which this loop has.
        create_unix_connection = _compat.UnixSelectorEventLoop.create_unix_connection
        create_unix_server = _compat.UnixSelectorEventLoop.create_unix_server

        def _stop_serving(self, sock: socket.socket) -> None:
            # Unlinks a Unix server's socket file when it stops serving, if
            # create_unix_server(cleanup_socket=True) (3.13+) recorded it and
            # the path still names the same file.
            path = sock.getsockname() if sock in self._unix_server_sockets else None
            super()._stop_serving(sock)
            if path is None:
                return
            inode = self._unix_server_sockets.pop(sock)
            try:
                if os.stat(path).st_ino == inode:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.error("Unable to clean up listening UNIX socket %r: %r", path, exc)


if _compat.BaseDefaultEventLoopPolicy is not None:  # policies go in 3.16

    class EventLoopPolicy(_compat.BaseDefaultEventLoopPolicy):  # type: ignore[misc]
        """An event loop policy whose loops are iocp.aio.EventLoop.

        Deprecated with asyncio's policies (3.14): prefer
        ``asyncio.run(main(), loop_factory=iocp.aio.new_event_loop)``."""

        def __init__(self, backend: str | None = None) -> None:
            super().__init__()
            self._backend = backend

        def _loop_factory(self) -> EventLoop:
            return EventLoop(backend=self._backend)
