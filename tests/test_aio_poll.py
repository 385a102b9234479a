"""iocp.aio readiness and datagrams on the port's poll ops, on every backend.

add_reader/add_writer are served by poll ops (no helper thread), level-
triggered as a selector loop's; datagram transports and sock_recvfrom /
sock_sendto wait on poll ops too.  Every loop is closed and leak-checked
(tests/test_aio.py's ``aloop`` fixture), and no readiness thread may have
been started unless a test asks for the fallback.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import sys
import tempfile
import threading
from typing import Any

import pytest

import iocp.aio
from iocp.aio import _readiness
from tests import test_aio

run = test_aio.run


@pytest.fixture
def aloop(backend: str):
    """An iocp loop on the current backend, closed and leak-checked (as
    tests/test_aio.py's)."""
    loop = iocp.aio.EventLoop(backend=backend)
    assert loop.backend == backend
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    if not loop.is_closed():
        loop.close()
    test_aio._leak_free(loop)

POSIX = sys.platform != "win32"
needs_posix = pytest.mark.skipif(not POSIX, reason="POSIX descriptors")


def _no_thread(loop: iocp.aio.EventLoop) -> None:
    readiness = loop._readiness
    assert readiness is None or readiness.thread is None
    assert not [t for t in threading.enumerate() if t.name == "iocp.aio-readiness"]


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def _marker(loop: Any) -> None:
    """Returns once a reader on a fresh socketpair has fired: by then the
    loop has gone through at least one poll round trip, so a callback that
    was still due elsewhere had its chance."""
    c, d = _pair()
    fired = loop.create_future()
    loop.add_reader(c, lambda: fired.done() or fired.set_result(None))
    d.send(b"m")
    try:
        await fired
        for _ in range(3):  # and a few iterations more
            await asyncio.sleep(0)
    finally:
        loop.remove_reader(c)
        c.close()
        d.close()


# ---------------------------------------------------------------- add_reader


def test_reader_is_level_triggered_and_stops_when_drained(aloop) -> None:
    a, b = _pair()
    calls: list[int] = []
    third = aloop.create_future()

    def on_readable() -> None:
        calls.append(1)
        if len(calls) == 3:  # called three times for one unread byte
            assert a.recv(10) == b"x"
            third.set_result(None)

    async def main() -> None:
        aloop.add_reader(a, on_readable)
        b.send(b"x")
        await third
        await _marker(aloop)
        assert len(calls) == 3  # drained: no more calls
        b.send(b"y")
        while len(calls) < 4:
            await asyncio.sleep(0)
        assert aloop.remove_reader(a) is True

    run(aloop, main())
    assert a.recv(10) == b"y"
    _no_thread(aloop)
    a.close()
    b.close()


def test_remove_reader_stops_callbacks_and_answers_as_asyncio(aloop) -> None:
    a, b = _pair()
    calls: list[int] = []

    async def main() -> None:
        assert aloop.remove_reader(a) is False  # never added
        aloop.add_reader(a.fileno(), calls.append, 1)
        b.send(b"x")
        while not calls:
            await asyncio.sleep(0)
        assert aloop.remove_reader(a) is True
        assert aloop.remove_reader(a) is False
        n = len(calls)
        b.send(b"more")
        await _marker(aloop)
        assert len(calls) == n

    run(aloop, main())
    _no_thread(aloop)
    a.close()
    b.close()


def test_add_reader_again_replaces_the_callback(aloop) -> None:
    a, b = _pair()
    got: list[str] = []
    done = aloop.create_future()

    def second() -> None:
        got.append("second")
        a.recv(10)
        done.set_result(None)

    async def main() -> None:
        aloop.add_reader(a, got.append, "first")
        aloop.add_reader(a, second)
        b.send(b"x")
        await done
        await _marker(aloop)
        aloop.remove_reader(a)

    run(aloop, main())
    assert got == ["second"]
    a.close()
    b.close()


def test_writer_is_level_triggered_and_removable(aloop) -> None:
    a, b = _pair()
    calls: list[int] = []
    third = aloop.create_future()

    def on_writable() -> None:
        calls.append(1)
        if len(calls) == 3:
            assert aloop.remove_writer(a) is True
            third.set_result(None)

    async def main() -> None:
        aloop.add_writer(a, on_writable)
        await third
        await _marker(aloop)
        assert len(calls) == 3
        assert aloop.remove_writer(a) is False

    run(aloop, main())
    _no_thread(aloop)
    a.close()
    b.close()


def test_reader_and_writer_on_one_fd(aloop) -> None:
    a, b = _pair()
    wrote = aloop.create_future()
    read = aloop.create_future()

    def on_writable() -> None:
        a.send(b"ping")
        aloop.remove_writer(a)
        wrote.set_result(None)

    def on_readable() -> None:
        read.set_result(a.recv(10))
        aloop.remove_reader(a)

    async def main() -> bytes:
        aloop.add_reader(a, on_readable)
        aloop.add_writer(a, on_writable)
        await wrote
        assert b.recv(10) == b"ping"  # the writer ran, the reader waits on
        assert not read.done()
        b.send(b"pong")
        return await read

    assert run(aloop, main()) == b"pong"
    _no_thread(aloop)
    a.close()
    b.close()


@needs_posix
def test_reader_on_a_pipe_leaves_its_blocking_mode(aloop) -> None:
    r, w = os.pipe()
    assert os.get_blocking(r)
    got: list[bytes] = []
    eof = aloop.create_future()

    def on_readable() -> None:
        data = os.read(r, 100)
        got.append(data)
        if not data:
            aloop.remove_reader(r)
            eof.set_result(None)

    async def main() -> None:
        aloop.add_reader(r, on_readable)
        assert os.get_blocking(r)  # a selector loop would not change it either
        os.write(w, b"through the port")
        while not got:
            await asyncio.sleep(0)
        os.close(w)
        await eof

    run(aloop, main())
    assert got == [b"through the port", b""]
    _no_thread(aloop)
    os.close(r)


def test_reader_exception_goes_to_the_handler_and_it_stays_armed(aloop) -> None:
    a, b = _pair()
    seen: list[Any] = []
    calls: list[int] = []
    aloop.set_exception_handler(lambda loop, ctx: seen.append(ctx))

    def on_readable() -> None:
        calls.append(1)
        if len(calls) == 2:
            a.recv(10)
            aloop.remove_reader(a)
        raise RuntimeError("boom")

    async def main() -> None:
        aloop.add_reader(a, on_readable)
        b.send(b"x")
        while len(calls) < 2:
            await asyncio.sleep(0)

    run(aloop, main())
    assert len(seen) == 2
    assert all(isinstance(ctx["exception"], RuntimeError) for ctx in seen)
    assert all("handle" in ctx for ctx in seen)  # reported as a Handle's
    a.close()
    b.close()


def test_reader_beside_a_proactor_registration_of_the_same_socket(aloop) -> None:
    """add_reader then sock_recv on one socket (the proactor registers it,
    replacing the stand-in), and the other order: the reader still fires."""
    a, b = _pair()
    calls: list[int] = []

    async def main() -> None:
        aloop.add_reader(a, calls.append, 1)
        b.send(b"1")
        while not calls:
            await asyncio.sleep(0)
        aloop.remove_reader(a)
        assert await aloop.sock_recv(a, 10) == b"1"  # registered by the proactor now
        aloop.add_reader(a, calls.append, 2)  # through that registration
        b.send(b"2")
        while calls[-1] != 2:
            await asyncio.sleep(0)
        assert aloop.remove_reader(a) is True
        assert await aloop.sock_recv(a, 10) == b"2"
        # Stand-in first, then the proactor takes the descriptor over.
        c, d = _pair()
        aloop.add_reader(c, calls.append, 3)
        fut = asyncio.ensure_future(aloop.sock_recv(c, 10))
        await asyncio.sleep(0)
        d.send(b"3")
        assert await fut == b"3"
        d.send(b"4")
        while calls[-1] != 3:
            await asyncio.sleep(0)
        assert aloop.remove_reader(c) is True
        assert c.recv(10) == b"4"
        c.close()
        d.close()

    run(aloop, main())
    _no_thread(aloop)
    a.close()
    b.close()


def test_fallback_thread_when_the_port_has_no_poll_ops(aloop, monkeypatch) -> None:
    def no_poll(self: Any, sock: Any, events: int, callback: Any) -> Any:
        raise OSError(errno.ENOSYS, "no poll ops")

    monkeypatch.setattr(_readiness.PortReadiness, "_poll", no_poll)
    a, b = _pair()
    got = aloop.create_future()

    def on_readable() -> None:
        got.set_result(a.recv(100))

    async def main() -> bytes:
        aloop.add_reader(a, on_readable)
        b.send(b"via the thread")
        data = await got
        assert aloop.remove_reader(a) is True
        return data

    assert run(aloop, main()) == b"via the thread"
    readiness = aloop._readiness
    assert readiness is not None and readiness.thread is not None
    assert readiness._watches == {}  # nothing left on the port
    aloop.close()
    assert not readiness.thread._thread.is_alive()
    a.close()
    b.close()


def test_add_reader_refuses_a_closed_descriptor_without_a_thread(aloop) -> None:
    a, b = _pair()
    fd = a.fileno()
    a.close()
    b.close()
    with pytest.raises(OSError):
        aloop.add_reader(fd, lambda: None)
    assert aloop.remove_reader(fd) is False
    _no_thread(aloop)


# ---------------------------------------------------------------- datagrams


class Echo(asyncio.DatagramProtocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.transport.sendto(data, addr)


class Collect(asyncio.DatagramProtocol):
    def __init__(self, loop: Any, want: int = 0) -> None:
        self.got: list[bytes] = []
        self.errors: list[BaseException] = []
        self.events: list[str] = []
        self.want = want
        self.full = loop.create_future()
        self.error = loop.create_future()
        self.lost = loop.create_future()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.events.append("made")

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append(data)
        if len(self.got) == self.want and not self.full.done():
            self.full.set_result(None)

    def error_received(self, exc: BaseException) -> None:
        self.errors.append(exc)
        if not self.error.done():
            self.error.set_result(exc)

    def pause_writing(self) -> None:
        self.events.append("pause")

    def resume_writing(self) -> None:
        self.events.append("resume")

    def connection_lost(self, exc: BaseException | None) -> None:
        self.events.append("lost")
        self.lost.set_result(exc)


def test_udp_echo_many_datagrams_in_order(aloop) -> None:
    window, rounds = 32, 16  # bounded in flight: loopback drops nothing

    async def main() -> list[bytes]:
        server, _ = await aloop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        addr = server.get_extra_info("sockname")
        client, proto = await aloop.create_datagram_endpoint(
            lambda: Collect(aloop), remote_addr=addr
        )
        assert isinstance(client, asyncio.DatagramTransport)
        assert isinstance(client, asyncio.Transport)
        assert client.get_extra_info("peername") == addr
        for r in range(rounds):
            proto.want = (r + 1) * window
            proto.full = aloop.create_future()
            for i in range(window):
                client.sendto(b"%05d" % (r * window + i))
            await proto.full
        client.close()
        server.close()
        assert await proto.lost is None
        return proto.got

    got = run(aloop, main())
    assert got == [b"%05d" % i for i in range(32 * 16)]
    _no_thread(aloop)


def test_udp_busy_socket_yields_to_the_loop(aloop) -> None:
    n = 200  # more than one read turn (64)

    async def main() -> tuple[list[bytes], int]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind(("127.0.0.1", 0))
        order: list[str] = []

        class P(Collect):
            def datagram_received(self, data: bytes, addr: Any) -> None:
                if not self.got:
                    aloop.call_soon(order.append, "other")
                order.append("dgram")
                super().datagram_received(data, addr)

        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for i in range(n):  # all waiting before the transport reads
            sender.sendto(b"%03d" % i, sock.getsockname())
        sender.close()
        transport, proto = await aloop.create_datagram_endpoint(lambda: P(aloop, n), sock=sock)
        await proto.full
        transport.close()
        await proto.lost
        return proto.got, order.index("other")

    got, other_at = run(aloop, main())
    assert got == [b"%03d" % i for i in range(n)]
    assert other_at < n  # the loop ran other callbacks before the socket was drained


def test_connected_udp_error_received_on_refusal(aloop) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    closed = s.getsockname()
    s.close()  # nobody listens there: ICMP port unreachable

    async def main() -> BaseException:
        transport, proto = await aloop.create_datagram_endpoint(
            lambda: Collect(aloop), remote_addr=closed
        )
        transport.sendto(b"anyone?")
        exc = await proto.error
        assert not transport.is_closing()  # an error for a datagram, not the end
        transport.close()
        await proto.lost
        return exc

    exc = run(aloop, main())
    assert isinstance(exc, ConnectionRefusedError)


def _unix_dgram_pair(d: str) -> tuple[socket.socket, socket.socket]:
    """A connected AF_UNIX datagram pair whose receiver we do not read:
    sends hit EAGAIN once its queue is full."""
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(os.path.join(d, "rx"))
    tx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    tx.bind(os.path.join(d, "tx"))
    tx.connect(os.path.join(d, "rx"))
    tx.setblocking(False)
    rx.setblocking(False)
    return tx, rx


def _drain(rx: socket.socket, out: list[bytes]) -> None:
    while True:
        try:
            out.append(rx.recv(1 << 16))
        except BlockingIOError:
            return


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="AF_UNIX datagrams")
def test_unix_datagram_flow_control_pause_and_resume(aloop) -> None:
    payload = b"z" * 1024

    async def main() -> tuple[list[str], list[bytes], int]:
        with tempfile.TemporaryDirectory() as d:
            tx, rx = _unix_dgram_pair(d)
            transport, proto = await aloop.create_datagram_endpoint(
                lambda: Collect(aloop), sock=tx
            )
            transport.set_write_buffer_limits(high=8 * 1024, low=2 * 1024)
            assert transport.get_write_buffer_limits() == (2 * 1024, 8 * 1024)
            sent = 0
            while "pause" not in proto.events:
                transport.sendto(payload + b"%06d" % sent)
                sent += 1
                assert sent < 100_000
            assert transport.get_write_buffer_size() > 8 * 1024
            got: list[bytes] = []
            # Reading the peer makes room: the queue flushes, resume comes.
            while "resume" not in proto.events:
                _drain(rx, got)
                await asyncio.sleep(0)
            while len(got) < sent:
                _drain(rx, got)
                await asyncio.sleep(0)
            assert transport.get_write_buffer_size() == 0
            transport.close()
            await proto.lost
            rx.close()
            return proto.events, got, sent

    events, got, sent = run(aloop, main())
    assert events == ["made", "pause", "resume", "lost"]
    assert got == [payload + b"%06d" % i for i in range(sent)]


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="AF_UNIX datagrams")
@pytest.mark.parametrize("how", ["close", "abort"])
def test_unix_datagram_close_while_queued(aloop, how: str) -> None:
    async def main() -> tuple[list[bytes], int, list[str]]:
        with tempfile.TemporaryDirectory() as d:
            tx, rx = _unix_dgram_pair(d)
            transport, proto = await aloop.create_datagram_endpoint(
                lambda: Collect(aloop), sock=tx
            )
            sent = 0
            while transport.get_write_buffer_size() == 0:  # until one is queued
                transport.sendto(b"%06d" % sent)
                sent += 1
                assert sent < 100_000
            for _ in range(5):
                transport.sendto(b"%06d" % sent)
                sent += 1
            getattr(transport, how)()
            assert transport.is_closing()
            got: list[bytes] = []
            if how == "close":
                await _marker(aloop)
                assert not proto.lost.done()  # waits for the queue to drain
                while not proto.lost.done():
                    _drain(rx, got)
                    await asyncio.sleep(0)
            exc = await proto.lost
            assert exc is None
            _drain(rx, got)
            rx.close()
            transport.sendto(b"after")  # dropped, as asyncio drops it
            return got, sent, proto.events

    got, sent, events = run(aloop, main())
    assert events[-1] == "lost" and events.count("lost") == 1
    if how == "close":  # every queued datagram went out first
        assert got == [b"%06d" % i for i in range(sent)]
    else:  # the queue was dropped: only what the socket took before
        assert got == [b"%06d" % i for i in range(len(got))] and len(got) < sent


def test_datagram_transport_argument_checks(aloop) -> None:
    async def main() -> None:
        transport, proto = await aloop.create_datagram_endpoint(
            lambda: Collect(aloop), remote_addr=("127.0.0.1", 9)
        )
        with pytest.raises(TypeError):
            transport.sendto("text")
        with pytest.raises(ValueError):
            transport.sendto(b"x", ("127.0.0.1", 10))
        with pytest.raises(ValueError):
            transport.set_write_buffer_limits(high=1, low=2)
        assert transport.get_protocol() is proto
        transport.abort()
        await proto.lost

    run(aloop, main())


# ---------------------------------------------------------------- sock_*


def test_sock_recvfrom_and_sendto_wait_on_poll_ops(aloop) -> None:
    async def main() -> None:
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (a, b):
            s.setblocking(False)
            s.bind(("127.0.0.1", 0))
        pending = asyncio.ensure_future(aloop.sock_recvfrom(a, 100))
        await _marker(aloop)
        assert not pending.done()  # nothing yet: it waits on a poll op
        assert await aloop.sock_sendto(b, b"one", a.getsockname()) == 3
        assert await pending == (b"one", b.getsockname())
        buf = bytearray(10)
        into = asyncio.ensure_future(aloop.sock_recvfrom_into(a, buf))
        await asyncio.sleep(0)
        await aloop.sock_sendto(b, b"two", a.getsockname())
        assert await into == (3, b.getsockname()) and buf[:3] == b"two"
        # A cancelled wait takes nothing: the next gets the datagram.
        cancelled = asyncio.ensure_future(aloop.sock_recvfrom(a, 100))
        await asyncio.sleep(0)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await aloop.sock_sendto(b, b"three", a.getsockname())
        assert await aloop.sock_recvfrom(a, 100) == (b"three", b.getsockname())
        a.close()
        b.close()

    run(aloop, main())
    _no_thread(aloop)


@needs_posix
def test_descriptor_closed_behind_its_back_is_forgotten_and_reusable(aloop) -> None:
    """A reader never removed, its socket closed: the number's next owner
    registers it with the port (as a stream transport does) without an
    "already registered", the stale callback never runs on the new socket's
    data, and add_reader on the reused number serves the new callback."""
    a, b = _pair()
    stale: list[int] = []
    fresh: list[int] = []

    async def main() -> None:
        aloop.add_reader(a, stale.append, 1)
        await _marker(aloop)
        fd = a.fileno()
        a.close()
        b.close()
        c, d = _pair()
        if c.fileno() != fd and d.fileno() != fd:
            c.close()
            d.close()
            pytest.skip("the descriptor number was not reused")
        mine = c if c.fileno() == fd else d
        peer = d if mine is c else c
        aloop.port.register(mine)  # what a stream transport does
        aloop.port.unregister(mine)
        peer.send(b"new data")
        await _marker(aloop)
        assert stale == []
        aloop.add_reader(mine, fresh.append, 2)  # the reused number, anew
        while not fresh:
            await asyncio.sleep(0)
        assert aloop.remove_reader(mine) is True
        assert mine.recv(100) == b"new data"
        c.close()
        d.close()

    run(aloop, main())
    assert stale == [] and fresh
    _no_thread(aloop)
