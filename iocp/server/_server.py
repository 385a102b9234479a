"""The server life cycle of :mod:`iocp.server`: :class:`Server`.

Design note.  ``start()`` binds, listens, registers the listener and keeps
``accepts`` accept operations outstanding; each completed accept re-arms
one, admits the socket (``max_connections`` counts connections being set up
too, so two loop threads cannot both take the last slot) and starts its
:class:`~iocp.server.Connection` in the connection's strand.  ``shutdown()``
stops accepting (cancelling the accepts; the listener closes once the last
one has completed), closes every connection gracefully, waits up to the
drain timeout, aborts the rest, then settles the loop (timers stopped,
posted calls run, nothing in flight) before closing a port it owns.  With no
loop thread of its own (``start(threads=0)``) every wait runs the port on
the calling thread.  Signals and ``request_shutdown()`` drive
``serve_forever()``; ``workers > 1`` is in :mod:`iocp.server._workers`.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import stat
import threading
import time
from typing import Any, Callable, Dict

from iocp.server._endpoint import _Endpoint
from iocp.server._util import (
    DEFAULT_PORT,
    Address,
    _close_quietly,
    _fmt_addr,
    _fmt_stats,
    log,
)
from iocp.server._workers import serve_workers
from iocp.server.connection import _StreamConnection

_TRANSIENT_ACCEPT = {
    errno.ECONNABORTED,
    errno.EINTR,
    errno.EAGAIN,
    getattr(errno, "EPROTO", -1),
    getattr(errno, "ECONNRESET", -1),
}
_EXHAUSTED_ACCEPT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Server(_Endpoint):
    """A stream server on a completion port.

    Parameters:
        handler: protocol factory (see the module docstring).
        host, port: where to listen; ``host=""`` or ``None`` means every
            interface, ``port=0`` an ephemeral port (see :attr:`address`).
        path: listen on this Unix domain socket instead (Linux).
        backlog: listen backlog.
        reuse_port: set SO_REUSEPORT so several processes share the address.
        max_connections: refuse (close at once, with a logged warning)
            clients beyond this many open connections.
        idle_timeout: close connections with no data in either direction for
            this many seconds; ``connection_lost`` gets a :class:`TimeoutError`.
        read_size: bytes asked for by each ``recv``.
        write_high_water, write_low_water, write_limit: write backpressure.
        accepts: accept operations kept outstanding.
        drain_timeout: default bound for a graceful :meth:`shutdown`.
        backend: completion port backend ("io_uring", "epoll", "iocp", None=best).
        port_factory: callable returning a new ``CompletionPort`` (overrides backend).
        completion_port: run on this existing port instead; the server then
            neither runs nor closes it unless :meth:`start`/:meth:`serve_forever`
            are used (they run it, and never close it).
        sock: an already bound socket to listen on (host/port/path ignored).
    """

    def __init__(
        self,
        handler: Any,
        host: str | None = "127.0.0.1",
        port: int = DEFAULT_PORT,
        *,
        path: str | None = None,
        family: int = 0,
        backlog: int = 128,
        reuse_port: bool = False,
        max_connections: int | None = None,
        idle_timeout: float | None = None,
        read_size: int = 64 * 1024,
        write_high_water: int | None = None,
        write_low_water: int | None = None,
        write_limit: int | None = None,
        accepts: int = 16,
        drain_timeout: float = 5.0,
        backend: str | None = None,
        port_factory: Callable[[], Any] | None = None,
        completion_port: Any = None,
        sock: socket.socket | None = None,
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
        if path is not None and not hasattr(socket, "AF_UNIX"):
            raise ValueError("Unix domain sockets are not available on this platform")
        if max_connections is not None and max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive")
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"port must be in 0..65535, not {port}")
        self.host = host
        self.port = int(port)
        self.path = path
        self.family = family
        self.backlog = backlog
        self.reuse_port = reuse_port
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.accepts = max(1, accepts)
        self.drain_timeout = drain_timeout
        self._sock = sock
        self._listen_ops: set[Any] = set()
        self._accept_pending = 0
        self._accepting = False
        self._started = False
        self._stopped = False
        self._listener_closed = True  # claimed for closing (no accept left)
        self._listener_done = True  # and closed
        self._refused = 0
        self._accepted = 0
        # Accepted connections not yet in _conns: they hold a slot of
        # max_connections, so that two loop threads accepting at once
        # cannot both take the last one.
        self._admitting = 0
        self._last_refusal_log = 0.0
        self._stop_event = threading.Event()
        self._signal_count = 0
        self._first_signal = 0.0
        self.final_stats: Dict[str, Any] | None = None
        self.worker_id: int | None = None

    # info -----------------------------------------------------------------------
    @property
    def address(self) -> Address:
        """The bound address (useful with ``port=0``); None before start."""
        if self._sock is None:
            return None
        try:
            return self._sock.getsockname()  # type: ignore[no-any-return]
        except OSError:
            return None

    @property
    def backend(self) -> str | None:
        """The backend of the port in use ("io_uring", "epoll", "iocp"), None before start."""
        port = self.completion_port
        return port.backend if port is not None else None

    def stats(self) -> Dict[str, Any]:
        """Counters: connections, accepted, refused, plus the port's ``stats()``."""
        with self._lock:
            st: Dict[str, Any] = {
                "connections": len(self._conns),
                "accepted": self._accepted,
                "refused": self._refused,
            }
        st.update(self._port_stats())
        return st

    # life cycle ------------------------------------------------------------------
    def bind(self) -> socket.socket:
        """Create and bind the listening socket now (``start`` does it if needed)."""
        if self._sock is not None:
            return self._sock
        if self.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                _remove_stale_unix_socket(self.path)
                sock.bind(self.path)
            except BaseException:
                sock.close()
                raise
            self._sock = sock
            return sock
        host = self.host or None
        infos = socket.getaddrinfo(
            host, self.port, self.family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
        err: OSError | None = None
        for fam, stype, proto, _, addr in infos:
            sock = socket.socket(fam, stype, proto)
            try:
                if os.name != "nt":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.reuse_port:
                    if not hasattr(socket, "SO_REUSEPORT"):
                        raise OSError(errno.ENOPROTOOPT, "SO_REUSEPORT is not supported here")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(addr)
            except OSError as exc:
                sock.close()
                err = exc
                continue
            self._sock = sock
            return sock
        assert err is not None
        raise err

    def start(self, threads: int = 1) -> Server:
        """Listen and run the completion loop on ``threads`` background threads.

        ``threads=0`` starts no thread: whoever runs the completion port
        (``server.completion_port.run()``, e.g. a port passed as
        ``completion_port=``) runs the server.  Returns self; use
        :meth:`shutdown` (or the context manager) to stop.
        """
        if self._started:
            raise RuntimeError("server already started")
        if threads < 0:
            raise ValueError("threads must be >= 0")
        sock = self.bind()
        try:
            sock.listen(self.backlog)
            self._loop = self._make_loop(threads)
        except BaseException:
            if self._sock is sock:
                self._sock = None
            sock.close()
            raise
        self._single = self._use_streams(self._loop, threads)
        self._started = True
        self._stopped = False
        self._accepting = True
        self._listener_closed = False
        self._listener_done = False
        self._loop.port.register(sock)
        for _ in range(self.accepts):
            self._arm_accept()
        if self.idle_timeout is not None:
            self._schedule_idle_check()
        if threads > 0:
            self._loop.start(threads, name="iocp-server")
        where = self.path if self.path else _fmt_addr(self.address)
        log.info("listening on %s (backend %s)", where, self.backend)
        return self

    def __enter__(self) -> Server:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def serve_forever(
        self,
        threads: int = 1,
        workers: int = 1,
        *,
        handle_signals: bool = True,
        ready: Callable[[], Any] | None = None,
    ) -> int:
        """Serve until SIGINT/SIGTERM (or :meth:`request_shutdown`); return an exit code.

        ``threads``: completion-loop threads per process.  ``workers``: fork
        that many processes (POSIX), each with its own completion port and
        its own listening socket on the same address (SO_REUSEPORT), so the
        kernel spreads connections over every core.  On a signal the server
        stops accepting, closes connections gracefully (flushing what they
        have buffered) for up to ``drain_timeout`` seconds, aborts the rest,
        closes the port and returns 0.  A second signal skips the drain.
        ``ready()`` is called once the server (every worker) is listening.
        """
        if workers > 1:
            return self._serve_workers(threads, workers, handle_signals, ready)
        return self._serve_here(threads, handle_signals, ready)

    def request_shutdown(self) -> None:
        """Ask :meth:`serve_forever` to shut down gracefully (thread- and signal-safe).

        After ``start(threads=0)`` on a port the server created, it also
        stops the port (``completion_port.stop()``): the caller's
        ``completion_port.run()`` returns and :meth:`shutdown` can follow.
        A second request more than half a second after the first skips the
        drain (so Ctrl-C twice means "now").
        """
        now = time.monotonic()
        if self._signal_count == 0 or now - self._first_signal > 0.5:
            self._signal_count += 1
        if self._signal_count == 1:
            self._first_signal = now
        self._stop_event.set()
        loop = getattr(self, "_loop", None)
        if loop is not None and loop.owned and not loop.threads and not self._stopped:
            # start(threads=0): the caller runs our port.  Make its run()
            # return, so that the code after it can call shutdown(), which
            # cannot drain from inside that run() (see shutdown).
            try:
                loop.port.stop()
            except Exception:  # already closed
                pass

    def _serve_here(
        self, threads: int, handle_signals: bool, ready: Callable[[], Any] | None = None
    ) -> int:
        old: Dict[int, Any] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for signum in _STOP_SIGNALS:
                old[signum] = signal.signal(signum, self._on_signal)
        try:
            if not self._started:
                self.start(max(1, threads))
            if ready is not None:
                ready()
            while not self._stop_event.wait(0.5):
                pass
            log.info("shutting down")
            timeout = 0.0 if self._signal_count > 1 else self.drain_timeout
            self.shutdown(timeout, _interruptible=True)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return 0

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        self.request_shutdown()

    def shutdown(
        self, timeout: float | None = None, _interruptible: bool = False
    ) -> Dict[str, Any]:
        """Gracefully stop; returns (and logs) the final stats.

        Stops accepting, closes every connection (buffered data is flushed
        first), waits up to ``timeout`` (default ``drain_timeout``) seconds,
        aborts what is left, waits for every operation to complete, stops the
        loop threads and closes the completion port if the server created it.
        Must not be called from a callback (it waits for the loop).

        With no loop thread (``start(threads=0)``) it runs the port on the
        calling thread until everything is drained or the deadline passed.
        Inside a callback of the port's ``run()`` on this thread (a protocol
        callback, or a signal handler while the caller runs the port) the
        port cannot run again, so nothing could drain: RuntimeError, before
        anything is stopped.  Call :meth:`request_shutdown` there and
        ``shutdown()`` once ``run()`` has returned.
        """
        if not self._started or self._stopped:
            return self.final_stats or {}
        if self._loop.in_loop():
            raise RuntimeError("Server.shutdown() cannot be called from a loop callback")
        if not self._loop.threads and not self._loop.can_run_here():
            raise RuntimeError(
                "Server.shutdown() called inside completion_port.run() on this thread "
                "(a callback or a signal handler) with no loop thread of the server "
                "(start(threads=0)): the port cannot be run here to drain it.  Call "
                "request_shutdown() there and shutdown() once run() has returned"
            )
        self._stopped = True
        self._stop_event.set()
        timeout = self.drain_timeout if timeout is None else timeout
        self._stop_accepting()
        for conn in self.connections:
            conn.close()
        deadline = time.monotonic() + timeout
        while not self._await(lambda: not self._conns, 0.1):
            if time.monotonic() >= deadline or (_interruptible and self._signal_count > 1):
                break
        left = self.connections
        if left:
            log.warning("aborting %d connection(s) still open after the drain", len(left))
            for conn in left:
                conn.abort()
        # No connection left means every connection_lost has returned; the
        # listener is gone once its last accept completed and it is closed.
        if not self._await(lambda: not self._conns and self._listener_done, 5.0):
            log.warning("connections or the listener outlived the shutdown bound")
        # What can still put work on the port: the timer thread (the idle
        # check, accept retries) and calls already posted.  settle() stops
        # the former and runs the port until the latter, and every operation
        # they started, are done.
        if not self._loop.settle(5.0):
            log.warning("operations still outstanding 5 s after the drain")
        port = self._loop.port
        # Measured with the port still open (a closed port reports zeros):
        # the operations, buffers and pins that outlived the connections.
        stats = self.stats()
        if self._loop.owned:
            port.close()
            stats["pinned_buffers"] = port.stats().get("pinned_buffers", 0)
        self.final_stats = stats
        log.info("stopped; final stats: %s", _fmt_stats(stats))
        return stats

    close = shutdown

    def _await(self, pred: Callable[[], bool], timeout: float) -> bool:
        """Wait for ``pred()``; with no loop thread of ours, run the port here."""
        if self._loop.threads:
            return self._wait_for(pred, timeout)
        return self._loop.run_until(pred, time.monotonic() + timeout)

    # accepting -------------------------------------------------------------------
    def _arm_accept(self) -> None:
        with self._lock:
            if not self._accepting:
                return
            self._accept_pending += 1
        try:
            op = self._loop.port.accept(self._sock, callback=self._on_accept)
        except OSError as exc:
            log.error("cannot submit accept: %s", exc)
            self._accept_done(None)
            return
        with self._lock:
            if not op.done:
                self._listen_ops.add(op)
            accepting = self._accepting
        if not accepting:
            op.cancel()

    def _accept_done(self, op: Any) -> None:
        with self._lock:
            self._accept_pending -= 1
            self._listen_ops.discard(op)
            close = (
                not self._accepting and self._accept_pending == 0 and not self._listener_closed
            )
            if close:
                self._listener_closed = True
        if close:
            self._close_listener()

    def _on_accept(self, c: Any) -> None:
        self._accept_done(c.operation)
        if c.cancelled or c.error is not None or not self._accepting:
            if c.error is None and c.data:
                _close_quietly(c.data[0])
            if not self._accepting:
                return
            if c.cancelled:
                return
            code = getattr(c.error, "errno", None)
            if code in _EXHAUSTED_ACCEPT:
                self._log_refusal("accept failed (%s); retrying in 0.1 s", c.error)
                self._loop.call_later(0.1, self._arm_accept)
            elif code in _TRANSIENT_ACCEPT:
                self._arm_accept()
            else:
                log.error("accept failed: %s; retrying in 0.1 s", c.error)
                self._loop.call_later(0.1, self._arm_accept)
            return
        csock, addr = c.data
        self._arm_accept()
        with self._lock:
            full = (
                self.max_connections is not None
                and len(self._conns) + self._admitting >= self.max_connections
            )
            if full:
                self._refused += 1
            else:
                self._accepted += 1
                self._admitting += 1
        if full:
            self._log_refusal(
                "refusing connection from %s: max_connections=%d reached",
                _fmt_addr(addr),
                self.max_connections,
            )
            _close_quietly(csock)
            return
        conn = None
        try:
            made = self._new_connection(csock, addr)
            if not isinstance(made, _StreamConnection):  # a stream registers its socket
                self._loop.port.register(csock, key=id(made))
            conn = made
        except Exception:
            log.exception("cannot set up connection from %s", _fmt_addr(addr))
            _close_quietly(csock)
        finally:
            with self._lock:
                self._admitting -= 1
                # shutdown() closes the connections it sees once accepting
                # has stopped; one accepted after that must not slip past it.
                late = not self._accepting
                if conn is not None and not late:
                    self._conns[conn] = None
        if conn is None:
            return
        if late:
            conn._discard()
            return
        conn._begin()

    def _log_refusal(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_refusal_log >= 1.0:
            self._last_refusal_log = now
            log.warning(msg, *args)
        else:
            log.debug(msg, *args)

    def _stop_accepting(self) -> None:
        with self._lock:
            if not self._accepting:
                return
            self._accepting = False
            ops = list(self._listen_ops)
            nothing = self._accept_pending == 0 and not self._listener_closed
            if nothing:
                self._listener_closed = True
        for op in ops:
            try:
                op.cancel()
            except Exception:
                pass
        try:
            self._loop.port.unregister(self._sock)
        except (OSError, ValueError):
            pass
        if nothing:
            self._close_listener()

    def _close_listener(self) -> None:
        sock = self._sock
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
            if self.path is not None:
                try:
                    os.unlink(self.path)
                except OSError:
                    pass
        with self._lock:
            self._listener_done = True
            self._changed.notify_all()

    # idle timeout ----------------------------------------------------------------
    def _schedule_idle_check(self, delay: float | None = None) -> None:
        assert self.idle_timeout is not None
        if delay is None:
            delay = self.idle_timeout
        # Not sooner than a small share of the timeout: a connection is
        # closed at most that much after its deadline.
        floor = min(max(self.idle_timeout / 16.0, 0.01), 1.0)
        self._loop.call_later(max(delay, floor), self._idle_check)

    def _idle_check(self) -> None:
        """Close the connections idle for ``idle_timeout``; then sleep until
        the earliest a kept one can be: its last activity plus the timeout
        (activity only moves a stamp forward, and a new connection starts
        now).  So a sweep of every connection runs once per timeout span
        at most, not every second whatever the timeout was (a 10,000
        connection server swept them all each second)."""
        if self._stopped or self.idle_timeout is None:
            return
        timeout = self.idle_timeout
        now = time.monotonic()
        cutoff = now - timeout
        oldest = now
        for conn in self.connections:
            if conn._idle(cutoff, now):
                log.info("closing idle connection %s", _fmt_addr(conn.peername))
                conn._idle_close(TimeoutError(f"idle for {timeout} s"))
            else:
                last = conn.last_activity
                if last < oldest:
                    oldest = last
        self._schedule_idle_check(oldest + timeout - now)

    # workers -----------------------------------------------------------------------
    def _serve_workers(
        self,
        threads: int,
        workers: int,
        handle_signals: bool,
        ready: Callable[[], Any] | None,
    ) -> int:
        return serve_workers(self, threads, workers, handle_signals, ready)

# (CTRL_BREAK_EVENT sent to a CREATE_NEW_PROCESS_GROUP child) is the only
# way another process can ask for that: SIGTERM there kills outright.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + (
    (signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ()
)



def _remove_stale_unix_socket(path: str) -> None:
    """Unlink ``path`` if it is a socket nobody listens on (left by a crash)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(0.5)
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"{path} is in use by another server")
