"""iocp.aio's stream transport (TCP, Unix) on the connection core.

``TCPTransport`` is an ``asyncio.Transport`` holding an ``iocp._core.Stream``
(src/stream.pxi): the stream owns the socket's one multishot recv and its
write queue, and calls the protocol straight from the port's dispatch.
The hot methods -- ``write``, ``writelines``, ``get_write_buffer_size``,
``is_closing`` -- are C functions of the core bound as methods of the
class, so ``transport.write(data)`` is a call into C with no Python frame
and an idle transport keeps no bound method; the rest forward to the
stream.  Neither keeps an extra-info dict per connection: the addresses
are the stream's, read once, and asyncio's socket wrapper is made when
first asked for.

What stays in Python is what asyncio's transports do around the core:
``connection_made`` (and the waiter, and the start of reading) scheduled
with ``call_soon`` in that order, ``connection_lost`` deferred through
``call_soon`` (the stream's ``on_lost`` hook) and followed by the server's
detach; the loop's exception handler for a failing protocol (the stream's
``on_error`` hook); ``set_protocol`` (``start_tls`` switches the transport
to an ``SSLProtocol``, a BufferedProtocol, and the stream follows);
``_force_close`` for sslproto.

It subclasses asyncio's private ``transports._FlowControlMixin`` only so
``loop.sendfile()``'s fallback, which requires one, accepts it; the
mixin's own flow control is replaced by the stream's (every method it
defines is shadowed here).
"""

from __future__ import annotations

import socket
import sys
import warnings
from typing import Any

from iocp._core import (
    Stream,
    stream_transport_get_write_buffer_size,
    stream_transport_is_closing,
    stream_transport_write,
    stream_transport_writelines,
)

from . import _compat

_FlowControlMixin: Any = _compat.FlowControlMixin
_SENDFILE_TRY_NATIVE: Any = _compat.SENDFILE_TRY_NATIVE
_set_result_unless_cancelled: Any = _compat.set_result_unless_cancelled
_SSLProtocol: Any = _compat.SSLProtocol

# Server._attach()/_detach() take the transport from 3.13 on.
_ATTACH_TAKES_TRANSPORT = sys.version_info >= (3, 13)

_STREAM_FAMILIES = tuple(
    getattr(socket, name) for name in ("AF_INET", "AF_INET6", "AF_UNIX") if hasattr(socket, name)
)


def is_stream_socket(sock: socket.socket) -> bool:
    """True for the sockets TCPTransport takes: connected SOCK_STREAM
    sockets of the inet and Unix families."""
    return sock.type == socket.SOCK_STREAM and sock.family in _STREAM_FAMILIES


class TCPTransport(_FlowControlMixin):  # type: ignore[misc]
    """An asyncio stream transport (TCP or Unix) whose I/O is an
    ``iocp._core.Stream``.  Made by the loop (``_make_socket_transport``)."""

    __slots__ = (
        "_stream",
        "_sock",
        "_protocol",
        "_server",
        "_tsock",
        "__dict__",  # as asyncio's transports, which have one
        "__weakref__",
    )

    _start_tls_compatible = True
    # loop.sendfile() tries the loop's native sendfile (which says "not
    # available" at once: then the fallback, or that error with
    # fallback=False, as asyncio's tests expect).
    _sendfile_compatible = _SENDFILE_TRY_NATIVE

    def __init__(
        self,
        loop: Any,
        sock: socket.socket,
        protocol: Any,
        waiter: Any = None,
        extra: dict[str, Any] | None = None,
        server: Any = None,
    ) -> None:
        # No extra-info dict of our own (an idle connection would keep it):
        # the creator's, if any, and the stream's addresses (get_extra_info).
        self._extra = extra
        self._tsock: Any = None  # asyncio's "socket" wrapper, made when asked
        self._loop = loop
        self._high_water = self._low_water = 0  # the mixin's, unused
        # The loop's proactor may have registered the socket (sock_connect);
        # the stream registers it itself and unregisters it at the end.
        proactor = loop._proactor
        if proactor is not None:
            proactor._unregister(sock)
        port = loop.port
        # select() runs the port with run(): make it return once a stream
        # has called its protocol, which may have scheduled callbacks.
        port.return_on_stream_events = True
        # The hooks are this class's functions, called with the transport
        # (the stream's owner) first: no bound method per connection.
        cls = TCPTransport
        stream = Stream(
            port,
            sock,
            protocol,
            on_lost=cls._defer_lost,
            on_error=cls._protocol_failed,
            owner=self,
        )
        self._stream = stream
        self._sock: socket.socket | None = sock
        self._protocol = protocol
        self._server = server
        if server is not None:
            if _ATTACH_TAKES_TRANSPORT:
                server._attach(self)
            else:
                server._attach()
        loop.call_soon(protocol.connection_made, self)
        if waiter is not None:
            # Only once connection_made() has run, as asyncio does.
            loop.call_soon(_set_result_unless_cancelled, waiter, None)
        loop.call_soon(self._start)

    # ---- the stream's methods --------------------------------------------
    # The hot ones are C functions (see the module doc); the rest forward.

    write = stream_transport_write
    writelines = stream_transport_writelines
    is_closing = stream_transport_is_closing
    get_write_buffer_size = stream_transport_get_write_buffer_size

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """What the creator passed in ``extra``, else "socket" (asyncio's
        TransportSocket wrapper), "sockname" and "peername" (the stream's,
        read when the connection began)."""
        extra = self._extra
        if extra is not None and name in extra:
            return extra[name]
        if name == "socket":
            tsock = self._tsock
            if tsock is None:
                tsock = self._tsock = _compat.TransportSocket(self._stream.socket)
            return tsock
        return self._stream.get_extra_info(name, default)

    def write_eof(self) -> None:
        self._stream.write_eof()

    def can_write_eof(self) -> bool:
        return True

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._stream.get_write_buffer_limits()  # type: ignore[no-any-return]

    def is_reading(self) -> bool:
        return self._stream.is_reading()  # type: ignore[no-any-return]

    def pause_reading(self) -> None:
        self._stream.pause_reading()

    def resume_reading(self) -> None:
        self._stream.resume_reading()

    def close(self) -> None:
        self._stream.close()

    def abort(self) -> None:
        self._stream.abort()

    def __repr__(self) -> str:
        sock = self._sock
        info = [type(self).__name__]
        if sock is None:
            info.append("closed")
        else:
            if self._stream.is_closing():
                info.append("closing")
            info.append(f"fd={sock.fileno()}")
            size = self._stream.get_write_buffer_size()
            if size:
                info.append(f"write_bufsize={size}")
        return "<{}>".format(" ".join(info))

    # ---- life cycle -----------------------------------------------------

    def _start(self) -> None:
        """Arms the stream's read, after connection_made()."""
        stream = self._stream
        if not stream.is_closing():
            try:
                stream.start()
            except (OSError, ValueError) as exc:  # the port is closing
                stream.abort(exc if isinstance(exc, OSError) else None)

    def _defer_lost(self, fn: Any, exc: BaseException | None) -> None:
        """The stream's on_lost: connection_lost from the loop, as asyncio
        schedules it."""
        self._loop.call_soon(self._call_connection_lost, fn, exc)

    def _call_connection_lost(self, fn: Any, exc: BaseException | None) -> None:
        # The protocol of now, not the stream's at the loss: between the two
        # set_protocol() may have swapped it back (loop.sendfile()'s fallback
        # restores the user's protocol as it fails on a lost connection).
        protocol = self._protocol
        if protocol is not None:
            fn = getattr(protocol, "connection_lost", None)
        try:
            if fn is not None:
                fn(exc)
        finally:
            self._sock = None  # the stream closed it
            server, self._server = self._server, None
            if server is not None:
                if _ATTACH_TAKES_TRANSPORT:
                    server._detach(self)
                else:
                    server._detach()

    def _protocol_failed(self, exc: BaseException) -> None:
        """The stream's on_error: a protocol callback raised (the stream
        then aborts with that exception, as asyncio's _fatal_error)."""
        self._loop.call_exception_handler(
            {
                "message": "Fatal error: protocol callback failed",
                "exception": exc,
                "transport": self,
                "protocol": self._protocol,
            }
        )

    def _force_close(self, exc: BaseException | None) -> None:
        """What sslproto calls on a fatal error."""
        self._stream.abort(exc)

    def __del__(self, _warn: Any = warnings.warn) -> None:
        stream = getattr(self, "_stream", None)
        if stream is not None and not stream.is_closing():
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            stream.abort()

    # ---- protocol and flow control --------------------------------------

    def _make_empty_waiter(self) -> Any:
        """The proactor loop's native sendfile (os.sendfile on the socket)
        waits on this for every byte written so far to be sent -- silent
        sends included, which a fence confirms -- lest the file overtake
        them.  Until _reset_empty_waiter(), write() refuses data, as
        asyncio's transports do while a sendfile runs."""
        fut = self._loop.create_future()

        def drained() -> None:
            # Also when the connection is lost first, as asyncio's
            # transports resolve it: the sendfile then fails on the socket.
            if not fut.done():
                fut.set_result(None)

        self.__dict__["write"] = self.__dict__["writelines"] = self._write_during_sendfile
        if self._stream.when_drained(drained):
            drained()
        return fut

    def _write_during_sendfile(self, data: Any) -> None:
        raise RuntimeError("unable to write; sendfile is in progress")

    def _reset_empty_waiter(self) -> None:
        self.__dict__.pop("write", None)
        self.__dict__.pop("writelines", None)

    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol
        if self._sock is not None:
            # start_tls() swaps in an SSLProtocol, maybe right after a large
            # write: it was never paused and asserts if told to resume.
            self._stream.set_protocol(protocol, unpause=isinstance(protocol, _SSLProtocol))

    def get_protocol(self) -> Any:
        return self._protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._stream.set_write_buffer_limits(high, low)

    @property  # type: ignore[misc]
    def _protocol_paused(self) -> bool:  # read by loop.sendfile()'s fallback
        return self._stream.writing_paused

    @property
    def stream(self) -> Stream:
        """The connection core under this transport."""
        return self._stream
