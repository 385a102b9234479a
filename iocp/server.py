"""Servers and clients on a completion port, with an asyncio-style protocol API.

The model is the classic IOCP server: a listening socket with several
``accept`` operations outstanding, one ``recv`` in flight per connection,
at most one ``send`` in flight per connection with pending writes joined
into it, and every socket unregistered from the port before it is closed.

Handler
    ``handler`` is a **protocol factory**, as in asyncio: it is called with no
    arguments once per connection and returns the protocol object for that
    connection (a class works: ``Server(EchoProtocol)``).  If an *instance*
    that has a ``data_received`` method is given instead, that one object is
    shared by every connection (each callback gets the connection as its
    first argument, so a shared handler is natural for e.g. a chat room).

    Protocol methods (all optional except ``data_received``; see
    :class:`Protocol`)::

        connection_made(conn)
        data_received(conn, data: bytes)
        eof_received(conn) -> bool | None   # true: keep the half-open connection
        connection_lost(conn, exc: BaseException | None)
        pause_writing(conn)
        resume_writing(conn)

Threads
    Completion callbacks may run on several threads at once
    (``serve_forever(threads=N)``).  Callbacks for **one connection never run
    concurrently and are delivered in order**: each connection has a small
    mailbox (a "strand", as in Boost.Asio); the thread that finds it idle runs
    the queued callbacks, the others only enqueue and return.  A connection's
    state (its write buffer and flags) is guarded by a per-connection lock
    held only for a few attribute updates, never while user code runs.  The
    GIL does not make this unnecessary: threads switch between bytecodes, so
    a read-modify-write of shared state would race without the lock.
    Callbacks of *different* connections do run concurrently; a shared
    handler must guard its own state (see the chat example).

Write backpressure
    ``Connection.send()`` never blocks.  Once more than ``write_high_water``
    bytes are buffered (queued plus in flight) ``pause_writing(conn)`` is
    called; when the buffer drains to ``write_low_water`` ``resume_writing``
    follows.  Data sent while paused is still accepted and queued -- nothing
    is dropped, pausing is advisory -- but the buffer is capped: past
    ``write_limit`` bytes (default 16 x ``write_high_water``) the connection
    is aborted and ``connection_lost`` receives :class:`WriteBufferFull`.  So
    a peer that never reads costs at most ``write_limit`` bytes.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import signal
import socket
import stat
import struct
import threading
import time
from collections import deque
from typing import Any, Callable, Dict, List, Tuple, Union

from iocp._core import CompletionPort

__all__ = [
    "Client",
    "Connection",
    "Protocol",
    "Server",
    "WriteBufferFull",
    "connect",
]

log = logging.getLogger("iocp.server")

DEFAULT_PORT = 9527
_SEND_CHUNK = 256 * 1024  # join pending writes into send ops of about this size
_TRANSIENT_ACCEPT = {
    errno.ECONNABORTED,
    errno.EINTR,
    errno.EAGAIN,
    getattr(errno, "EPROTO", -1),
    getattr(errno, "ECONNRESET", -1),
}
_EXHAUSTED_ACCEPT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

_tls = threading.local()


class WriteBufferFull(ConnectionError):
    """The write buffer passed ``write_limit``: the peer is not reading."""


class Protocol:
    """Base class for handlers; every method is a no-op, override what you need."""

    def connection_made(self, conn: Connection) -> None:
        """Called once the connection is established, before any data."""

    def data_received(self, conn: Connection, data: bytes) -> None:
        """Called with each chunk of bytes received (chunking is arbitrary)."""

    def eof_received(self, conn: Connection) -> bool | None:
        """The peer closed its sending side; return true to keep the connection open."""
        return None

    def connection_lost(self, conn: Connection, exc: BaseException | None) -> None:
        """The connection is closed; ``exc`` is None for a regular close or EOF."""

    def pause_writing(self, conn: Connection) -> None:
        """More than ``write_high_water`` bytes are buffered: stop producing."""

    def resume_writing(self, conn: Connection) -> None:
        """The write buffer drained to ``write_low_water``: producing may resume."""


ProtocolFactory = Callable[[], Any]
Address = Union[Tuple[Any, ...], str, None]


def _as_factory(handler: Any) -> ProtocolFactory:
    """Resolve ``handler`` into a zero-argument protocol factory."""
    if isinstance(handler, type):
        return handler
    if hasattr(handler, "data_received"):
        return lambda: handler  # one shared instance
    if callable(handler):
        return handler  # type: ignore[no-any-return]
    raise TypeError(
        "handler must be a protocol factory (e.g. a Protocol subclass) or an object "
        f"with a data_received method, not {type(handler).__name__}"
    )


def _noop(*_args: Any) -> None:
    return None


def _fmt_addr(addr: Address) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in str(host) else f"{host}:{addr[1]}"
    if isinstance(addr, (bytes, bytearray)):
        addr = addr.decode("utf-8", "backslashreplace")
    return str(addr) if addr else "unix"


# --------------------------------------------------------------------------
# The loop: a completion port, the threads that run it, and a timer thread.


class _Loop:
    """Runs a completion port on threads; timers are posted to it from one thread.

    Everything the server layer puts on the port is either an operation of
    a connection or the listener (counted there) or a call posted by
    :meth:`call_soon` (counted here until it has run), so :meth:`settle`
    can tell when nothing of ours is left.
    """

    def __init__(self, cport: Any, owned: bool) -> None:
        self.port = cport
        self.owned = owned
        self.threads: List[threading.Thread] = []
        self._running = False
        self._timers: List[Tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._tcond = threading.Condition()
        self._tthread: threading.Thread | None = None
        self._tstop = False
        self._pcond = threading.Condition()
        self._posts = 0  # call_soon() calls posted and not yet run to the end

    # completion loop -------------------------------------------------------
    def start(self, nthreads: int, name: str = "iocp-loop") -> None:
        """Start ``nthreads`` threads running the port's completion loop."""
        self._running = True
        for i in range(max(1, nthreads)):
            t = threading.Thread(target=self.run, name=f"{name}-{i}", daemon=True)
            self.threads.append(t)
            t.start()

    def run(self) -> None:
        """Run the completion loop on the calling thread until :meth:`stop`."""
        _tls.loop = self
        # port.stop() would also stop other users of a shared port, so on a
        # port we do not own the threads notice stop() by a short time slice.
        slice_s = 1.0 if self.owned else 0.1
        try:
            while self._running and not self.port.closed:
                self.port.run(timeout=slice_s)
        finally:
            _tls.loop = None

    def in_loop(self) -> bool:
        """True on a thread that runs this loop."""
        return getattr(_tls, "loop", None) is self

    def stop_timers(self, timeout: float = 5.0) -> None:
        """Drop every pending timer and refuse new ones; return once the
        timer thread is gone, so no timer posts anything after this."""
        with self._tcond:
            self._tstop = True
            self._timers.clear()
            self._tcond.notify_all()
        if self._tthread is not None and self._tthread is not threading.current_thread():
            self._tthread.join(timeout)

    def stop_threads(self, timeout: float = 5.0) -> None:
        """Stop the loop threads and wait for them (not from a loop thread).

        Each thread returns after the batch it is dispatching, so once they
        are joined no callback of ours runs on them any more.
        """
        self._running = False
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        for t in self.threads:
            while t is not me and t.is_alive() and time.monotonic() < deadline:
                if self.owned:
                    try:
                        self.port.stop()
                    except Exception:  # port already closed
                        break
                t.join(0.05)
        self.threads = [t for t in self.threads if t.is_alive()]

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the timers and the loop threads (see :meth:`settle` to also drain)."""
        self.stop_timers(timeout)
        self.stop_threads(timeout)

    def settle(self, timeout: float = 5.0) -> bool:
        """Stop the timers and the loop threads, and return once nothing we
        put on the port is left: every posted call has run and, on a port
        we own, no operation is in flight or queued.  Call it once the
        connections and the listener are gone.  False if ``timeout`` passed.

        Order matters.  The timers go first, because the timer thread posts
        at any moment.  Then a posted call may still start more work, so
        the port is run until it is empty, on this thread once the loop
        threads have stopped: then no callback can be running elsewhere
        when emptiness is observed.
        """
        deadline = time.monotonic() + timeout
        self.stop_timers(timeout)
        if self.owned:
            self.stop_threads(max(0.0, deadline - time.monotonic()))
            return self.run_until(self._port_empty, deadline)
        # A shared port: other users may have their own operations in flight
        # and may run the port themselves, so only our posted calls count.
        # Our threads (if any) run them; without threads this one does.
        if self.threads:
            with self._pcond:
                while self._posts and time.monotonic() < deadline:
                    self._pcond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            self.stop_threads(max(0.0, deadline - time.monotonic()))
        return self.run_until(lambda: self._posts == 0, deadline)

    def _port_empty(self) -> bool:
        if self.port.closed:
            return self._posts == 0
        st = self.port.stats()
        return (
            self._posts == 0
            and st.get("inflight", 0) == 0
            and st.get("queued", 0) == 0
            and st.get("backlog", 0) == 0
        )

    def run_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Run the port on this thread (as a loop thread) until ``done()``."""
        prev = getattr(_tls, "loop", None)
        _tls.loop = self
        try:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0 or self.port.closed:
                    return done()
                try:
                    self.port.run(timeout=min(left, 0.05))
                except RuntimeError:  # called from a callback of run() on this thread
                    return done()
        finally:
            _tls.loop = prev
        return True

    # calls and timers --------------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on a loop thread (thread-safe, via ``port.post``)."""
        with self._pcond:
            self._posts += 1
        try:
            self.port.post(callback=lambda _c: self._run_posted(fn))
        except BaseException:
            self._posted_done()
            raise

    def _run_posted(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        finally:
            self._posted_done()

    def _posted_done(self) -> None:
        with self._pcond:
            self._posts -= 1
            if not self._posts:
                self._pcond.notify_all()

    def call_later(self, delay: float, fn: Callable[[], None]) -> bool:
        """Run ``fn()`` on a loop thread after ``delay`` seconds.

        One timer thread sleeps until the earliest deadline (no polling) and
        posts the call to the port, so it works while the loop is idle.
        Returns False (and drops ``fn``) once the timers are stopped.
        """
        with self._tcond:
            if self._tstop:
                return False
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))
            if self._tthread is None:
                self._tthread = threading.Thread(
                    target=self._timer_main, name="iocp-timer", daemon=True
                )
                self._tthread.start()
            self._tcond.notify()
        return True

    def _timer_main(self) -> None:
        while True:
            with self._tcond:
                while not self._tstop and (
                    not self._timers or self._timers[0][0] > time.monotonic()
                ):
                    wait = self._timers[0][0] - time.monotonic() if self._timers else None
                    self._tcond.wait(wait)
                if self._tstop:
                    return
                _, _, fn = heapq.heappop(self._timers)
            try:
                self.call_soon(fn)
            except Exception:  # port closed under us: timers are moot
                return


# --------------------------------------------------------------------------
# Connection


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


class Connection:
    """One stream connection on the port (a "transport" in asyncio terms).

    Created by :class:`Server` and :class:`Client`; not instantiated by users.
    All methods are thread-safe.
    """

    def __init__(
        self,
        owner: Any,
        sock: socket.socket,
        protocol: Any,
        peername: Address,
        sockname: Address,
    ) -> None:
        if not isinstance(owner, _Endpoint) or not isinstance(sock, socket.socket):
            raise TypeError("Connection objects are made by Server and Client, not directly")
        self._owner = owner
        self._loop: _Loop = owner._loop
        self._port = owner._loop.port
        self._cfg: _Settings = owner._settings
        self._sock = sock
        self.protocol = protocol
        #: The peer's address (as ``socket.getpeername()`` gives it).
        self.peername: Address = peername
        #: The local address.
        self.sockname: Address = sockname
        self._on_data = protocol.data_received
        self._lock = threading.Lock()
        self._mail: deque[Tuple[Callable[..., Any], Tuple[Any, ...]]] = deque()
        self._busy = False
        self._wbuf: List[bytes] = []
        self._wbuf_size = 0
        self._buffered = 0  # queued + in flight
        self._sending = False
        self._paused = False
        self._closing = False
        self._eof_pending = False  # write_eof() requested
        self._torn = False
        self._finished = False
        self._ops = 0  # our ops in flight on this socket
        self._recv_op: Any = None
        self._send_op: Any = None
        self._exc: BaseException | None = None
        self.last_activity = time.monotonic()
        #: Bytes received and sent so far.
        self.bytes_received = 0
        self.bytes_sent = 0

    def __repr__(self) -> str:
        state = "closed" if self._torn else "closing" if self._closing else "open"
        return f"<Connection {_fmt_addr(self.peername)} {state} buffered={self._buffered}>"

    # public API ---------------------------------------------------------------
    @property
    def closing(self) -> bool:
        """True once :meth:`close` or :meth:`abort` was called or the connection died."""
        return self._closing or self._torn

    @property
    def write_buffer_size(self) -> int:
        """Bytes accepted by :meth:`send` and not yet sent (including the op in flight)."""
        return self._buffered

    @property
    def writing_paused(self) -> bool:
        """True between ``pause_writing`` and ``resume_writing``."""
        return self._paused

    @property
    def socket(self) -> socket.socket:
        """The underlying socket (for ``getsockopt`` and the like; do not read or write it)."""
        return self._sock

    def send(self, data: Union[bytes, bytearray, memoryview]) -> None:
        """Queue ``data`` for sending; never blocks.

        Pending writes are joined into few ``send`` operations, one in flight
        at a time.  Mutable buffers are copied.  Data sent after
        :meth:`close`/:meth:`abort` is silently discarded.  See the module
        docstring for pause_writing/resume_writing and ``write_limit``.
        """
        if type(data) is not bytes:
            data = bytes(data)
        n = len(data)
        if not n:
            return
        with self._lock:
            if self._closing or self._torn or self._eof_pending:
                return
            buffered = self._buffered + n
            if buffered > self._cfg.limit:
                over = True
                pause = False
                payload = None
            else:
                over = False
                self._buffered = buffered
                if self._sending:  # join it to the next send op
                    self._wbuf.append(data)
                    self._wbuf_size += n
                    payload = None
                else:  # nothing in flight: this is the next send op
                    self._sending = True
                    self._ops += 1
                    payload = data
                pause = not self._paused and buffered > self._cfg.high
                if pause:
                    self._paused = True
        if over:
            self._teardown(
                WriteBufferFull(
                    f"write buffer over {self._cfg.limit} bytes: peer {_fmt_addr(self.peername)} "
                    "is not reading"
                )
            )
            return
        if payload is not None:
            self._submit_send(payload)
        if pause:
            self._serial_any(self._call, "pause_writing")

    write = send

    def close(self) -> None:
        """Stop reading, send what is buffered, then close (``connection_lost(None)``)."""
        with self._lock:
            if self._closing or self._torn:
                return
            self._closing = True
            flushing = self._sending
        if not flushing:
            self._teardown(None, graceful=True)

    def write_eof(self) -> None:
        """Shut down the sending side once the buffer is flushed (half-close)."""
        with self._lock:
            if self._closing or self._torn or self._eof_pending:
                return
            self._eof_pending = True
            flushing = self._sending
        if not flushing:
            self._shutdown_wr()

    def abort(self) -> None:
        """Close now, discarding buffered data; the peer sees a reset."""
        if self._torn:
            return
        try:
            linger = struct.pack("HH" if os.name == "nt" else "ii", 1, 0)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:
            pass
        self._teardown(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """asyncio-style access: ``peername``, ``sockname``, ``socket``."""
        return {"peername": self.peername, "sockname": self.sockname, "socket": self._sock}.get(
            name, default
        )

    # the strand: serialized protocol callbacks ------------------------------
    def _serial(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue a protocol call; run the queue here unless another thread is."""
        with self._lock:
            self._mail.append((fn, args))
            if self._busy:
                return
            self._busy = True
        self._drain()

    def _serial_any(self, fn: Callable[..., Any], *args: Any) -> None:
        """Like _serial, from any thread: off the loop, the queue runs on a loop thread."""
        with self._lock:
            self._mail.append((fn, args))
            if self._busy:
                return
            self._busy = True
        if self._loop.in_loop():
            self._drain()
        else:
            try:
                self._loop.call_soon(self._drain)
            except Exception:  # port closed: run here rather than lose callbacks
                self._drain()

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._mail:
                    self._busy = False
                    return
                fn, args = self._mail.popleft()
            try:
                fn(*args)
            except Exception as exc:
                self._callback_failed(fn, exc)

    def _callback_failed(self, fn: Any, exc: Exception) -> None:
        log.error(
            "protocol callback %s failed for %s; aborting the connection",
            getattr(fn, "__name__", fn),
            _fmt_addr(self.peername),
            exc_info=exc,
        )
        self._teardown(exc)

    def _call(self, name: str, *args: Any) -> None:
        getattr(self.protocol, name, _noop)(self, *args)

    # reading ------------------------------------------------------------------
    def _start(self) -> None:
        """Runs in the strand: connection_made, then the first recv."""
        self._call("connection_made")
        self._submit_recv()

    def _submit_recv(self) -> None:
        with self._lock:
            if self._torn or self._closing:
                return
            self._ops += 1
        try:
            op = self._port.recv(self._sock, self._cfg.read_size, callback=self._on_recv)
        except (OSError, ValueError) as exc:
            self._op_done()
            self._teardown(exc if isinstance(exc, OSError) else ConnectionError(str(exc)))
            return
        # No lock needed: _teardown sets _torn before reading _recv_op, we
        # set _recv_op before reading _torn, so one of us cancels the op.
        self._recv_op = op
        if self._torn:
            op.cancel()

    def _on_recv(self, c: Any) -> None:
        self._recv_op = None
        data = c.data
        if c.cancelled or c.error is not None or not data or self._torn:
            try:
                if c.cancelled or self._torn:
                    return
                if c.error is not None:
                    self._teardown(c.error)
                else:
                    self._serial(self._eof)
            finally:
                self._op_done()
            return
        self.bytes_received += len(data)
        self.last_activity = time.monotonic()
        with self._lock:  # op accounting and the strand's fast path in one go
            self._ops -= 1
            if self._torn:
                last = self._ops == 0
                direct = queued = False
            else:
                last = False
                direct = not self._busy
                queued = not direct
                if direct:
                    self._busy = True
                    if self._mail:  # older calls first
                        self._mail.append((self._deliver, (data,)))
                        direct = False
                else:
                    self._mail.append((self._deliver, (data,)))
        if last:
            self._finish()
        elif queued:
            return
        elif direct:
            try:
                self._deliver(data)
            except Exception as exc:
                self._callback_failed(self._deliver, exc)
            self._drain()
        else:
            self._drain()

    def _deliver(self, data: bytes) -> None:
        if self._closing or self._torn:
            return
        self._submit_recv()  # keep one recv in flight while the handler works
        self._on_data(self, data)

    def _eof(self) -> None:
        if self._torn:
            return
        keep = getattr(self.protocol, "eof_received", _noop)(self)
        if not keep:
            self.close()

    # writing ------------------------------------------------------------------
    def _take_locked(self) -> bytes:
        if len(self._wbuf) == 1 or len(self._wbuf[0]) >= _SEND_CHUNK:
            data = self._wbuf.pop(0)
        else:
            n = 0
            total = 0
            for piece in self._wbuf:
                n += 1
                total += len(piece)
                if total >= _SEND_CHUNK:
                    break
            data = b"".join(self._wbuf[:n])
            del self._wbuf[:n]
        self._wbuf_size -= len(data)
        return data

    def _submit_send(self, payload: bytes) -> None:
        """Start a send op; the caller counted it in ``_ops`` and set ``_sending``."""
        try:
            op = self._port.send(self._sock, payload, callback=self._on_send)
        except (OSError, ValueError) as exc:
            with self._lock:
                self._sending = False
            self._op_done()
            self._teardown(exc if isinstance(exc, OSError) else ConnectionError(str(exc)))
            return
        self._send_op = op  # see _submit_recv for why no lock
        if self._torn:
            op.cancel()

    def _on_send(self, c: Any) -> None:
        if c.cancelled or c.error is not None or self._torn:
            with self._lock:
                self._sending = False
            if c.error is not None and not c.cancelled:
                self._teardown(c.error)
            self._op_done()
            return
        nbytes = c.nbytes
        self.bytes_sent += nbytes
        self.last_activity = time.monotonic()
        with self._lock:
            self._buffered -= nbytes
            if self._wbuf and not self._torn:
                payload: bytes | None = self._take_locked()  # the op count carries over
                last = False
            else:
                payload = None
                self._sending = False
                self._ops -= 1
                last = self._torn and self._ops == 0
            resume = self._paused and self._buffered <= self._cfg.low
            if resume:
                self._paused = False
            finish = payload is None and self._closing and not self._torn
            eof = payload is None and self._eof_pending and not self._closing
        if payload is not None:
            self._submit_send(payload)
        if resume:
            self._serial(self._call, "resume_writing")
        if eof:
            self._shutdown_wr()
        if finish:
            self._teardown(None, graceful=True)
        if last:
            self._finish()

    def _shutdown_wr(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    # teardown -------------------------------------------------------------------
    def _teardown(self, exc: BaseException | None, graceful: bool = False) -> None:
        """Unregister (cancelling our ops); close once their completions are in."""
        with self._lock:
            if self._torn:
                return
            self._torn = True
            self._closing = True
            self._exc = exc
            self._wbuf.clear()
            self._wbuf_size = 0
            ops = (self._recv_op, self._send_op)
            idle = self._ops == 0
        if graceful:
            self._shutdown_wr()
        try:
            self._port.unregister(self._sock)
        except (OSError, ValueError):
            pass
        for op in ops:
            if op is not None and not op.done:
                try:
                    op.cancel()
                except Exception:
                    pass
        if idle:
            self._finish()

    def _op_done(self) -> None:
        with self._lock:
            self._ops -= 1
            last = self._torn and self._ops == 0
        if last:
            self._finish()

    def _finish(self) -> None:
        with self._lock:
            if self._finished:
                return
            self._finished = True
        try:
            self._sock.close()
        except OSError:
            pass
        self._serial_any(self._lost)

    def _lost(self) -> None:
        # The owner forgets the connection only after connection_lost has
        # returned: "no connection left" then means no callback of a
        # connection is queued or running, which shutdown() relies on.
        try:
            self._call("connection_lost", self._exc)
        finally:
            self.protocol = None
            self._on_data = _noop
            self._owner._forget(self)


# --------------------------------------------------------------------------
# Common base for Server and Client


class _Endpoint:
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


# --------------------------------------------------------------------------
# Server


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
            self._loop = self._make_loop()
        except BaseException:
            if self._sock is sock:
                self._sock = None
            sock.close()
            raise
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

        A second request more than half a second after the first skips the
        drain (so Ctrl-C twice means "now").
        """
        now = time.monotonic()
        if self._signal_count == 0 or now - self._first_signal > 0.5:
            self._signal_count += 1
        if self._signal_count == 1:
            self._first_signal = now
        self._stop_event.set()

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
        """
        if not self._started or self._stopped:
            return self.final_stats or {}
        if self._loop.in_loop():
            raise RuntimeError("Server.shutdown() cannot be called from a loop callback")
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
                    self._conns[id(conn)] = conn
        if conn is None:
            return
        if late:
            _unregister_close(self._loop.port, csock)
            return
        conn._serial(conn._start)

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
    def _schedule_idle_check(self) -> None:
        assert self.idle_timeout is not None
        tick = min(max(self.idle_timeout / 4.0, 0.05), 1.0)
        self._loop.call_later(tick, self._idle_check)

    def _idle_check(self) -> None:
        if self._stopped or self.idle_timeout is None:
            return
        cutoff = time.monotonic() - self.idle_timeout
        for conn in self.connections:
            if conn.last_activity < cutoff and not conn._torn:
                log.info("closing idle connection %s", _fmt_addr(conn.peername))
                conn._teardown(TimeoutError(f"idle for {self.idle_timeout} s"), graceful=True)
        self._schedule_idle_check()

    # workers -----------------------------------------------------------------------
    def _serve_workers(
        self,
        threads: int,
        workers: int,
        handle_signals: bool,
        ready: Callable[[], Any] | None,
    ) -> int:
        if not hasattr(os, "fork") or not hasattr(socket, "SO_REUSEPORT"):
            raise NotImplementedError("workers > 1 needs fork() and SO_REUSEPORT (Linux)")
        if self.path is not None:
            raise ValueError("workers > 1 is for TCP; Unix sockets cannot share a path")
        if self._started:
            raise RuntimeError("serve_forever(workers=...) must be called before start()")
        if self._given_port is not None:
            # Each worker makes its own port after fork(); a port cannot be
            # used in a process other than the one that created it.
            raise ValueError("workers > 1 creates a port in each forked worker; "
                             "a completion_port= cannot be shared across fork()")
        self.reuse_port = True
        reserve = self.bind()  # pins the port (resolves port=0) for the workers
        self.port = reserve.getsockname()[1]
        self._sock = None
        pids: List[int] = []
        rfd, wfd = os.pipe()  # each worker writes one byte once it listens
        for i in range(workers):
            pid = os.fork()
            if pid == 0:  # worker
                code = 1
                try:
                    reserve.close()
                    os.close(rfd)
                    self.worker_id = i
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
                    signal.signal(signal.SIGTERM, signal.SIG_DFL)

                    def listening() -> None:
                        os.write(wfd, b"r")
                        os.close(wfd)

                    code = self._serve_here(threads, handle_signals=True, ready=listening)
                except BaseException:
                    log.exception("worker %d failed", i)
                finally:
                    logging.shutdown()
                    os._exit(code)
            pids.append(pid)
        os.close(wfd)
        got = 0
        while got < workers:  # EOF early means a worker died before listening
            try:
                chunk = os.read(rfd, workers)
            except InterruptedError:
                continue
            if not chunk:
                break
            got += len(chunk)
        os.close(rfd)
        reserve.close()
        if got == workers and ready is not None:
            ready()

        def forward(signum: int, _frame: Any) -> None:
            for p in pids:
                try:
                    os.kill(p, signum)
                except OSError:
                    pass

        old: Dict[int, Any] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                old[signum] = signal.signal(signum, forward)
        status = 0
        try:
            remaining = set(pids)
            while remaining:
                try:
                    pid, st = os.waitpid(-1, 0)
                except ChildProcessError:
                    break
                except InterruptedError:
                    continue
                if pid in remaining:
                    remaining.discard(pid)
                    code = os.waitstatus_to_exitcode(st)
                    if code != 0:
                        log.error("worker pid %d exited with %d", pid, code)
                        status = 1
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return status


# Signals that ask a server to shut down gracefully.  On Windows, Ctrl-Break
# (CTRL_BREAK_EVENT sent to a CREATE_NEW_PROCESS_GROUP child) is the only
# way another process can ask for that: SIGTERM there kills outright.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM) + (
    (signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ()
)


def _fmt_stats(stats: Dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in stats.items())


def _close_quietly(sock: Any) -> None:
    try:
        sock.close()
    except Exception:
        pass


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


# --------------------------------------------------------------------------
# Client


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
        self._loop = self._make_loop()
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
        conn = self._new_connection(sock, peer)
        with self._lock:
            self._conns[id(conn)] = conn
        self.connection = conn
        conn._serial_any(conn._start)
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


def _unregister_close(port: Any, sock: socket.socket) -> None:
    try:
        port.unregister(sock)
    except (OSError, ValueError):
        pass
    _close_quietly(sock)


def connect(
    host: str | None,
    port: int,
    handler: Any,
    *,
    timeout: float | None = 10.0,
    **kwargs: Any,
) -> Client:
    """Connect to ``host:port`` and return the connected :class:`Client`.

    ``handler`` is a protocol factory as for :class:`Server`; keyword
    arguments go to :class:`Client`.  ``client.connection.send(...)`` writes,
    ``client.close()`` (or ``with``) closes.
    """
    client = Client(handler, host, port, **kwargs)
    client.connect(timeout)
    return client

