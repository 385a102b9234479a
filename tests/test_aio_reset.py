"""iocp.aio when peers reset: every socket is released, nothing is logged.

Issue 9 item 2: the stdlib proactor transports shut a socket down before
closing it, and on Linux shutdown() raises ENOTCONN once the peer has reset
(and always on an unconnected datagram socket), which skipped the close
and the server's detach -- one leaked fd and one logged traceback per
reset connection, and ``Server.wait_closed()`` never returning.

Each scenario runs on an iocp loop on every backend, counts the process's
open fds against a baseline taken before it, records every call of the
loop's exception handler, and closes its server within a bound.  Clients
are plain blocking sockets in a thread (every call has a timeout) that end
with SO_LINGER 0, i.e. an RST.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import select
import socket
import ssl
import struct
import sys
import tempfile
import time
from typing import Any, Callable

import pytest

import iocp.aio

pytestmark = pytest.mark.skipif(
    # Under Wine a Windows Python sees Wine's own /proc/self/fd as Z:\\proc,
    # which counts the emulator's descriptors, not the process's sockets.
    sys.platform == "win32" or not os.path.isdir("/proc/self/fd"),
    reason="counts open fds in /proc/self/fd (Linux)",
)

TIMEOUT = 60.0
SETTLE = 10.0  # seconds the fd count may take to come back to its baseline
IO_TIMEOUT = 10.0  # every client socket call
CLIENTS = 300
BATCH = 50


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def fds_settle(baseline: int) -> int:
    """Turns the loop until the fd count is back to ``baseline`` (bounded);
    returns the last count."""
    deadline = time.monotonic() + SETTLE
    n = open_fds()
    while n > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        n = open_fds()
    return n


class Recorder:
    """An exception handler that records every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self.calls.append(context)

    def summary(self) -> list[str]:
        return [f"{c.get('message')}: {c.get('exception')!r}" for c in self.calls]


def released(loop: Any, baseline: int, after: int) -> None:
    """No exception handler call, and the fd count back to its baseline
    (or below: the first test may also see a lazily opened fd go)."""
    calls = loop.recorder.calls
    assert len(calls) == 0 and after <= baseline, (
        f"{len(calls)} exception handler calls, fds {baseline} -> {after}",
        loop.recorder.summary()[:2],
    )


@pytest.fixture
def rloop(backend: str):
    """An iocp loop on the current backend with a recording exception
    handler and a thread for the blocking clients; closed at teardown and
    leak-checked (port stats)."""
    loop = iocp.aio.EventLoop(backend=backend)
    rec = Recorder()
    loop.set_exception_handler(rec)
    loop.recorder = rec  # type: ignore[attr-defined]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    loop.pool = pool  # type: ignore[attr-defined]
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    pool.shutdown(wait=True)
    if not loop.is_closed():
        loop.close()
    stats = loop.port.stats()
    for k in ("live_ops", "inflight", "pinned_buffers", "live_buffers"):
        assert stats[k] == 0, stats


def run(loop: asyncio.AbstractEventLoop, coro: Any, timeout: float = TIMEOUT) -> Any:
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


def in_thread(loop: Any, fn: Callable[..., Any], *args: Any) -> Any:
    return loop.run_in_executor(loop.pool, fn, *args)


def reset(sock: socket.socket) -> None:
    """Closes with an RST (TCP) -- or just closes (AF_UNIX)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def reset_clients(
    address: Any, family: int, n: int, request: bytes, read_first: int
) -> int:
    """``n`` clients in batches of BATCH: connect, send ``request``, read
    ``read_first`` bytes (0: none), reset.  Returns how many connected."""
    done = 0
    while done < n:
        batch: list[socket.socket] = []
        try:
            for _ in range(min(BATCH, n - done)):
                s = socket.socket(family, socket.SOCK_STREAM)
                batch.append(s)
                s.settimeout(IO_TIMEOUT)
                s.connect(address)
                s.sendall(request)
            if read_first:
                for s in batch:
                    got = 0
                    while got < read_first:
                        chunk = s.recv(read_first - got)
                        if not chunk:
                            break
                        got += len(chunk)
        finally:
            for s in batch:
                reset(s)
        done += len(batch)
    return done


class Writer(asyncio.Protocol):
    """On any data, writes ``reply`` (a lot, for the reset-while-writing
    cases) and keeps the connection open."""

    made = 0
    lost = 0

    def __init__(self, reply: bytes, close: bool = False) -> None:
        self.reply = reply
        self.close = close

    def connection_made(self, transport: Any) -> None:
        type(self).made += 1
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.reply:
            self.transport.write(self.reply)
        if self.close:  # with the write still pending: the peer resets during the close
            self.transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        type(self).lost += 1


def _server_address(family: str, tmp: str) -> tuple[int, Any]:
    if family == "unix":
        return socket.AF_UNIX, os.path.join(tmp, "s.sock")
    return socket.AF_INET, ("127.0.0.1", 0)


# ------------------------------------------------------------------ streams


@pytest.mark.parametrize("family", ["tcp", "unix"])
@pytest.mark.parametrize(
    "reply, close",
    [(0, False), (64, False), (4 << 20, False), (4 << 20, True)],
    ids=["silent", "small", "writing", "closing"],
)
def test_protocol_server_releases_reset_connections(
    rloop: Any, family: str, reply: int, close: bool
) -> None:
    """Hundreds of clients reset: idle, after a small reply, while the
    server is still writing 4 MB to them, or once the server has called
    close() with those 4 MB still being written."""
    if family == "unix" and not hasattr(socket, "AF_UNIX"):
        pytest.skip("no AF_UNIX")
    data = b"r" * reply

    class P(Writer):
        made = 0
        lost = 0

    async def main() -> tuple[int, int, int]:
        with tempfile.TemporaryDirectory() as tmp:
            fam, addr = _server_address(family, tmp)
            baseline = open_fds()

            def factory() -> P:
                return P(data, close)

            if fam == socket.AF_UNIX:
                server = await rloop.create_unix_server(factory, addr, backlog=CLIENTS)
            else:
                server = await rloop.create_server(factory, *addr, backlog=CLIENTS)
                addr = server.sockets[0].getsockname()
            read_first = min(reply, 1024)
            n = await in_thread(rloop, reset_clients, addr, fam, CLIENTS, b"hello", read_first)
            deadline = time.monotonic() + SETTLE
            while P.lost < n and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            server.close()
            await asyncio.wait_for(server.wait_closed(), 10)
            return baseline, await fds_settle(baseline), n

    baseline, after, n = run(rloop, main())
    assert n == CLIENTS
    assert P.made == P.lost == CLIENTS
    released(rloop, baseline, after)


async def _streams_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads a request, then writes and drains until the peer resets."""
    try:
        await reader.read(100)
        chunk = b"s" * 65536
        for _ in range(200):  # 13 MB at most: the peer resets long before
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def test_streams_server_reset_during_drain(rloop: Any) -> None:
    """asyncio streams: the peer resets while the handler is in drain()."""

    async def main() -> tuple[int, int, int]:
        baseline = open_fds()
        server = await asyncio.start_server(_streams_handler, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        n = await in_thread(rloop, reset_clients, addr, socket.AF_INET, CLIENTS, b"go", 4096)
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
        return baseline, await fds_settle(baseline), n

    baseline, after, n = run(rloop, main())
    assert n == CLIENTS
    released(rloop, baseline, after)


def test_client_transport_released_after_peer_reset(rloop: Any) -> None:
    """The client side: create_connection to a server that resets."""

    async def main() -> tuple[int, int]:
        lsock = socket.socket()
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(BATCH)
        addr = lsock.getsockname()
        baseline = open_fds()

        def resetter(n: int) -> None:
            lsock.settimeout(IO_TIMEOUT)
            for _ in range(n):
                conn, _ = lsock.accept()
                conn.settimeout(IO_TIMEOUT)
                conn.recv(10)
                reset(conn)

        lost: list[asyncio.Future[Any]] = []

        class C(asyncio.Protocol):
            def connection_made(self, t: Any) -> None:
                self.done = rloop.create_future()
                lost.append(self.done)
                t.write(b"x")

            def connection_lost(self, exc: BaseException | None) -> None:
                self.done.set_result(exc)

        job = in_thread(rloop, resetter, 100)
        for _ in range(100):
            await rloop.create_connection(C, *addr)
        await job
        await asyncio.wait_for(asyncio.gather(*lost), 10)
        after = await fds_settle(baseline)
        lsock.close()
        return baseline, after

    baseline, after = run(rloop, main())
    released(rloop, baseline, after)


def test_tls_server_releases_reset_connections(rloop: Any) -> None:
    """A TLS server (sslproto over the transport): clients reset before,
    during (a partial ClientHello) and after the handshake."""
    from tests.test_aio import _self_signed

    with tempfile.TemporaryDirectory() as d:
        cert, key = _self_signed(d)
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert, key)
        client_ctx = ssl.create_default_context(cafile=cert)

    def clients(addr: Any, n: int) -> int:
        for i in range(n):
            s = socket.create_connection(addr, timeout=IO_TIMEOUT)
            try:
                if i % 3 == 1:
                    s.sendall(b"\x16\x03\x01\x02\x00\x01")  # a ClientHello cut short
                elif i % 3 == 2:
                    s = client_ctx.wrap_socket(s, server_hostname="localhost")
                    s.sendall(b"hello")
                    assert s.recv(5) == b"hello"
            finally:
                reset(s)
        return n

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1024):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def main() -> tuple[int, int, int]:
        baseline = open_fds()
        server = await asyncio.start_server(
            echo, "127.0.0.1", 0, ssl=server_ctx, ssl_handshake_timeout=10
        )
        addr = server.sockets[0].getsockname()
        n = await in_thread(rloop, clients, addr, 90)
        server.close()
        await asyncio.wait_for(server.wait_closed(), 20)
        return baseline, await fds_settle(baseline), n

    baseline, after, n = run(rloop, main())
    assert n == 90
    released(rloop, baseline, after)


def test_sendfile_to_a_peer_that_resets(rloop: Any) -> None:
    """loop.sendfile() (native: os.sendfile on the port's poll op) of a large
    file to clients that read a little and reset."""

    results: list[BaseException | int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(10)
            with open(path, "rb") as f:
                results.append(await rloop.sendfile(writer.transport, f))
        except (ConnectionError, OSError) as exc:
            results.append(exc)
        finally:
            writer.close()

    async def main() -> tuple[int, int, int]:
        server = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=CLIENTS)
        addr = server.sockets[0].getsockname()
        baseline = open_fds()
        n = await in_thread(rloop, reset_clients, addr, socket.AF_INET, 60, b"go", 4096)
        deadline = time.monotonic() + SETTLE
        while len(results) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        after = await fds_settle(baseline)
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)
        return baseline, after, n

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "big")
        with open(path, "wb") as f:
            f.write(b"f" * (8 << 20))
        baseline, after, n = run(rloop, main())
    assert len(results) == n == 60
    assert all(isinstance(r, (ConnectionError, OSError)) for r in results), results[:3]
    released(rloop, baseline, after)


# ------------------------------------------------------------------ datagrams


def _start_readiness(loop: Any) -> None:
    """Starts the loop's readiness helper (datagrams use it) before the
    baseline is taken: it holds fds of its own for the loop's lifetime."""
    a, b = socket.socketpair()
    loop.add_reader(a, lambda: None)
    loop.remove_reader(a)
    a.close()
    b.close()


def _closed_udp_port() -> tuple[str, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    addr = s.getsockname()
    s.close()
    return addr


class Datagrams(asyncio.DatagramProtocol):
    def __init__(self, loop: Any) -> None:
        self.errors: list[BaseException] = []
        self.received: list[bytes] = []
        self.lost = loop.create_future()
        self.error = loop.create_future()
        self.got = loop.create_future()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)
        if not self.got.done():
            self.got.set_result(data)

    def error_received(self, exc: BaseException) -> None:
        self.errors.append(exc)
        if not self.error.done():
            self.error.set_result(exc)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost.set_result(exc)


def test_datagram_endpoints_release_their_socket(rloop: Any) -> None:
    """Unconnected endpoints (shutdown() is ENOTCONN on them), closed idle,
    after traffic, and right after a sendto() still in flight."""

    async def main() -> tuple[int, int]:
        _start_readiness(rloop)
        baseline = open_fds()
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        for i in range(60):
            t, p = await rloop.create_datagram_endpoint(
                lambda: Datagrams(rloop), local_addr=("127.0.0.1", 0)
            )
            if i % 3 == 1:  # a round trip first
                peer.sendto(b"ping", t.get_extra_info("sockname"))
                await asyncio.wait_for(p.got, 10)
            if i % 3 == 2:  # several sends queued, then close at once
                for _ in range(5):
                    t.sendto(b"bye", peer.getsockname())
            t.close()
            await asyncio.wait_for(p.lost, 10)
        peer.close()
        return baseline, await fds_settle(baseline)

    baseline, after = run(rloop, main())
    released(rloop, baseline, after)


def _wait_pollerr(fd: int) -> None:
    """Blocks (bounded) until a socket has an error queued (an ICMP port
    unreachable on a connected UDP socket)."""
    p = select.poll()
    p.register(fd, select.POLLERR)
    assert p.poll(int(IO_TIMEOUT * 1000)), "no ICMP error arrived"


def test_connected_datagram_peer_refuses(rloop: Any) -> None:
    """A connected UDP endpoint whose peer port is closed: the ICMP error
    reaches error_received as ConnectionRefusedError, on the read side and
    on the write side; reading goes on after it; close releases the fd even
    with sends queued behind a failed one."""

    async def main() -> tuple[int, int]:
        _start_readiness(rloop)
        baseline = open_fds()
        for _ in range(20):
            dead = _closed_udp_port()
            t, p = await rloop.create_datagram_endpoint(
                lambda: Datagrams(rloop), remote_addr=dead
            )
            t.sendto(b"anyone?")
            err = await asyncio.wait_for(p.error, 10)  # the read side reports it
            assert isinstance(err, ConnectionRefusedError), err
            # Reading goes on after the error: a peer on that port now answers.
            peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                peer.bind(dead)
            except OSError as exc:  # taken meanwhile by someone else
                peer.close()
                assert exc.errno == errno.EADDRINUSE
                t.close()
                await asyncio.wait_for(p.lost, 10)
                continue
            peer.sendto(b"here", t.get_extra_info("sockname"))
            assert await asyncio.wait_for(p.got, 10) == b"here"
            peer.close()
            # The write side: an error queued before sendto(); the sends
            # queued behind the failing one, then close() at once.
            t.sendto(b"gone?")
            _wait_pollerr(t.get_extra_info("socket").fileno())
            for _ in range(4):
                t.sendto(b"x")
            t.close()
            await asyncio.wait_for(p.lost, 10)
        return baseline, await fds_settle(baseline)

    baseline, after = run(rloop, main())
    released(rloop, baseline, after)


# ------------------------------------------------------------------ HTTP servers

HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def http_reset_clients(port: int, n: int) -> int:
    """Keep-alive HTTP clients that reset: a third before any answer, a
    third after the status line, a third after two requests."""
    addr = ("127.0.0.1", port)
    done = 0
    while done < n:
        batch = []
        try:
            for _ in range(min(BATCH, n - done)):
                s = socket.socket()
                batch.append(s)
                s.settimeout(IO_TIMEOUT)
                s.connect(addr)
                s.sendall(HTTP_REQUEST)
            for i, s in enumerate(batch):
                if i % 3 == 0:
                    continue
                assert s.recv(12).startswith(b"HTTP/1.1"), "no HTTP answer"
                if i % 3 == 2:
                    s.sendall(HTTP_REQUEST)
                    s.recv(4096)
        finally:
            for s in batch:
                reset(s)
        done += len(batch)
    return done


def _http_check(rloop: Any, serve: Callable[[], Any]) -> None:
    """Starts a server with ``await serve()`` -> (port, async stop())."""

    async def main() -> tuple[int, int, int]:
        baseline = open_fds()
        port, stop = await serve()
        n = 0
        for _ in range(3):  # like three load runs
            n += await in_thread(rloop, http_reset_clients, port, CLIENTS // 3)
        await asyncio.wait_for(stop(), 20)
        return baseline, await fds_settle(baseline), n

    baseline, after, n = run(rloop, main())
    assert n == CLIENTS // 3 * 3
    released(rloop, baseline, after)


def test_uvicorn_on_iocp_aio(rloop: Any) -> None:
    uvicorn = pytest.importorskip("uvicorn")

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"hello"})

    async def serve() -> Any:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, loop="none", lifespan="off", log_level="critical",
                                access_log=False)
        server = uvicorn.Server(config)
        server.install_signal_handlers = lambda: None  # older uvicorn
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.01)
        assert server.started

        async def stop() -> None:
            server.should_exit = True
            await task
            sock.close()

        return sock.getsockname()[1], stop

    _http_check(rloop, serve)


def test_aiohttp_on_iocp_aio(rloop: Any) -> None:
    pytest.importorskip("aiohttp")
    from aiohttp import web

    async def hello(request: Any) -> Any:
        return web.Response(text="hello")

    async def serve() -> Any:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner.addresses[0][1], runner.cleanup

    _http_check(rloop, serve)


def test_reset_fixture_counts_fds() -> None:
    """The fd counter sees a socket come and go (so the tests above can
    fail)."""
    before = open_fds()
    s = socket.socket()
    assert open_fds() == before + 1
    s.close()
    assert open_fds() == before
