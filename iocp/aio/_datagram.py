"""Datagram transports and sock_recvfrom/sock_sendto on the port's poll ops.

The port has no recvfrom/sendto ops, and a datagram socket gains nothing
from one: a datagram is whole or absent, so "tell me when it is readable,
then read what is there" is the whole job.  So:

- Reading: one multishot POLLIN op per transport.  Each completion (an
  edge) drains the socket with non-blocking ``recvfrom_into`` into the
  loop's receive buffer until EAGAIN, at most ``_READ_BATCH`` datagrams per
  turn; a socket that still holds more then continues on the next loop
  iteration (a call_soon), so one busy socket cannot starve the loop, and
  the edge it will not raise again is not waited for.  Errors the socket
  reports for an earlier datagram (ECONNREFUSED after an ICMP port
  unreachable on a connected socket...) go to ``error_received`` and
  reading goes on.
- Writing: ``sendto`` sends at once when nothing is queued; on EAGAIN the
  datagram (copied: the caller may reuse its buffer) is queued and a
  one-shot POLLOUT op flushes the queue when the socket is writable.  Flow
  control as the selector loop's: ``pause_writing`` above the high-water
  mark, ``resume_writing`` at or below the low one.
- The protocol is called from the port's dispatch (no Handle per
  datagram); the select() that dispatched is then ended so the loop runs
  what the protocol scheduled this iteration.  A protocol exception goes
  to the loop's exception handler, as an exception in a selector loop's
  reader callback does, and the transport goes on.

The behaviour (checks, error words, close/abort order) follows asyncio's
selector datagram transport.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import socket
import sys
import warnings
from asyncio.log import logger
from typing import Any, Callable

from iocp._core import POLLIN, POLLOUT

from . import _compat

_READ_BATCH = 64  # datagrams per turn before yielding to the loop
_MAX_SIZE = 256 * 1024  # as asyncio's datagram transports read
_LOG_THRESHOLD = 5  # asyncio.constants.LOG_THRESHOLD_FOR_CONNLOST_WRITES


def _recv_buffer(loop: Any) -> memoryview:
    """The loop's receive buffer (one per loop: datagrams are copied out
    before the protocol sees them)."""
    mv = getattr(loop, "_iocp_dgram_buffer", None)
    if mv is None:
        mv = memoryview(bytearray(_MAX_SIZE))
        loop._iocp_dgram_buffer = mv
    return mv


_WSAECONNRESET = 10054


def _datagram_error(exc: OSError) -> OSError:
    """The error a datagram socket reports for an earlier datagram, in the
    words of every backend: Windows says WSAECONNRESET (10054, "a previous
    send operation resulted in an ICMP Port Unreachable message", as its
    recv/recvfrom/send documentation puts it) where POSIX says
    ECONNREFUSED; on a datagram socket it can mean nothing else, so the
    protocol gets the ConnectionRefusedError it gets on Linux."""
    if sys.platform == "win32" and getattr(exc, "winerror", None) == _WSAECONNRESET:
        refused = ConnectionRefusedError(
            errno.ECONNREFUSED, "ICMP port unreachable for an earlier datagram"
        )
        refused.__cause__ = exc
        return refused
    return exc


def _end_run(loop: Any) -> None:
    px = loop._proactor
    if px is not None:
        px._end_run()


class DatagramTransport(asyncio.Transport, asyncio.DatagramTransport):
    """A UDP or AF_UNIX SOCK_DGRAM transport on the loop's port.

    Also an ``asyncio.Transport``, as asyncio's own datagram transports
    are (their flow-control base is one; CPython's tests check it)."""

    max_size = _MAX_SIZE

    def __init__(
        self,
        loop: Any,
        sock: socket.socket,
        protocol: Any,
        address: Any = None,
        waiter: asyncio.Future[Any] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(extra)
        _compat.fill_socket_extra(self._extra, sock)
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._sock_fd = sock.fileno()
        self._protocol: Any = protocol
        self._address = address
        self._port = loop._proactor._register(sock)  # also makes it non-blocking
        self._buf = _recv_buffer(loop)
        self._buffer: collections.deque[tuple[bytes, Any]] = collections.deque()
        self._buffer_size = 0
        self._closing = False
        self._conn_lost = 0
        self._read_op: Any = None
        self._write_op: Any = None
        self._more = False  # a read turn is queued for the next iteration
        self._protocol_paused = False
        self._high_water = 64 * 1024
        self._low_water = 16 * 1024
        loop.call_soon(protocol.connection_made, self)
        loop.call_soon(self._start_reading)  # only after connection_made()
        if waiter is not None:
            loop.call_soon(_set_result_unless_cancelled, waiter, None)

    def __repr__(self) -> str:
        info = [type(self).__name__]
        if self._sock is None:
            info.append("closed")
        elif self._closing:
            info.append("closing")
        info.append(f"fd={self._sock_fd}")
        if self._sock is not None:
            info.append("read=" + ("polling" if self._read_op is not None else "idle"))
            info.append("write=" + ("polling" if self._write_op is not None else "idle"))
            info.append(f"bufsize={self._buffer_size}")
        return "<{}>".format(" ".join(info))

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if self._sock is not None:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            self._sock.close()

    # ---- protocol --------------------------------------------------------

    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol

    def get_protocol(self) -> Any:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def _call(self, fn: Callable[..., Any], *args: Any) -> None:
        """A protocol callback from the port's dispatch: an exception goes
        to the exception handler (as a selector loop's reader Handle sends
        it), the transport goes on."""
        try:
            fn(*args)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler(
                {
                    "message": f"Exception in callback {getattr(fn, '__qualname__', fn)!s}",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )

    # ---- reading ---------------------------------------------------------

    def _start_reading(self) -> None:
        if self._closing or self._sock is None or self._read_op is not None:
            return
        self._read_op = self._port.poll(self._sock, POLLIN, self._on_readable, multishot=True)

    def _on_readable(self, c: Any) -> None:
        if c.operation is not self._read_op:
            return  # cancelled by close()
        if not c.more:
            self._read_op = None
        if c.cancelled:
            if not self._closing:  # the socket left the port behind our back
                self._fatal_error(ConnectionAbortedError("the socket left the event loop's port"),
                                  "Fatal read error on datagram transport")
            return
        self._read_ready()
        if self._read_op is None and not self._closing and self._sock is not None:
            self._start_reading()  # the multishot op ended (the backend may end one)
        _end_run(self._loop)

    def _read_more(self) -> None:
        self._more = False
        self._read_ready()

    def _read_ready(self) -> None:
        sock = self._sock
        buf = self._buf
        for _ in range(_READ_BATCH):
            if self._closing or sock is None:
                return
            try:
                n, addr = sock.recvfrom_into(buf)
            except (BlockingIOError, InterruptedError):
                return  # drained: the next arrival raises a new edge
            except OSError as exc:  # for an earlier datagram (ICMP); cleared by reading it
                self._call(self._protocol.error_received, _datagram_error(exc))
                continue
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal read error on datagram transport")
                return
            self._call(self._protocol.datagram_received, bytes(buf[:n]), addr)
        if not self._more:  # more may be waiting, and no edge will say so
            self._more = True
            self._loop.call_soon(self._read_more)

    # ---- writing ---------------------------------------------------------

    def get_write_buffer_size(self) -> int:
        return self._buffer_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low_water, self._high_water)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water = high
        self._low_water = low
        self._maybe_pause_protocol()

    def _maybe_pause_protocol(self) -> None:
        if self._buffer_size <= self._high_water or self._protocol_paused:
            return
        self._protocol_paused = True
        try:
            self._protocol.pause_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._loop.call_exception_handler(
                {
                    "message": "protocol.pause_writing() failed",
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self._buffer_size <= self._low_water:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._loop.call_exception_handler(
                    {
                        "message": "protocol.resume_writing() failed",
                        "exception": exc,
                        "transport": self,
                        "protocol": self._protocol,
                    }
                )

    def sendto(self, data: Any, addr: Any = None) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        if not data:
            return
        if self._address:
            if addr not in (None, self._address):
                raise ValueError(f"Invalid address: must be None or {self._address}")
            addr = self._address
        if self._conn_lost or self._sock is None:
            if self._conn_lost >= _LOG_THRESHOLD:
                logger.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return
        if not self._buffer:
            try:
                if self._extra["peername"]:
                    self._sock.send(data)
                else:
                    self._sock.sendto(data, addr)
                return
            except (BlockingIOError, InterruptedError):
                self._arm_write()
            except OSError as exc:
                self._protocol.error_received(_datagram_error(exc))
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on datagram transport")
                return
        self._buffer.append((bytes(data), addr))  # ours: the caller may reuse its buffer
        self._buffer_size += len(data)
        self._maybe_pause_protocol()

    def _arm_write(self) -> None:
        if self._write_op is None and self._sock is not None:
            self._write_op = self._port.poll(self._sock, POLLOUT, self._on_writable)

    def _on_writable(self, c: Any) -> None:
        if c.operation is not self._write_op:
            return
        self._write_op = None
        if c.cancelled:
            return
        self._sendto_ready()  # an error shows in the send itself
        _end_run(self._loop)

    def _sendto_ready(self) -> None:
        sock = self._sock
        if sock is None:
            return
        buffer = self._buffer
        connected = bool(self._extra["peername"])
        while buffer:
            data, addr = buffer.popleft()
            self._buffer_size -= len(data)
            try:
                if connected:
                    sock.send(data)
                else:
                    sock.sendto(data, addr)
            except (BlockingIOError, InterruptedError):
                buffer.appendleft((data, addr))  # try again when writable
                self._buffer_size += len(data)
                break
            except OSError as exc:
                # That datagram is dropped (as a lost one would be); the
                # rest goes on, so a pending close() still finishes.
                self._call(self._protocol.error_received, _datagram_error(exc))
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                self._fatal_error(exc, "Fatal write error on datagram transport")
                return
        self._maybe_resume_protocol()  # may queue more
        if self._buffer:
            self._arm_write()
        elif self._closing:
            self._call_connection_lost(None)

    # ---- closing ---------------------------------------------------------

    def _cancel(self, name: str) -> None:
        op = getattr(self, name)
        if op is not None:
            setattr(self, name, None)
            try:
                op.cancel()
            except Exception:
                pass

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._cancel("_read_op")
        if not self._buffer:  # else the flush ends with connection_lost
            self._conn_lost += 1
            self._loop.call_soon(self._call_connection_lost, None)

    def abort(self) -> None:
        self._force_close(None)

    def _fatal_error(self, exc: BaseException, message: str = "Fatal error on transport") -> None:
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler(
                {
                    "message": message,
                    "exception": exc,
                    "transport": self,
                    "protocol": self._protocol,
                }
            )
        self._force_close(exc)

    def _force_close(self, exc: BaseException | None) -> None:
        if self._conn_lost:
            return
        if self._buffer:
            self._buffer.clear()
            self._buffer_size = 0
        self._cancel("_write_op")
        if not self._closing:
            self._closing = True
            self._cancel("_read_op")
        self._conn_lost += 1
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        sock = self._sock
        if sock is None:
            return
        if not self._conn_lost:
            self._conn_lost = 1
        try:
            self._cancel("_read_op")
            self._cancel("_write_op")
            px = self._loop._proactor
            if px is not None:
                px._unregister(sock)  # its ops end while the fd is still ours
            self._protocol.connection_lost(exc)
        finally:
            self._sock = None
            self._protocol = None
            sock.close()


def _set_result_unless_cancelled(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.cancelled():
        fut.set_result(result)


# ---- sock_recvfrom / sock_recvfrom_into / sock_sendto ------------------------


def ready_call(loop: Any, sock: socket.socket, write: bool, attempt: Callable[[], Any]) -> Any:
    """A future for ``attempt()``, a non-blocking socket call: tried now,
    then each time a one-shot poll op says the socket is ready, until it
    does not raise BlockingIOError.  Cancelling the future cancels the op."""
    fut = loop.create_future()
    try:
        fut.set_result(attempt())
        return fut
    except (BlockingIOError, InterruptedError):
        pass
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        fut.set_exception(exc)
        return fut
    port = loop._proactor._register(sock)
    events_ = POLLOUT if write else POLLIN
    op: Any = None

    def on_ready(c: Any) -> None:
        nonlocal op
        if c.operation is not op:
            return
        op = None
        if fut.done():
            return
        if c.cancelled:
            fut.cancel()
        else:
            try:
                fut.set_result(attempt())
            except (BlockingIOError, InterruptedError):
                op = port.poll(sock, events_, on_ready)  # a spurious wake: wait again
                return
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                fut.set_exception(exc)
        _end_run(loop)

    def on_done(f: Any) -> None:
        nonlocal op
        if op is not None:
            o, op = op, None
            try:
                o.cancel()
            except Exception:
                pass

    op = port.poll(sock, events_, on_ready)
    fut.add_done_callback(on_done)
    return fut
