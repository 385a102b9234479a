"""The connection of :mod:`iocp.server`: :class:`Connection`, :class:`Protocol`.

Design note.  A :class:`Connection` is the transport of one stream socket on
the port.  It keeps one ``recv`` in flight (the next one is submitted before
``data_received`` runs, so the kernel fills it while the handler works) and
at most one ``send``, joining writes queued meanwhile into the next send of
about ``_SEND_CHUNK`` bytes.  It counts its operations in flight and closes
the socket only once their completions are in (the port owns an op until
then).  Protocol callbacks of one connection run one at a time and in order
through a small mailbox (a strand): the thread that finds it idle runs the
queue, others only enqueue.  A per-connection lock guards the state for a
few attribute updates and is never held while user code runs.

The connection knows its owner only through :class:`_Owner` (the loop, the
settings and ``_forget``), which :class:`iocp.server._endpoint._Endpoint`
implements, so this module does not import the server or client.

That is the multi-thread mode.  :class:`_StreamConnection` is the
single-thread one (one thread dispatches the endpoint's own port): the same
API on ``iocp._core.Stream``, which calls the protocol from the port's
dispatch and queues writes in C; no lock, and calls from other threads are
posted to the port.  The endpoint picks the class per connection.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, List, Tuple, Union

from iocp import _core
from iocp.server._util import Address, _fmt_addr, _noop, _unregister_close, log

if TYPE_CHECKING:
    from iocp.server._endpoint import _Settings
    from iocp.server._loop import _Loop

_SEND_CHUNK = 256 * 1024  # join pending writes into send ops of about this size
_monotonic = time.monotonic


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


class _Owner:
    """What a :class:`Connection` needs from the server or client that made it."""

    _loop: _Loop
    _settings: _Settings

    def _forget(self, conn: Connection) -> None:
        """The connection is gone (its ``connection_lost`` has returned)."""
        raise NotImplementedError


class Connection:
    """One stream connection on the port (a "transport" in asyncio terms).

    Created by :class:`Server` and :class:`Client`; not instantiated by users.
    All methods are thread-safe.
    """

    # Slots make the per-message attribute traffic cheaper; ``__dict__``
    # stays, so code that hangs its own attributes on a connection works.
    # Only what both modes use is here: the threaded mode's own state is in
    # _ThreadedConnection's slots, so a stream connection (an idle one is
    # what a server holds most of) does not carry them.
    __slots__ = (
        "_owner", "_sock", "protocol",
        "_paused", "_closing", "_eof_pending", "_torn", "_rpaused",
        "__dict__", "__weakref__",
    )

    peername: Address
    sockname: Address
    last_activity: float
    bytes_received: int
    bytes_sent: int

    def __init__(
        self,
        owner: Any,
        sock: socket.socket,
        protocol: Any,
        peername: Address,
        sockname: Address,
    ) -> None:
        cfg = self._init_common(owner, sock, protocol)
        self._loop: _Loop = owner._loop
        self._port = owner._loop.port
        self._cfg = cfg
        self._high = cfg.high  # copied: read on every message
        self._low = cfg.low
        self._limit = cfg.limit
        self._exc: BaseException | None = None
        self._nread = cfg.read_size
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
        self._finished = False
        self._ops = 0  # our ops in flight on this socket
        self._recv_op: Any = None
        # Reading flow control (and _rpaused).  They change only in the strand.
        self._held: deque[bytes | None] = deque()  # arrived while paused; None: EOF
        self._recv_pending = False  # a recv submitted and its result not yet handled
        self._eof_seen = False
        self._send_op: Any = None
        # The completion callbacks, bound once (not once per operation).  The
        # cycle they make is broken in _lost().
        self._recv_cb: Any = self._on_recv
        self._send_cb: Any = self._on_send
        self.last_activity = _monotonic()
        #: Bytes received and sent so far.
        self.bytes_received = 0
        self.bytes_sent = 0

    def _init_common(self, owner: Any, sock: socket.socket, protocol: Any) -> _Settings:
        """The state both modes keep; returns the settings."""
        if not isinstance(owner, _Owner) or not isinstance(sock, socket.socket):
            raise TypeError("Connection objects are made by Server and Client, not directly")
        cfg: _Settings = owner._settings
        self._owner = owner
        self._sock = sock
        self.protocol = protocol
        self._paused = False
        self._rpaused = False  # pause_reading() called, resume_reading() not yet
        self._closing = False
        self._eof_pending = False  # write_eof() requested
        self._torn = False
        return cfg

    def _linger0(self) -> None:
        """SO_LINGER on with a zero timeout: the close that follows resets
        the connection (abort()) instead of a FIN."""
        try:
            linger = struct.pack("HH" if os.name == "nt" else "ii", 1, 0)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        except OSError:
            pass

    def __repr__(self) -> str:
        state = "closed" if self._torn else "closing" if self.closing else "open"
        return f"<Connection {_fmt_addr(self.peername)} {state} buffered={self.write_buffer_size}>"

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
    def reading_paused(self) -> bool:
        """True between :meth:`pause_reading` and :meth:`resume_reading`."""
        return self._rpaused

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
            if buffered > self._limit:
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
                pause = not self._paused and buffered > self._high
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
        if payload is not None:  # _submit_send, inlined: this is the hot path
            try:
                op = self._port.send(self._sock, payload, callback=self._send_cb)
            except (OSError, ValueError) as exc:
                self._send_failed(exc)
                return
            self._send_op = op  # see _submit_recv for why no lock
            if self._torn:
                op.cancel()
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
        self._linger0()
        self._teardown(None)

    def pause_reading(self) -> None:
        """Stop calling ``data_received`` until :meth:`resume_reading`.

        No new ``recv`` is submitted while paused; what the one already in
        flight brings (data or EOF) is held, not lost, and delivered in
        order after :meth:`resume_reading`.  Called from a protocol callback
        it takes effect at once; from another thread, a ``data_received``
        already under way still runs.  No-op when paused or closing.
        """
        if not (self._closing or self._torn):
            self._rpaused = True

    def resume_reading(self) -> None:
        """Deliver what was held since :meth:`pause_reading` (in order, in the
        connection's strand, never inside the caller), then read again."""
        if not self._rpaused:
            return
        self._rpaused = False
        if not (self._closing or self._torn):
            self._serial_any(self._resume)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """asyncio-style access: ``peername``, ``sockname``, ``socket``."""
        return {"peername": self.peername, "sockname": self.sockname, "socket": self._sock}.get(
            name, default
        )

    # what the server and the client call -----------------------------------------
    def _begin(self) -> None:
        """From a loop callback: connection_made, then reading."""
        self._serial(self._start)

    def _begin_any(self) -> None:
        """From any thread: connection_made, then reading, on a loop thread."""
        self._serial_any(self._start)

    def _discard(self) -> None:
        """Never begun (accepted as shutdown began): close, with no callback."""
        _unregister_close(self._port, self._sock)

    def _idle(self, cutoff: float, now: float) -> bool:
        """True if nothing moved since ``cutoff`` (and the connection is up)."""
        return self.last_activity < cutoff and not self._torn

    def _idle_close(self, exc: BaseException) -> None:
        self._teardown(exc, graceful=True)

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
        if not self._rpaused:  # else resume_reading() starts reading
            self._submit_recv()

    def _submit_recv(self) -> None:
        with self._lock:
            if self._torn or self._closing:
                return
            self._ops += 1
        self._recv_pending = True
        try:
            op = self._port.recv(self._sock, self._nread, callback=self._recv_cb)
        except (OSError, ValueError) as exc:
            self._recv_pending = False
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
        self.last_activity = _monotonic()
        with self._lock:  # op accounting and the strand's fast path in one go
            if self._torn:
                self._ops -= 1
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
                if direct and not (self._closing or self._rpaused):
                    # The hot path: _deliver() inlined.  This recv's count
                    # carries over to the next one, submitted below.
                    resubmit = True
                else:
                    resubmit = False
                    self._ops -= 1
        if last:
            self._finish()
        elif queued:
            return
        elif resubmit:
            # We own the strand (busy): the next recv goes out before the
            # handler runs, as _deliver() does, so the kernel fills it meanwhile.
            try:
                op = self._port.recv(self._sock, self._nread, callback=self._recv_cb)
            except (OSError, ValueError) as exc:
                self._recv_pending = False
                self._op_done()
                self._teardown(exc if isinstance(exc, OSError) else ConnectionError(str(exc)))
            else:
                self._recv_op = op  # see _submit_recv for why no lock
                if self._torn:
                    op.cancel()
            try:  # as _deliver(): what arrived is handed over even so
                self._on_data(self, data)
            except Exception as exc:
                self._callback_failed(self._deliver, exc)
            with self._lock:  # _drain(), inlined for its usual outcome
                if not self._mail:
                    self._busy = False
                    return
            self._drain()
        elif direct:
            try:
                self._deliver(data)
            except Exception as exc:
                self._callback_failed(self._deliver, exc)
            self._drain()
        else:
            self._drain()

    def _deliver(self, data: bytes) -> None:
        self._recv_pending = False  # this recv's result is handled here
        if self._closing or self._torn:
            return
        if self._rpaused:
            self._held.append(data)  # no next recv until resume_reading()
            return
        self._submit_recv()  # keep one recv in flight while the handler works
        self._on_data(self, data)

    def _eof(self) -> None:
        self._recv_pending = False
        self._eof_seen = True
        if self._torn:
            return
        if self._rpaused:
            self._held.append(None)
            return
        self._eof_now()

    def _eof_now(self) -> None:
        keep = getattr(self.protocol, "eof_received", _noop)(self)
        if not keep:
            self.close()

    def _resume(self) -> None:
        """Runs in the strand after resume_reading(): held data first, then read."""
        held = self._held
        while held and not self._rpaused:
            if self._closing or self._torn:
                held.clear()
                return
            data = held.popleft()
            if data is None:  # EOF, always the last thing held
                self._eof_now()
                return
            self._on_data(self, data)
        if not (self._rpaused or self._recv_pending or self._eof_seen):
            self._submit_recv()

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
            op = self._port.send(self._sock, payload, callback=self._send_cb)
        except (OSError, ValueError) as exc:
            self._send_failed(exc)
            return
        self._send_op = op  # see _submit_recv for why no lock
        if self._torn:
            op.cancel()

    def _send_failed(self, exc: Exception) -> None:
        with self._lock:
            self._sending = False
        self._op_done()
        self._teardown(exc if isinstance(exc, OSError) else ConnectionError(str(exc)))

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
        self.last_activity = _monotonic()
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
            resume = self._paused and self._buffered <= self._low
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
        """Unregister (cancelling our ops); close once their completions are in.

        Teardown counts as an op of its own until its socket calls are
        done: otherwise the last completion, on a loop thread, could close
        the socket while this thread is still in shutdown() or unregister
        on it -- a call on a closed handle, or on a new socket that got the
        same handle value meanwhile (Windows and Wine reuse them at once;
        Wine 8's wineserver even dies of a shutdown racing the close:
        "sock_poll_event: Assertion `sock->obj.ops == &sock_ops' failed")."""
        with self._lock:
            if self._torn:
                return
            self._torn = True
            self._closing = True
            self._exc = exc
            self._wbuf.clear()
            self._wbuf_size = 0
            ops = (self._recv_op, self._send_op)
            self._ops += 1  # this teardown's own count, dropped below
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
        self._op_done()  # closes the socket now if no op is left

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
            self._recv_cb = self._send_cb = _noop  # no op is left to call them
            self._owner._forget(self)


class _ThreadedConnection(Connection):
    """The multi-thread mode's :class:`Connection`: its methods are
    Connection's own; this class only adds the slots of their state."""

    __slots__ = (
        "_loop", "_port", "_cfg", "_high", "_low", "_limit", "_exc",
        "peername", "sockname", "_on_data", "_lock", "_mail", "_busy", "_wbuf",
        "_wbuf_size", "_buffered", "_sending", "_finished", "_ops", "_recv_op",
        "_held", "_recv_pending", "_eof_seen", "_send_op", "_recv_cb", "_send_cb",
        "_nread", "last_activity", "bytes_received", "bytes_sent",
    )


# --------------------------------------------------------------------------
# The single-thread connection, on the stream core (iocp._core.Stream)

# None with a core that has no streams: every connection is then threaded.
_Stream: Any = getattr(_core, "Stream", None)
_stream_connection_send: Any = getattr(_core, "stream_connection_send", None)

_get_ident = threading.get_ident


class _Events:
    """Where the stream looks up the rare events of every connection (its
    ``events``): the connection's methods, unbound, which the stream calls
    with the connection first -- their ``self``.  A class, never
    instantiated: nothing of it is kept per connection.  The stream calls
    the user's ``data_received(conn, data)`` itself, and its hooks
    (``on_error``, bind_server's ``foreign`` and ``over``) are the
    connection's methods too, called with the connection (its ``owner``)
    first."""


class _StreamConnection(Connection):
    """A :class:`Connection` whose socket is driven by the stream core.

    Used when one thread dispatches the port (``start(threads=0|1)`` on the
    server's own port, a client on its own port).  The stream calls the
    protocol straight from the port's dispatch, queues writes in C and
    sends them gathered, with silent sends, before the port's next wait;
    no lock is taken: the stream is only touched by the thread that
    dispatches the port.  A call from any other thread (``send()`` from a
    worker thread, ``shutdown()`` closing connections) is posted to the
    port and runs there, in order.

    A message costs no Python of ours: the stream calls the user's
    ``data_received(conn, data)`` from C; ``send`` and ``write`` are
    instance slots holding the stream's ``server_write``, a C method that
    checks the thread (others are posted), the state and the write limit,
    then queues; ``bytes_received``, ``bytes_sent`` and ``last_activity``
    are the stream's C counters.
    """

    __slots__ = ("_stream", "_disp", "_begun", "_user")

    def __init__(
        self,
        owner: Any,
        sock: socket.socket,
        protocol: Any,
        peername: Address,
        sockname: Address,
    ) -> None:
        assert _Stream is not None
        cfg = self._init_common(owner, sock, protocol)
        # peername and sockname are the stream's (it reads both), the loop,
        # the settings and the write limits the owner's: none is kept twice
        # per connection.
        self._disp = owner._loop.dispatcher  # [ident of the dispatching thread]
        self._begun = False
        self._user = protocol
        # Nothing per connection but the stream: the user's protocol is the
        # stream's (its data_received kept as the class's function), the
        # rare events and the hooks are this class's functions.
        cls = _StreamConnection
        stream = _Stream(
            owner._loop.port, sock, protocol, conn=self, events=_Events, owner=self, buffered=False,
            write_high_water=cfg.high, write_low_water=cfg.low, on_error=cls._on_error,
        )
        stream.bind_server(self._disp, cfg.limit, cls._foreign_send, cls._over_limit)
        self._stream = stream

    # public API --------------------------------------------------------------
    # send() and write(): the stream's server_write(), a C function of the
    # core bound as a method of the class (see the end of the module), so
    # a call is one C call and an idle connection keeps no bound method.

    @property
    def closing(self) -> bool:
        return self._closing or self._torn or self._stream.is_closing()

    @property
    def write_buffer_size(self) -> int:
        return self._stream.get_write_buffer_size()  # type: ignore[no-any-return]

    @property
    def writing_paused(self) -> bool:
        return self._paused

    @property
    def peername(self) -> Address:  # type: ignore[override]
        """The peer's address (as ``socket.getpeername()`` gives it)."""
        return self._stream.get_extra_info("peername")  # type: ignore[no-any-return]

    @property
    def sockname(self) -> Address:  # type: ignore[override]
        """The local address."""
        return self._stream.get_extra_info("sockname")  # type: ignore[no-any-return]

    @property
    def bytes_received(self) -> int:  # type: ignore[override]
        """Bytes received so far (delivered to ``data_received``)."""
        return self._stream.bytes_received  # type: ignore[no-any-return]

    @property
    def bytes_sent(self) -> int:  # type: ignore[override]
        """Bytes written to the socket so far (accepted minus still buffered)."""
        return self._stream.bytes_sent  # type: ignore[no-any-return]

    @property
    def last_activity(self) -> float:  # type: ignore[override]
        """``time.monotonic()`` of the last data received or send completed."""
        return self._stream.last_activity  # type: ignore[no-any-return]

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on whichever thread dispatches the port next
        (``fn`` is a ``_*_here`` method: it does not look at the thread again,
        so it also runs where shutdown() took the dispatch over)."""
        try:
            self._owner._loop.call_soon(lambda: fn(*args))
        except Exception:  # the port is closed: the connection is gone too
            pass

    def _here_or_post(self, fn: Callable[..., Any], *args: Any) -> None:
        """``fn(*args)`` now on the dispatching thread, else posted there."""
        if self._disp[0] != _get_ident():
            self._post(fn, *args)
        else:
            fn(*args)

    def _foreign_send(self, data: bytes) -> None:
        """send() from a thread that does not dispatch the port (the stream
        copied ``data`` into bytes already)."""
        self._post(self._stream.server_write_here, data)

    def _over_limit(self) -> None:
        self._stream.abort(
            WriteBufferFull(
                f"write buffer over {self._owner._settings.limit} bytes: "
                f"peer {_fmt_addr(self.peername)} is not reading"
            )
        )

    def close(self) -> None:
        self._here_or_post(self._close_here)

    def _close_here(self) -> None:
        if self._closing or self._torn:
            return
        self._closing = True
        self._stream.close()

    def write_eof(self) -> None:
        self._here_or_post(self._write_eof_here)

    def _write_eof_here(self) -> None:
        if self._closing or self._torn or self._eof_pending:
            return
        self._eof_pending = True
        self._stream.write_eof()

    def abort(self) -> None:
        self._here_or_post(self._abort_here)

    def _abort_here(self) -> None:
        if self._torn:
            return
        self._linger0()
        self._closing = True
        self._stream.abort()

    def pause_reading(self) -> None:
        self._here_or_post(self._pause_reading_here)

    def _pause_reading_here(self) -> None:
        if not (self._closing or self._torn) and not self._rpaused:
            self._rpaused = True
            self._stream.pause_reading()

    def resume_reading(self) -> None:
        self._here_or_post(self._resume_reading_here)

    def _resume_reading_here(self) -> None:
        if not self._rpaused:
            return
        self._rpaused = False
        if not (self._closing or self._torn):
            self._stream.resume_reading()

    # what the server and the client call ----------------------------------------
    def _begin(self) -> None:
        if self._disp[0] is None:  # start(threads=0): the caller's thread runs the port
            self._disp[0] = _get_ident()
        self._begun = True
        try:
            getattr(self._user, "connection_made", _noop)(self)
        except Exception as exc:
            self._on_error(exc)
            self._closing = True
            self._stream.abort(exc)
            return
        if not (self._closing or self._torn):
            self._stream.start()

    def _begin_any(self) -> None:
        if self._owner._loop.in_loop():
            self._begin()
        else:
            self._post(self._begin)

    def _discard(self) -> None:
        # The stream owns the socket now: it unregisters and closes it.
        self._closing = True
        self._stream.abort()

    def _idle(self, cutoff: float, now: float) -> bool:
        # The stream stamps every delivery and every completed send.
        return self._stream.last_activity < cutoff and not self._torn

    def _idle_close(self, exc: BaseException) -> None:
        self._here_or_post(self._idle_close_here, exc)

    def _idle_close_here(self, exc: BaseException) -> None:
        if not self._torn:
            self._closing = True
            self._stream.abort(exc)

    # called by the stream ------------------------------------------------------
    # These four are _Events' class-level hooks: the stream calls them
    # with the connection first, as self.
    def _on_eof(self) -> Any:
        keep = getattr(self._user, "eof_received", _noop)(self)
        if not keep:
            self._closing = True  # the stream closes: later sends are dropped
        return keep

    def _on_pause(self) -> None:
        self._paused = True
        self._flow_call("pause_writing")

    def _on_resume(self) -> None:
        self._paused = False
        self._flow_call("resume_writing")

    def _flow_call(self, name: str) -> None:
        # The stream only reports what these raise; iocp.server aborts the
        # connection, as for any other callback.
        try:
            getattr(self._user, name, _noop)(self)
        except Exception as exc:
            self._on_error(exc)
            self._stream.abort(exc)

    def _on_error(self, exc: BaseException) -> None:
        self._closing = True  # the stream aborts
        log.error(
            "protocol callback failed for %s; aborting the connection",
            _fmt_addr(self.peername),
            exc_info=exc,
        )

    def _on_lost(self, exc: BaseException | None) -> None:
        # As for the threaded connection: forgotten only once connection_lost
        # has returned, which shutdown() relies on.
        self._torn = True
        self._closing = True
        try:
            if self._begun:  # no connection_lost without connection_made
                getattr(self._user, "connection_lost", _noop)(self, exc)
        except Exception as err:
            self._on_error(err)
        finally:
            self.protocol = self._user = None
            self._owner._forget(self)


_Events.eof_received = staticmethod(_StreamConnection._on_eof)  # type: ignore[attr-defined]
_Events.pause_writing = staticmethod(_StreamConnection._on_pause)  # type: ignore[attr-defined]
_Events.resume_writing = staticmethod(_StreamConnection._on_resume)  # type: ignore[attr-defined]
_Events.connection_lost = staticmethod(_StreamConnection._on_lost)  # type: ignore[attr-defined]
if _stream_connection_send is not None:
    _StreamConnection.send = _StreamConnection.write = _stream_connection_send  # type: ignore[method-assign]
