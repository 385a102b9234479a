"""iocp.aio's stream transport on the connection core (TCPTransport), on
every backend: flow control, start_tls, SSL flushing, BufferedProtocol,
streams, errors."""

from __future__ import annotations

import asyncio
import socket
import ssl

import pytest

import iocp.aio
from iocp._core import Stream
from iocp.aio._transport import TCPTransport

from .test_aio import _leak_free, run

HAS_UNIX = hasattr(socket, "AF_UNIX")


@pytest.fixture
def aloop(backend: str):
    loop = iocp.aio.EventLoop(backend=backend)
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    if not loop.is_closed():
        loop.close()
    _leak_free(loop)


class Sink(asyncio.Protocol):
    """Reads everything; resolves `done` at EOF or loss."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.transport = None
        self.lost: list = []
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data) -> None:
        self.data += data

    def eof_received(self):
        if not self.done.done():
            self.done.set_result(bytes(self.data))
        return False

    def connection_lost(self, exc) -> None:
        self.lost.append(exc)
        if not self.done.done():
            self.done.set_result(bytes(self.data))


class Echo(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data) -> None:
        self.transport.write(data)


def test_transport_is_the_stream_core(aloop) -> None:
    async def main():
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tr, proto = await loop.create_connection(Sink, "127.0.0.1", port)
        assert isinstance(tr, TCPTransport) and isinstance(tr, asyncio.Transport)
        assert isinstance(tr.stream, Stream)
        # The hot methods are C functions of the core bound as methods of the
        # class: nothing is kept per transport for them.
        for name in ("write", "writelines", "is_closing", "get_write_buffer_size"):
            fn = type(tr).__dict__[name]
            assert type(fn).__name__ == "cython_function_or_method", name
            assert getattr(tr, name).__self__ is tr
        assert not getattr(tr, "__dict__", {})
        # No extra-info dict per transport: the addresses are the stream's
        # (the listener's sockname shared by every connection), asyncio's
        # socket wrapper is made once, when asked for.
        assert tr._extra is None
        assert tr.get_extra_info("sockname") is tr.stream.get_extra_info("sockname")
        assert tr.get_extra_info("peername") == tr.stream.get_extra_info("peername")
        assert tr.get_extra_info("socket") is tr.get_extra_info("socket")
        assert tr.get_extra_info("socket").fileno() == tr.stream.socket.fileno() >= 0
        assert tr.get_extra_info("nope", 7) == 7
        assert tr.get_extra_info("peername") == ("127.0.0.1", port)
        assert tr.get_protocol() is proto and tr.is_reading() and not tr.is_closing()
        for i in range(100):
            tr.write(b"%d," % i)
        want = b"".join(b"%d," % i for i in range(100))
        while len(proto.data) < len(want):
            await asyncio.sleep(0.001)
        assert bytes(proto.data) == want
        tr.close()
        await proto.done
        await asyncio.sleep(0)
        assert proto.lost == [None]
        server.close()
        await server.wait_closed()

    run(aloop, main())


class Keeper(asyncio.Protocol):
    """Keeps what the accepted transport says about its addresses, during
    the connection and after connection_lost."""

    seen: list = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.during = {k: transport.get_extra_info(k) for k in ("peername", "sockname")}

    def connection_lost(self, exc) -> None:
        after = {k: self.transport.get_extra_info(k) for k in ("peername", "sockname")}
        Keeper.seen.append((self.during, after, self.transport.get_extra_info("socket")))


@pytest.mark.parametrize("family", ["inet", "inet6"])
def test_accepted_addresses_outlive_the_connection(aloop, family) -> None:
    """The stream reads the peer once, keeps it raw, and answers with it
    after the socket is closed, as asyncio's transports keep theirs."""
    if family == "inet6" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    host = "127.0.0.1" if family == "inet" else "::1"

    async def main():
        loop = asyncio.get_running_loop()
        Keeper.seen = []
        try:
            server = await loop.create_server(Keeper, host, 0)
        except OSError as exc:
            pytest.skip(f"cannot listen on {host}: {exc}")
        port = server.sockets[0].getsockname()[1]
        clients = []
        for _ in range(3):
            c = socket.socket(socket.AF_INET if family == "inet" else socket.AF_INET6)
            c.setblocking(False)
            await loop.sock_connect(c, (host, port))
            clients.append((c, c.getsockname()))
        for c, _ in clients:
            c.close()
        for _ in range(400):
            if len(Keeper.seen) == 3:
                break
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        assert len(Keeper.seen) == 3
        peers = sorted(tuple(during["peername"]) for during, _, _ in Keeper.seen)
        assert peers == sorted(tuple(name) for _, name in clients)
        for during, after, tsock in Keeper.seen:
            assert after == during
            assert during["sockname"][:2] == (host, port)
            assert len(during["peername"]) == (2 if family == "inet" else 4)
            assert tsock.fileno() == -1   # asyncio's wrapper, of the closed socket

    run(aloop, main())


def test_one_byte_per_iteration_writer_gets_resume_writing(aloop) -> None:
    async def main():
        loop = asyncio.get_running_loop()
        sinks: list[Sink] = []

        def factory():
            s = Sink()
            sinks.append(s)
            return s

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        events: list[str] = []
        resumed = loop.create_future()

        class Writer(asyncio.Protocol):
            def pause_writing(self):
                events.append("pause")

            def resume_writing(self):
                events.append("resume")
                if not resumed.done():
                    resumed.set_result(None)

        tr, _ = await loop.create_connection(Writer, "127.0.0.1", port)
        tr.write(b"B" * (1 << 20))
        assert events == ["pause"]
        n = 0

        def one_byte():
            nonlocal n
            if resumed.done():
                return
            tr.write(b".")
            n += 1
            loop.call_soon(one_byte)  # every iteration, never idle

        loop.call_soon(one_byte)
        await asyncio.wait_for(resumed, 30)
        assert events == ["pause", "resume"]
        tr.close()
        got = await asyncio.wait_for(sinks[0].done, 30)
        assert got == b"B" * (1 << 20) + b"." * n
        server.close()
        await server.wait_closed()

    run(aloop, main())


def test_start_tls_right_after_a_large_write(aloop, ssl_contexts) -> None:
    """The side that writes 1 MiB and calls start_tls() at once (its queue
    still full) is the TLS server, so the peer reads exactly the plaintext
    before it answers with its ClientHello (a StreamReader that read past
    the plaintext would swallow TLS bytes: asyncio's rule, not ours)."""
    server_ctx, client_ctx = ssl_contexts
    big = bytes(range(256)) * 4096  # 1 MiB

    async def main():
        loop = asyncio.get_running_loop()
        result = loop.create_future()

        async def handle(reader, writer):
            try:
                assert isinstance(writer.transport, TCPTransport)
                writer.write(big)  # still queued when start_tls begins
                await writer.start_tls(server_ctx)
                line = await reader.readline()
                writer.write(b"tls:" + line)
                await writer.drain()
                result.set_result(True)
                writer.close()
            except Exception as exc:  # pragma: no cover - reported below
                result.set_exception(exc)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await reader.readexactly(len(big)) == big
        await writer.start_tls(client_ctx, server_hostname="localhost")
        writer.write(b"hello\n")
        await writer.drain()
        assert await reader.readline() == b"tls:hello\n"
        assert await asyncio.wait_for(result, 30) is True
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass
        server.close()
        await server.wait_closed()

    run(aloop, main())


@pytest.mark.parametrize("how", ["ssl=", "start_tls"])
def test_ssl_data_written_before_close_is_flushed(aloop, ssl_contexts, how) -> None:
    server_ctx, client_ctx = ssl_contexts
    big = b"0123456789abcdef" * 65536  # 1 MiB

    async def main():
        loop = asyncio.get_running_loop()
        got = loop.create_future()

        async def handle(reader, writer):
            if how == "start_tls":
                await writer.start_tls(server_ctx)
            data = await reader.read()  # to EOF
            got.set_result(data)
            writer.close()

        server = await asyncio.start_server(
            handle, "127.0.0.1", 0, ssl=server_ctx if how == "ssl=" else None
        )
        port = server.sockets[0].getsockname()[1]
        if how == "ssl=":
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
            )
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await writer.start_tls(client_ctx, server_hostname="localhost")
        writer.write(big)
        writer.close()  # no drain: close() must flush it
        try:
            await writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass
        data = await asyncio.wait_for(got, 30)
        assert len(data) == len(big) and data == big
        server.close()
        await server.wait_closed()

    run(aloop, main())


class BufProto(asyncio.BufferedProtocol):
    def __init__(self, size: int, echo: bool = False) -> None:
        self.buf = bytearray(size)
        self.data = bytearray()
        self.echo = echo
        self.done = asyncio.get_running_loop().create_future()
        self.lost: list = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint):
        return self.buf

    def buffer_updated(self, nbytes):
        chunk = bytes(self.buf[:nbytes])
        self.data += chunk
        if self.echo:
            self.transport.write(chunk)

    def eof_received(self):
        if not self.done.done():
            self.done.set_result(bytes(self.data))
        return False

    def connection_lost(self, exc):
        self.lost.append(exc)
        if not self.done.done():
            self.done.set_result(bytes(self.data))


def test_buffered_protocol_create_server_and_connection(aloop) -> None:
    payload = bytes(range(256)) * 1000

    async def main():
        loop = asyncio.get_running_loop()
        servers: list[BufProto] = []

        def factory():
            p = BufProto(100, echo=True)
            servers.append(p)
            return p

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tr, client = await loop.create_connection(lambda: BufProto(333), "127.0.0.1", port)
        assert isinstance(tr, TCPTransport)
        tr.write(payload)
        while len(client.data) < len(payload):
            await asyncio.sleep(0.001)
        assert bytes(client.data) == payload
        assert bytes(servers[0].data) == payload
        tr.write_eof()
        assert await asyncio.wait_for(servers[0].done, 10) == payload
        tr.close()
        await asyncio.wait_for(client.done, 10)
        server.close()
        await server.wait_closed()

    run(aloop, main())


def test_streams_echo_with_drain_and_eof(aloop) -> None:
    async def main():
        async def handle(reader, writer):
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
            writer.write_eof()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        blob = bytes(range(256)) * 16384  # 4 MiB
        writer.write(blob)
        await writer.drain()
        writer.write_eof()
        got = await reader.read()
        assert got == blob
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(aloop, main())


def test_protocol_error_goes_to_loop_handler(aloop) -> None:
    async def main():
        loop = asyncio.get_running_loop()
        seen = []
        loop.set_exception_handler(lambda lp, ctx: seen.append(ctx))
        lost = loop.create_future()

        class Boom(asyncio.Protocol):
            def data_received(self, data):
                raise ValueError("boom")

            def connection_lost(self, exc):
                lost.set_result(exc)

        server = await loop.create_server(Boom, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tr, p = await loop.create_connection(Sink, "127.0.0.1", port)
        tr.write(b"x")
        exc = await asyncio.wait_for(lost, 10)
        assert isinstance(exc, ValueError)
        assert len(seen) == 1 and seen[0]["exception"] is exc
        assert isinstance(seen[0]["transport"], TCPTransport)
        await asyncio.wait_for(p.done, 10)
        tr.close()
        server.close()
        await server.wait_closed()

    run(aloop, main())


async def _sink_and_its_peer():
    """A listening socket, a transport with a Sink connected to it, and
    the accepted socket (blocking-free, the test's to close)."""
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    lsock.setblocking(False)
    task = loop.create_task(loop.sock_accept(lsock))
    tr, proto = await loop.create_connection(Sink, *lsock.getsockname())
    conn, _ = await task
    return lsock, tr, proto, conn


def test_peer_reset_reaches_connection_lost(aloop) -> None:
    async def main():
        lsock, tr, p, conn = await _sink_and_its_peer()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        conn.close()
        await asyncio.wait_for(p.done, 10)
        await asyncio.sleep(0)
        assert len(p.lost) == 1 and isinstance(p.lost[0], OSError)
        lsock.close()

    run(aloop, main())


def test_connection_lost_goes_to_the_protocol_set_after_the_loss(aloop) -> None:
    # loop.sendfile()'s fallback swaps the user's protocol back in while the
    # loss of the connection is already on its way to the fallback protocol:
    # connection_lost is the protocol's of the moment it is called, as in
    # asyncio, or the user's protocol never hears of the loss.
    async def main():
        loop = asyncio.get_running_loop()
        lsock, tr, first, conn = await _sink_and_its_peer()
        second = Sink()
        tr.abort()
        # Runs after the loop has seen the abort complete and before it
        # calls connection_lost.
        loop.call_soon(tr.set_protocol, second)
        await asyncio.wait_for(second.done, 10)
        await asyncio.sleep(0)
        assert first.lost == [] and second.lost == [None]
        assert tr.get_protocol() is second
        conn.close()
        lsock.close()

    run(aloop, main())


@pytest.mark.skipif(not HAS_UNIX, reason="no AF_UNIX")
def test_unix_transport(aloop, tmp_path) -> None:
    path = str(tmp_path / "s.sock")

    async def main():
        async def handle(reader, writer):
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(handle, path)
        reader, writer = await asyncio.open_unix_connection(path)
        assert isinstance(writer.transport, TCPTransport)
        # As asyncio on Unix sockets: the client's peer is the path, its
        # own name the unnamed address.
        assert writer.get_extra_info("peername") == path
        assert writer.get_extra_info("sockname") in ("", b"")
        writer.write(b"over unix\n")
        assert await reader.readline() == b"over unix\n"
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(aloop, main())


def test_loop_close_with_open_transports_leaks_nothing(backend) -> None:
    loop = iocp.aio.EventLoop(backend=backend)

    async def main():
        server = await loop.create_server(Echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        trs = []
        for _ in range(5):
            tr, _ = await loop.create_connection(Sink, "127.0.0.1", port)
            tr.write(b"x" * 100_000)
            trs.append(tr)
        await asyncio.sleep(0.05)
        server.close()
        return trs

    trs = run(loop, main())
    loop.close()
    _leak_free(loop)
    for tr in trs:
        assert tr.is_closing()


def test_idle_connection_objects_are_bounded(aloop) -> None:
    """What an idle iocp.aio connection keeps on the Python side (gc-tracked
    objects counted, not timed): its transport, stream, protocol and
    socket -- no extra-info dict, no address tuple, no bound method of the
    transport (the stream's hooks are the class's functions, called with
    the transport first) or of the protocol (its data_received is kept as
    the class's function)."""
    import gc

    n = 64
    server_side: list = []

    class Kept(Echo):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            server_side.append(self)

    async def open_idle(port: int, count: int) -> list:
        socks = []
        for _ in range(count):
            c = socket.socket()
            c.setblocking(False)
            await aloop.sock_connect(c, ("127.0.0.1", port))
            await aloop.sock_sendall(c, b"x" * 64)
            got = b""
            while len(got) < 64:
                chunk = await aloop.sock_recv(c, 64 - len(got))
                assert chunk
                got += chunk
            socks.append(c)
        return socks

    async def main():
        server = await aloop.create_server(Kept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        for c in await open_idle(port, 4):  # warm up: first-use caches
            c.close()
        for _ in range(200):
            if all(p.transport.is_closing() for p in server_side):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        server_side.clear()
        gc.collect()
        before = len(gc.get_objects())
        socks = await open_idle(port, n)
        gc.collect()
        # Less the test's own client socket of each connection.
        grown = len(gc.get_objects()) - before - n
        try:
            assert len(server_side) == n
            assert grown <= n * 5 + 8, grown / n
            for proto in server_side[:4]:
                tr = proto.transport
                for obj in (tr, proto):
                    for ref in gc.get_referrers(obj):
                        assert getattr(ref, "__self__", None) is not obj, ref
        finally:
            for c in socks:
                c.close()
            server.close()
            await server.wait_closed()

    run(aloop, main())
