"""iocp.aio.EventLoop: asyncio's proactor event loop on an iocp.CompletionPort.

Why BaseProactorEventLoop and not a loop of our own on BaseEventLoop:
CPython already has a complete, well-tested event loop for exactly this
model -- Windows' ProactorEventLoop, whose transports (streams, SSL through
sslproto, servers, datagrams) are written against a small "proactor"
interface of overlapped operations that each resolve one future.  That
interface maps one to one onto the completion port (see ``_proactor``), so
we reuse every transport and supply the proactor, and get the same
behaviour asyncio has on Windows, everywhere the port runs.  Where those
transports go wrong off Windows -- an error from shutdown() on a reset or
unconnected socket skipping the close, a datagram close() that never
finishes -- thin subclasses here fix them (the only place that touches the
transports' private parts; see docs/asyncio.md, "Transports").  What
the proactor loop lacks on POSIX we add here: add_reader/add_writer (a
readiness helper thread, ``_readiness``), signal handlers, pipes and
subprocesses (the stdlib Unix pipe transports on that readiness), Unix
sockets.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import sys
import threading
import warnings
from asyncio import base_events, coroutines, events, exceptions, proactor_events, sslproto
from typing import Any

from iocp._core import CompletionPort

from ._proactor import Proactor
from ._readiness import ReadinessThread, fileobj_to_fd

if sys.platform != "win32":
    from asyncio import unix_events
else:  # pragma: no cover
    unix_events = None  # type: ignore[assignment]

_HAS_SETUP = hasattr(base_events.BaseEventLoop, "_run_forever_setup")  # 3.13+

# Private stdlib classes and helpers that typeshed does not describe.
_ProactorLoop: Any = proactor_events.BaseProactorEventLoop
_proactor_events: Any = proactor_events
_ProactorSocketTransport: Any = _proactor_events._ProactorSocketTransport
_DefaultPolicy: Any = events.BaseDefaultEventLoopPolicy
_unix: Any = unix_events


_ProactorDatagramTransport: Any = _proactor_events._ProactorDatagramTransport

# Server._detach() takes the transport from 3.13 on (it keeps a set of them).
_DETACH_TAKES_TRANSPORT = sys.version_info >= (3, 13)

# Errors a datagram socket reports for an earlier datagram (an ICMP error
# queued on it); reporting them clears them, so reading can go on.
_DATAGRAM_PEER_ERRORS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNREFUSED",
        "ECONNRESET",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "EHOSTDOWN",
        "ENETDOWN",
        "EMSGSIZE",
        "EPROTO",
        "ETIMEDOUT",
    )
    if hasattr(errno, name)
)


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


class _DatagramTransport(_ConnectionLostMixin, _ProactorDatagramTransport):  # type: ignore[misc]
    """The stdlib proactor datagram transport, fixed where an error or a
    close() in the middle of a send stops it for good.

    - close() while datagrams are buffered or a send is in flight: the
      stdlib marks the connection lost at once, so the write loop returns
      before it would call connection_lost -- which then never runs and the
      fd leaks.  Here close() lets the buffer drain first, as the selector
      loop's datagram transport does, and the write loop's end calls
      connection_lost.
    - A failed send is reported to error_received() and the stdlib's write
      loop stops, leaving the rest of the buffer (and a pending close)
      waiting forever.  Here it goes on with the next datagram.
    - A failed read (an ICMP error such as port unreachable on a connected
      socket, reported as ConnectionRefusedError) is reported and the
      stdlib stops reading for good.  Here reading goes on after such
      peer errors, as on the selector loop.
    """

    _buffer: Any
    _write_fut: Any
    _read_fut: Any

    def close(self) -> None:
        if self._closing:
            return
        if self._write_fut is None and not self._buffer:
            super().close()
            return
        # Drain first; _loop_writing schedules connection_lost when the
        # buffer is empty and _closing is set.
        self._closing = True
        if self._read_fut is not None:
            self._read_fut.cancel()
            self._read_fut = None
        if self._write_fut is None:  # datagrams buffered but no send going
            self._loop_writing()

    def _loop_writing(self, fut: Any = None) -> None:
        failed = fut is not None and fut.done() and not fut.cancelled() and (
            fut.exception() is not None
        )
        super()._loop_writing(fut)
        if failed and self._write_fut is None and not self._conn_lost:
            super()._loop_writing()  # the next datagram, or the close

    def _loop_reading(self, fut: Any = None) -> None:
        failed = fut is not None and fut.done() and not fut.cancelled() and (
            getattr(fut.exception(), "errno", None) in _DATAGRAM_PEER_ERRORS
        )
        super()._loop_reading(fut)
        if failed and self._read_fut is None and not self._closing and not self._conn_lost:
            super()._loop_reading()


class EventLoop(_ProactorLoop):  # type: ignore[misc]
    """An asyncio event loop whose I/O goes through an iocp.CompletionPort.

    ``EventLoop(port=None, *, backend=None, queue_capacity=1024)``: pass a
    port of your own, or let the loop make one (``backend`` as in
    ``iocp.CompletionPort``).  The loop owns its port and closes it in
    ``close()``.
    """

    _self_reading_future: Any  # BaseProactorEventLoop's

    def __init__(
        self,
        port: CompletionPort | None = None,
        *,
        backend: str | None = None,
        queue_capacity: int = 1024,
    ) -> None:
        if port is None:
            port = CompletionPort(backend=backend, queue_capacity=queue_capacity)
        elif not isinstance(port, CompletionPort):
            raise TypeError(f"expected an iocp.CompletionPort or None, got {type(port).__name__}")
        self._port = port
        self._readiness: ReadinessThread | None = None
        self._signal_handlers: dict[int, events.Handle] = {}
        super().__init__(Proactor(port))

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

    # ---- transports ------------------------------------------------------

    def _make_socket_transport(self, sock, protocol, waiter=None, extra=None, server=None):  # type: ignore[no-untyped-def]
        # TCP and Unix stream sockets: the connection core (iocp/aio/_transport.py).
        from ._transport import TCPTransport, is_stream_socket

        if is_stream_socket(sock):
            return TCPTransport(self, sock, protocol, waiter, extra, server)
        return _SocketTransport(self, sock, protocol, waiter, extra, server)

    def _make_datagram_transport(self, sock, protocol, address=None, waiter=None, extra=None):  # type: ignore[no-untyped-def]
        return _DatagramTransport(self, sock, protocol, address, waiter, extra)

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
        ssl_protocol = sslproto.SSLProtocol(
            self, protocol, sslcontext, waiter, server_side, server_hostname, **kwargs
        )
        self._make_socket_transport(rawsock, ssl_protocol, extra=extra, server=server)
        return ssl_protocol._app_transport

    async def sock_sendall(self, sock: socket.socket, data: Any) -> None:
        await self._proactor.send(sock, data)

    async def sock_accept(self, sock: socket.socket) -> tuple[socket.socket, Any]:
        conn, address = await self._proactor.accept(sock)
        conn.setblocking(False)  # as the selector loops give it
        return conn, address

    async def sock_connect(self, sock: socket.socket, address: Any) -> None:
        # Resolve names in the executor, as the selector loops do, rather
        # than in the port's connect (which would block the loop).
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            resolved = await self._ensure_resolved(
                address, family=sock.family, type=sock.type, proto=sock.proto, loop=self
            )
            address = resolved[0][4]
        await self._proactor.connect(sock, address)

    async def _sock_sendfile_native(self, sock, file, offset, count):  # type: ignore[no-untyped-def]
        raise exceptions.SendfileNotAvailableError("the iocp loop has no native sendfile")

    # ---- running -----------------------------------------------------------

    def _write_to_self(self) -> None:
        proactor = self._proactor
        if proactor is not None:
            proactor.wake()

    def _start_self_reading(self) -> None:
        # Only signal numbers written by signal.set_wakeup_fd arrive here
        # (wake-ups are posted to the port); they are read and dropped.
        assert self._self_reading_future is None
        self.call_soon(self._loop_self_reading)

    def _stop_self_reading(self) -> None:
        proactor = self._proactor
        if proactor is not None:
            proactor._flush()  # ops issued during this run start before it ends
            if not self._port.closed:
                self._port.flush()  # and the stream transports' queued writes
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
        for sig in list(self._signal_handlers):
            self.remove_signal_handler(sig)
        if self._readiness is not None:
            self._readiness.close()
            self._readiness = None
        super().close()

    # ---- readiness: add_reader / add_writer --------------------------------

    def _readiness_thread(self) -> ReadinessThread:
        self._check_closed()
        if self._readiness is None:
            self._readiness = ReadinessThread(self)
        return self._readiness

    def add_reader(self, fd: Any, callback: Any, *args: Any) -> None:
        """Calls ``callback(*args)`` whenever ``fd`` is readable (served by a
        helper thread; see docs/asyncio.md)."""
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
        if coroutines.iscoroutine(callback) or coroutines.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("add_signal_handler() works only in the main thread")
        handle = events.Handle(callback, args, self, None)
        self._signal_handlers[sig] = handle
        try:
            signal.signal(sig, self._on_signal)
            signal.siginterrupt(sig, False)
        except OSError as exc:
            del self._signal_handlers[sig]
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught") from None
            raise

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
        return True

    def _check_signal(self, sig: int) -> None:
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"invalid signal number {sig}")

    # ---- pipes and subprocesses (POSIX) ------------------------------------

    if unix_events is not None:

        def _make_read_pipe_transport(self, pipe, protocol, waiter=None, extra=None):  # type: ignore[no-untyped-def]
            return _unix._UnixReadPipeTransport(self, pipe, protocol, waiter, extra)

        def _make_write_pipe_transport(self, pipe, protocol, waiter=None, extra=None):  # type: ignore[no-untyped-def]
            return _unix._UnixWritePipeTransport(self, pipe, protocol, waiter, extra)

        async def _make_subprocess_transport(  # type: ignore[no-untyped-def]
            self, protocol, args, shell, stdin, stdout, stderr, bufsize, extra=None, **kwargs
        ):
            waiter = self.create_future()
            transp = _unix._UnixSubprocessTransport(
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

        async def create_unix_connection(  # type: ignore[no-untyped-def]
            self,
            protocol_factory,
            path=None,
            *,
            ssl=None,
            sock=None,
            server_hostname=None,
            **kwargs,
        ):
            if ssl and server_hostname is None:
                raise ValueError("you have to pass server_hostname when using ssl")
            if path is not None:
                if sock is not None:
                    raise ValueError("path and sock can not be specified at the same time")
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0)
                try:
                    sock.setblocking(False)
                    await self.sock_connect(sock, os.fspath(path))
                except BaseException:
                    sock.close()
                    raise
            elif sock is None:
                raise ValueError("no path and sock were specified")
            elif sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
            return await self.create_connection(
                protocol_factory, sock=sock, ssl=ssl, server_hostname=server_hostname, **kwargs
            )

        async def create_unix_server(  # type: ignore[no-untyped-def]
            self,
            protocol_factory,
            path=None,
            *,
            sock=None,
            backlog=100,
            ssl=None,
            cleanup_socket=True,
            **kwargs,
        ):
            if ssl is not None and not isinstance(ssl, __import__("ssl").SSLContext):
                raise TypeError(f"ssl argument must be an SSLContext or None, got {ssl!r}")
            if path is not None:
                if sock is not None:
                    raise ValueError("path and sock can not be specified at the same time")
                path = os.fspath(path)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                if path[0] not in (0, "\x00"):
                    try:
                        if stat.S_ISSOCK(os.stat(path).st_mode):
                            os.remove(path)
                    except FileNotFoundError:
                        pass
                try:
                    sock.bind(path)
                except BaseException:
                    sock.close()
                    raise
            elif sock is None:
                raise ValueError("path was not specified, and no sock specified")
            elif sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
                raise ValueError(f"A UNIX Domain Stream Socket was expected, got {sock!r}")
            sock.setblocking(False)
            return await self.create_server(
                protocol_factory, sock=sock, backlog=backlog, ssl=ssl, **kwargs
            )


class EventLoopPolicy(_DefaultPolicy):  # type: ignore[misc]
    """An event loop policy whose loops are iocp.aio.EventLoop."""

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self._backend = backend

    def _loop_factory(self) -> EventLoop:
        return EventLoop(backend=self._backend)
