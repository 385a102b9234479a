"""I/O completion ports for Python.

The Windows IOCP model -- a port, sockets associated with it, overlapped
operations that each complete exactly once, worker loops that take
completions off the port's queue -- on Windows IOCP, Linux io_uring, or an
epoll emulation, with one API and one semantics.

    import iocp
    with iocp.CompletionPort() as port:
        port.register(sock)
        port.recv(sock, 4096, on_data)
        port.run()

Three ways in: the port itself (CompletionPort, Operation, Completion, and
Stream, the connection core that drives a connected socket's protocol), a
callback server and client in the spirit of asyncio.Protocol (Server,
Client, connect), and an asyncio event loop on the port (``iocp.aio``,
imported on demand so plain users do not pay for asyncio).
"""

from iocp._core import (
    POLLERR,
    POLLHUP,
    POLLIN,
    POLLOUT,
    Completion,
    CompletionPort,
    Operation,
    Stream,
    backends,
)
from iocp.server import Client, Connection, Protocol, Server, WriteBufferFull, connect

__all__ = [
    "POLLERR",
    "POLLHUP",
    "POLLIN",
    "POLLOUT",
    "Client",
    "Completion",
    "CompletionPort",
    "Connection",
    "Operation",
    "Protocol",
    "Server",
    "Stream",
    "WriteBufferFull",
    "__version__",
    "backends",
    "connect",
]
__version__ = "0.1.0"
