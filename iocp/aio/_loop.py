"""iocp.aio.EventLoop: asyncio's proactor event loop on an iocp.CompletionPort.

Why BaseProactorEventLoop and not a loop of our own on BaseEventLoop:
CPython already has a complete, well-tested event loop for exactly this
model -- Windows' ProactorEventLoop, whose transports (streams, SSL through
sslproto, servers, datagrams) are written against a small "proactor"
interface of overlapped operations that each resolve one future.  That
interface maps one to one onto the completion port (see ``_proactor``), so
we reuse every transport as it is and only supply the proactor, and get
the same behaviour asyncio has on Windows, everywhere the port runs.  What
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


class _SocketTransport(_ProactorSocketTransport):  # type: ignore[misc]
    """The stdlib proactor socket transport; it leaves the port before its
    socket is closed."""

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        sock = self._sock
        proactor = self._loop._proactor
        if sock is not None and proactor is not None:
            proactor._unregister(sock)
        super()._call_connection_lost(exc)

    def __del__(self, _warn: Any = warnings.warn) -> None:
        # As newer Pythons do (3.9 calls close(), which needs an open loop).
        if self._sock is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()


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
        return _SocketTransport(self, sock, protocol, waiter, extra, server)

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
        _SocketTransport(self, rawsock, ssl_protocol, extra=extra, server=server)
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
