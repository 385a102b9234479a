"""Echo servers under test, one per process.

    python -m iocp.bench.servers NAME --port N [--host H] [--backend B]

Every server echoes each byte it receives on the same connection, sets
TCP_NODELAY on accepted sockets (asyncio and uvloop do that themselves),
listens with the same backlog, and stops on SIGTERM or SIGINT.  The
listening socket is made here, the same way for all of them.
"""

from __future__ import annotations

import argparse
import importlib.util
import signal
import socket
import sys
import threading
from typing import Callable, Dict, List, Tuple

from iocp._argtypes import port_number

BACKLOG = 4096
RECV_SIZE = 65536


# --------------------------------------------------------------------- helpers


def raise_nofile_limit(wanted: int = 1 << 20) -> Tuple[int, int]:
    """Raises RLIMIT_NOFILE's soft limit as far as allowed; returns (soft, hard)."""
    try:
        import resource
    except ImportError:  # Windows
        return (-1, -1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def listen_socket(host: str, port: int, proto: int = 0) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(BACKLOG)
    return sock


def _nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass


class _Stop(Exception):
    """Raised by the SIGTERM handler to unwind a blocking server."""


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop()


# --------------------------------------------------------------------- iocp


def serve_iocp_port(lsock: socket.socket, backend: str | None) -> None:
    """Echo on the port's fast-path primitives: a single-issuer port, one
    multishot recv per connection, silent sends (a completion only on
    failure), a multishot accept, and one ``run_once()`` per loop turn."""
    import iocp

    port = iocp.CompletionPort(backend=backend, single_issuer=True)
    port.register(lsock)
    stopping = False
    send, recv = port.send, port.recv

    def serve(conn: socket.socket) -> None:
        closed = False

        def close(c: object = None) -> None:
            # Also the callback of a send that failed or was cancelled.
            nonlocal closed
            if closed:
                return
            closed = True
            try:
                port.unregister(conn)
            except Exception:
                pass
            conn.close()

        def on_data(c: iocp.Completion) -> None:
            data = c.data
            if stopping:
                # close() on SIGTERM drains: an arrival then starts nothing.
                close()
                return
            if data:
                try:
                    send(conn, data, close, silent=True)
                except (OSError, ValueError):
                    close()
                    return
                if c.more:
                    return
            if c.error is not None or not data or closed:
                close()       # EOF, reset, cancel
            else:
                # The backend ended the multishot with data (e.g. its
                # buffer ring ran dry): arm a new one.
                recv(conn, RECV_SIZE, on_data, multishot=True)

        recv(conn, RECV_SIZE, on_data, multishot=True)

    def on_accept(c: iocp.Completion) -> None:
        if c.error is None:
            conn = c.data[0]
            if stopping:
                conn.close()
            else:
                _nodelay(conn)
                port.register(conn)
                serve(conn)
        if not c.more and not stopping:
            port.accept(lsock, on_accept, multishot=True)

    def on_signal(signum: int, frame: object) -> None:
        # Once, at the end: stop() makes the current run_once() return.
        nonlocal stopping
        stopping = True
        port.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    port.accept(lsock, on_accept, multishot=True)
    turns = dispatched = 0
    run_once = port.run_once
    try:
        while not stopping:
            dispatched += run_once()
            turns += 1
    finally:
        stopping = True
        if turns:
            print(f"iocp-port: {dispatched} completions in {turns} run_once() turns, "
                  f"{dispatched / turns:.1f} per turn", file=sys.stderr)
        port.close()


def serve_iocp_port_oneshot(lsock: socket.socket, backend: str | None) -> None:
    """The port loop before the fast path (issue 10): one-shot recv -> send
    (with a completion) -> next recv, 16 accepts outstanding, port.run()."""
    import iocp

    port = iocp.CompletionPort(backend=backend)
    port.register(lsock)
    closing = False

    def serve(conn: socket.socket) -> None:
        def close() -> None:
            try:
                port.unregister(conn)
            except Exception:
                pass
            conn.close()

        # close() on SIGTERM drains: a recv or send that completes then
        # must not start another op on the closing port.
        def on_recv(c: iocp.Completion) -> None:
            data = c.data
            if c.error is not None or not data or closing:
                close()
                return
            port.send(conn, data, on_sent)

        def on_sent(c: iocp.Completion) -> None:
            if c.error is not None or closing:
                close()
                return
            port.recv(conn, RECV_SIZE, on_recv)

        port.recv(conn, RECV_SIZE, on_recv)

    def on_accept(c: iocp.Completion) -> None:
        if closing:
            if c.error is None:
                c.data[0].close()
            return
        if c.error is None:
            conn = c.data[0]
            _nodelay(conn)
            port.register(conn)
            serve(conn)
        port.accept(lsock, on_accept)

    def on_signal(signum: int, frame: object) -> None:
        nonlocal closing
        closing = True
        port.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for _ in range(16):
        port.accept(lsock, on_accept)
    try:
        port.run()
    finally:
        closing = True
        port.close()


def _iocp_server_class():  # type: ignore[no-untyped-def]
    import iocp

    cls = getattr(iocp, "Server", None)
    if cls is None:
        try:
            from iocp.server import Server as cls  # type: ignore[no-redef]
        except ImportError:
            return None
    return cls


def serve_iocp_server(lsock: socket.socket, backend: str | None) -> None:
    """The callback server iocp.Server with an echo protocol, one loop thread."""
    Server = _iocp_server_class()

    class Echo:
        def data_received(self, conn, data: bytes) -> None:  # type: ignore[no-untyped-def]
            conn.send(data)

    server = Server(Echo, sock=lsock, backend=backend, backlog=BACKLOG)
    server.serve_forever()  # returns on SIGINT/SIGTERM


def _aio_loop(backend: str | None):  # type: ignore[no-untyped-def]
    import iocp.aio as aio  # type: ignore[import-not-found]

    for name in ("new_event_loop", "EventLoop", "IOCPEventLoop"):
        factory = getattr(aio, name, None)
        if factory is not None:
            try:
                return factory(backend=backend) if backend else factory()
            except TypeError:
                return factory()
    policy = getattr(aio, "EventLoopPolicy", None)
    if policy is not None:
        return policy().new_event_loop()
    raise RuntimeError("iocp.aio has no new_event_loop/EventLoop/EventLoopPolicy")


def serve_iocp_aio(lsock: socket.socket, backend: str | None) -> None:
    _serve_protocol(lsock, _aio_loop(backend))


# --------------------------------------------------------------------- peers


class EchoProtocol:
    """asyncio.Protocol echo (no base class needed beyond duck typing)."""

    transport = None

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: object) -> None:
        self.transport = None

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


def _serve_protocol(lsock: socket.socket, loop) -> None:  # type: ignore[no-untyped-def]
    import asyncio

    asyncio.set_event_loop(loop)

    async def main() -> None:
        server = await loop.create_server(EchoProtocol, sock=lsock, backlog=BACKLOG)
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        await stop
        server.close()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def serve_asyncio_protocol(lsock: socket.socket, backend: str | None) -> None:
    import asyncio

    _serve_protocol(lsock, asyncio.new_event_loop())


def serve_uvloop_protocol(lsock: socket.socket, backend: str | None) -> None:
    import uvloop

    _serve_protocol(lsock, uvloop.new_event_loop())


def serve_rloop_protocol(lsock: socket.socket, backend: str | None) -> None:
    import rloop  # type: ignore[import-not-found]

    _serve_protocol(lsock, rloop.new_event_loop())


def _serve_streams(lsock: socket.socket, loop) -> None:  # type: ignore[no-untyped-def]
    """asyncio.start_server streams echo (read, write, drain until EOF) on
    `loop` until SIGTERM/SIGINT."""
    import asyncio

    writers: set = set()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        try:
            while True:
                data = await reader.read(RECV_SIZE)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writers.discard(writer)
            writer.close()

    asyncio.set_event_loop(loop)

    async def main() -> None:
        server = await asyncio.start_server(echo, sock=lsock, backlog=BACKLOG)
        stop = loop.create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))
        await stop
        server.close()
        # End the handlers still waiting on a read by closing their
        # connections (cancelling them makes 3.11's StreamReaderProtocol log
        # a traceback), and let them return.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for w in list(writers):
            w.transport.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)

    try:
        loop.run_until_complete(main())
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def serve_asyncio_streams(lsock: socket.socket, backend: str | None) -> None:
    import asyncio

    _serve_streams(lsock, asyncio.new_event_loop())


def serve_iocp_aio_streams(lsock: socket.socket, backend: str | None) -> None:
    _serve_streams(lsock, _aio_loop(backend))


def serve_uvloop_streams(lsock: socket.socket, backend: str | None) -> None:
    import uvloop

    _serve_streams(lsock, uvloop.new_event_loop())


def serve_rloop_streams(lsock: socket.socket, backend: str | None) -> None:
    import rloop  # type: ignore[import-not-found]

    _serve_streams(lsock, rloop.new_event_loop())


def serve_threads(lsock: socket.socket, backend: str | None) -> None:
    """Thread per connection, blocking sockets."""

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    data = conn.recv(RECV_SIZE)
                    if not data:
                        return
                    conn.sendall(data)
            except OSError:
                return

    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        while True:
            conn, _ = lsock.accept()
            _nodelay(conn)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
    except _Stop:
        pass


def serve_c(lsock: socket.socket, backend: str | None) -> None:
    """Plain C single-threaded epoll echo (iocp._benchtools.echo_server)."""
    from iocp import _benchtools  # type: ignore[attr-defined]

    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    try:
        _benchtools.echo_server(fd=lsock.fileno())
    except _Stop:
        pass


# --------------------------------------------------------------------- registry


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _iocp_ok() -> str | None:
    try:
        import iocp  # noqa: F401
    except Exception as exc:  # the core may be unbuilt
        return f"iocp does not import ({exc})"
    return None


def _need_fastpath(backend: str | None = None) -> str | None:
    """None when the port has the fast-path primitives iocp-port uses
    (single_issuer, run_once, multishot recv, silent send) on `backend`
    (None: the default one); else why not.  A real round trip on a socket pair, not a
    hasattr: a backend may still refuse a feature (OSError ENOSYS)."""
    err = _iocp_ok()
    if err:
        return err
    import iocp

    if not hasattr(iocp.CompletionPort, "run_once"):
        return "this iocp build has no CompletionPort.run_once (the fast-path API)"
    a, b = socket.socketpair()
    got: List[bytes] = []
    try:
        with iocp.CompletionPort(backend=backend, single_issuer=True) as port:
            port.register(a)
            op = port.recv(a, 1024, lambda c: got.append(c.data or b""), multishot=True)
            port.send(a, b"ping", silent=True)
            b.sendall(b"x")
            for _ in range(20):
                if got:
                    break
                port.run_once(0.1)
            if b.recv(16) != b"ping":
                return "a silent send did not arrive"
            if got != [b"x"]:
                return f"multishot recv delivered {got!r}"
            op.cancel()
            for _ in range(20):
                if op.done:
                    break
                port.run_once(0.1)
    except (TypeError, OSError, ValueError, RuntimeError) as exc:
        return f"the fast-path primitives are not usable here: {exc}"
    finally:
        a.close()
        b.close()
    return None


def _need_iocp_server() -> str | None:
    err = _iocp_ok()
    if err:
        return err
    if _iocp_server_class() is None:
        return "iocp.Server is not available in this iocp build"
    return None


def _need_aio() -> str | None:
    err = _iocp_ok()
    if err:
        return err
    if not _has_module("iocp.aio"):
        return "iocp.aio (the iocp asyncio event loop) does not exist yet"
    return None


def _need_module(mod: str, hint: str) -> Callable[[], str | None]:
    def check() -> str | None:
        return None if _has_module(mod) else f"{mod} not installed ({hint})"

    return check


def _need_benchtools() -> str | None:
    if not sys.platform.startswith("linux"):
        return "the C echo server is Linux-only"
    return None if _has_module("iocp._benchtools") else "iocp._benchtools not built"


# name -> (function, availability check returning None or a reason, description)
SERVERS: Dict[str, Tuple[Callable[[socket.socket, str | None], None],
                         Callable[[], str | None], str]] = {
    "iocp-port": (serve_iocp_port, _need_fastpath,
                  "port loop on the fast path: single-issuer, multishot recv, silent send, "
                  "run_once"),
    "iocp-port-oneshot": (serve_iocp_port_oneshot, _iocp_ok,
                          "port loop before the fast path: recv -> send -> recv, run()"),
    "iocp-server": (serve_iocp_server, _need_iocp_server,
                    "iocp.Server callback server"),
    "iocp-aio": (serve_iocp_aio, _need_aio, "asyncio Protocol on the iocp event loop"),
    "iocp-aio-streams": (serve_iocp_aio_streams, _need_aio,
                         "asyncio streams (start_server, read/write/drain) on the iocp "
                         "event loop"),
    "asyncio-protocol": (serve_asyncio_protocol, lambda: None,
                         "asyncio Protocol, default loop"),
    "asyncio-streams": (serve_asyncio_streams, lambda: None, "asyncio streams, default loop"),
    "uvloop-protocol": (serve_uvloop_protocol,
                        _need_module("uvloop", "pip install 'pyiocp[bench]'"),
                        "asyncio Protocol on uvloop"),
    "rloop-protocol": (serve_rloop_protocol,
                       _need_module("rloop", "pip install 'pyiocp[bench]' (Python 3.10+, "
                                    "Linux/macOS wheels)"),
                       "asyncio Protocol on rloop (Rust event loop)"),
    "uvloop-streams": (serve_uvloop_streams,
                       _need_module("uvloop", "pip install 'pyiocp[bench]'"),
                       "asyncio streams on uvloop"),
    "rloop-streams": (serve_rloop_streams,
                      _need_module("rloop", "pip install 'pyiocp[bench]' (Python 3.10+, "
                                   "Linux/macOS wheels)"),
                      "asyncio streams on rloop"),
    "threads": (serve_threads, lambda: None, "thread per connection, blocking sockets"),
    "c-epoll": (serve_c, _need_benchtools, "plain C epoll echo (ceiling)"),
}

IOCP_SERVERS = ("iocp-port", "iocp-port-oneshot", "iocp-server", "iocp-aio", "iocp-aio-streams")
# The streams servers form their own peer group: each is compared with the
# best non-iocp streams server, the others with the best non-iocp
# Protocol/thread server.
STREAMS_SERVERS = ("iocp-aio-streams", "asyncio-streams", "uvloop-streams", "rloop-streams")
# Run by default only with --full: the "before" server (kept for
# before/after figures) and the streams servers added for issue 11's
# streams target (they would make --quick a third longer).
FULL_ONLY = ("iocp-port-oneshot", "iocp-aio-streams", "uvloop-streams", "rloop-streams")
CEILING = "c-epoll"


def check_server(name: str, backend: str | None = None) -> str | None:
    """None when server `name` can run here (on iocp `backend`), else why not."""
    if name == "iocp-port":
        return _need_fastpath(backend)
    return SERVERS[name][1]()


def available(backend: str | None = None) -> Tuple[List[str], Dict[str, str]]:
    """(servers that can run here, {server: reason} for the others)."""
    ok: List[str] = []
    skipped: Dict[str, str] = {}
    for name in SERVERS:
        reason = check_server(name, backend)
        if reason:
            skipped[name] = reason
        else:
            ok.append(name)
    return ok, skipped


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iocp.bench.servers",
                                     description="Run one benchmark echo server.")
    parser.add_argument("name", choices=sorted(SERVERS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, required=True)
    parser.add_argument("--backend", default=None, choices=["io_uring", "epoll", "iocp"],
                        help="iocp backend for iocp servers")
    args = parser.parse_args(argv)
    func = SERVERS[args.name][0]
    reason = check_server(args.name, args.backend)
    if reason:
        print(f"server {args.name} unavailable: {reason}", file=sys.stderr)
        return 2
    raise_nofile_limit()
    lsock = listen_socket(args.host, args.port)
    try:
        func(lsock, args.backend)
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        lsock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
