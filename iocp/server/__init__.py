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
    With one thread dispatching the endpoint's own port (``start(threads=0)``
    or ``start(threads=1)``, the default; a client on its own port)
    connections run on the stream core (``iocp._core.Stream``): callbacks
    come straight from the port's dispatch, writes queue in C, no lock is
    taken, and a call from another thread is posted to the port.  The
    multi-thread mode below is used with ``threads=N`` and on shared ports.

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

Layout (one job per module)
    ``_loop`` (the port, its threads and timers), ``connection`` (Connection,
    Protocol, WriteBufferFull), ``_endpoint`` (what Server and Client share),
    ``_server`` (the server life cycle), ``_workers`` (pre-fork workers) and
    ``client`` (Client, connect).  Import the public names from here.
"""

from __future__ import annotations

from iocp.server._server import Server
from iocp.server._util import DEFAULT_PORT as DEFAULT_PORT
from iocp.server.client import Client, connect
from iocp.server.connection import Connection, Protocol, WriteBufferFull

__all__ = [  # as in the single module: DEFAULT_PORT stays importable, not starred
    "Client",
    "Connection",
    "Protocol",
    "Server",
    "WriteBufferFull",
    "connect",
]
