"""iocp.server, issue 11 fixes: shutdown after start(threads=0),
Connection.pause_reading/resume_reading, one argument order for connect()
and Client, and asyncio-style handlers refused up front.  Every backend."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
import warnings
from typing import Any, List

import pytest

from iocp.server import Client, Connection, Protocol, Server, connect

LEAK_KEYS = ("live_ops", "inflight", "pinned_buffers", "live_buffers", "queued")


def assert_no_leaks(stats: dict) -> None:
    for key in LEAK_KEYS:
        if key in stats:
            assert stats[key] == 0, stats
    assert stats.get("connections", 0) == 0, stats


def recv_until_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(out)
        out += chunk


def recv_exact(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return out


def run_port_until(port: Any, pred: Any, timeout: float = 5.0) -> bool:
    """Drive a port on this thread (as a start(threads=0) user does) until pred()."""
    end = time.monotonic() + timeout
    while not pred() and time.monotonic() < end:
        port.run(timeout=0.02)
    return bool(pred())


class Echo(Protocol):
    def data_received(self, conn: Connection, data: bytes) -> None:
        conn.send(data)


# --------------------------------------------------------------------------
# shutdown() after start(threads=0)


class Burst(Protocol):
    """Queues a payload larger than the socket buffers at once."""

    payload = os.urandom(2 * 1024 * 1024)

    def __init__(self) -> None:
        self.made = threading.Event()

    def connection_made(self, conn: Connection) -> None:
        conn.send(self.payload)
        self.made.set()


def _small_rcvbuf_client(addr: Any) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(addr)
    return s


def test_shutdown_after_start_threads0_drains(backend: str) -> None:
    """No loop thread: shutdown() runs the port itself until every buffered
    byte is written and nothing is left."""
    proto = Burst()
    srv = Server(lambda: proto, port=0, backend=backend, drain_timeout=20.0,
                 write_limit=8 << 20).start(threads=0)
    s = _small_rcvbuf_client(srv.address)
    try:
        assert run_port_until(srv.completion_port, proto.made.is_set)
        got: List[bytes] = []
        reader = threading.Thread(target=lambda: got.append(recv_until_eof(s, 20)))
        reader.start()
        final = srv.shutdown()
        reader.join(25)
        assert not reader.is_alive()
    finally:
        s.close()
    assert got == [Burst.payload]
    assert_no_leaks(final)
    assert srv.completion_port.closed


@pytest.mark.parametrize("where", ["callback", "signal"])
def test_shutdown_inside_the_callers_run_threads0(backend: str, where: str) -> None:
    """start(threads=0) and shutdown() from a callback or a signal handler of
    the caller's completion_port.run(): nothing can run the port there.
    Before the fix it spun until drain_timeout, then returned with the
    connection and 17 operations left (live_ops 17).  Now it refuses at
    once, with the server untouched, and request_shutdown() makes the
    caller's run() return so that shutdown() drains afterwards."""
    if where == "signal" and not hasattr(signal, "setitimer"):
        pytest.skip("needs signal.setitimer")
    proto = Burst()
    srv = Server(lambda: proto, port=0, backend=backend, drain_timeout=20.0,
                 write_limit=8 << 20).start(threads=0)
    port = srv.completion_port
    errors: List[BaseException] = []

    def stop(*_args: Any) -> None:
        try:
            srv.shutdown()
        except RuntimeError as exc:
            errors.append(exc)
        srv.request_shutdown()

    s = _small_rcvbuf_client(srv.address)
    got: List[bytes] = []
    reader = threading.Thread(target=lambda: got.append(recv_until_eof(s, 30)))
    try:
        assert run_port_until(port, proto.made.is_set)
        if where == "signal":
            old = signal.signal(signal.SIGALRM, stop)
            signal.setitimer(signal.ITIMER_REAL, 0.05)
        else:
            port.post(callback=lambda _c: stop())
        try:
            began = time.monotonic()
            port.run(timeout=30)  # returns once request_shutdown() stopped it
            assert time.monotonic() - began < 25, "request_shutdown() did not stop run()"
        finally:
            if where == "signal":
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old)
        assert len(errors) == 1 and "request_shutdown" in str(errors[0])
        assert srv.connections  # refused before anything was stopped
        reader.start()
        final = srv.shutdown()
        reader.join(35)
        assert not reader.is_alive()
    finally:
        s.close()
    assert got == [Burst.payload]
    assert_no_leaks(final)


# --------------------------------------------------------------------------
# Connection.pause_reading() / resume_reading()


def wait_until(pred: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return bool(pred())


class PauseOnFirst(Protocol):
    """Pauses reading from inside the first data_received."""

    def __init__(self) -> None:
        self.events: List[Any] = []
        self.conn: Connection | None = None
        self.lost = threading.Event()

    def connection_made(self, conn: Connection) -> None:
        self.conn = conn

    def data_received(self, conn: Connection, data: bytes) -> None:
        self.events.append(("paused" if conn.reading_paused else "data", data))
        if len(self.events) == 1:
            conn.pause_reading()

    def eof_received(self, conn: Connection) -> bool:
        self.events.append(("eof", conn.reading_paused))
        return True  # keep the half-open connection

    def connection_lost(self, conn: Connection, exc: BaseException | None) -> None:
        self.lost.set()


def threaded(conn: Connection) -> bool:
    """True for the threaded connection (threads=N, a shared port), false for
    the one on the stream core (one thread dispatching the server's port)."""
    return not hasattr(conn, "_stream")


def held_while_paused(conn: Connection, nbytes: int) -> None:
    """Wait until the bytes sent while paused reached the server, where the
    design shows it: the threaded connection's recv in flight completed and
    its data is held (bytes_received counts it); the stream cancelled its
    recv (what arrives stays in the kernel or is held by the stream)."""
    if threaded(conn):
        assert wait_until(lambda: conn.bytes_received == nbytes)
        assert wait_until(lambda: len(conn._held) == 1)  # type: ignore[attr-defined]
    else:
        stream = conn._stream  # type: ignore[attr-defined]
        assert wait_until(lambda: not stream.stats()["recv_armed"])


def _data(events: List[Any]) -> bytes:
    return b"".join(e[1] for e in events if e[0] == "data")


@pytest.mark.parametrize("threads", [1, 4])
def test_pause_reading_holds_data_and_eof_until_resume(backend: str, threads: int) -> None:
    """Paused from data_received: the recv already in flight completes and
    its bytes (then the EOF) are held, not delivered and not lost; after
    resume_reading() they arrive in order, then reading goes on."""
    proto = PauseOnFirst()
    srv = Server(lambda: proto, port=0, backend=backend).start(threads=threads)
    try:
        with socket.create_connection(srv.address, timeout=5) as s:
            s.sendall(b"A" * 10)
            assert wait_until(lambda: len(proto.events) == 1)
            conn = proto.conn
            assert conn is not None and conn.reading_paused
            s.sendall(b"B" * 10)
            held_while_paused(conn, 20)  # and data_received was not called
            s.sendall(b"C" * 10)
            s.shutdown(socket.SHUT_WR)
            assert proto.events == [("data", b"A" * 10)]
            if threaded(conn):
                assert conn.bytes_received == 20  # no new recv was submitted while paused
            conn.resume_reading()
            assert wait_until(lambda: any(e[0] == "eof" for e in proto.events))
            assert _data(proto.events) == b"A" * 10 + b"B" * 10 + b"C" * 10
            assert proto.events[-1] == ("eof", False)
            assert all(e[0] != "paused" for e in proto.events)
            conn.send(b"bye")  # half-open: still writable
            assert recv_exact(s, 3) == b"bye"
    finally:
        assert_no_leaks(srv.shutdown())


def test_pause_reading_before_the_first_recv(backend: str) -> None:
    """Paused in connection_made: nothing is read until resume_reading()."""
    made = threading.Event()
    got: List[bytes] = []
    conns: List[Connection] = []

    class P(Protocol):
        def connection_made(self, conn: Connection) -> None:
            conn.pause_reading()
            conns.append(conn)
            made.set()

        def data_received(self, conn: Connection, data: bytes) -> None:
            got.append(data)
            conn.send(data)

    srv = Server(P, port=0, backend=backend).start()
    try:
        with socket.create_connection(srv.address, timeout=5) as s:
            assert made.wait(5)
            s.sendall(b"early")
            assert conns[0].bytes_received == 0 and got == []
            conns[0].resume_reading()
            assert recv_exact(s, 5) == b"early"
            s.sendall(b"late")
            assert recv_exact(s, 4) == b"late"
    finally:
        assert_no_leaks(srv.shutdown())


@pytest.mark.parametrize("threads", [1, 3])
def test_pause_resume_from_another_thread_keeps_every_byte_in_order(
    backend: str, threads: int
) -> None:
    """A consumer thread that pauses on each chunk and resumes once it has
    taken it: every byte arrives, in order, and never while paused."""
    import queue

    chunks: queue.Queue[bytes | None] = queue.Queue()
    violations: List[str] = []
    conns: List[Connection] = []

    class P(Protocol):
        def connection_made(self, conn: Connection) -> None:
            conns.append(conn)

        def data_received(self, conn: Connection, data: bytes) -> None:
            if conn.reading_paused:
                violations.append("data while paused")
            conn.pause_reading()
            chunks.put(data)

        def eof_received(self, conn: Connection) -> None:
            chunks.put(None)

    payload = os.urandom(1 << 20)
    srv = Server(P, port=0, backend=backend, read_size=4096).start(threads=threads)
    try:
        with socket.create_connection(srv.address, timeout=5) as s:
            sender = threading.Thread(target=lambda: (s.sendall(payload),
                                                      s.shutdown(socket.SHUT_WR)))
            sender.start()
            got = bytearray()
            while True:
                item = chunks.get(timeout=10)
                if item is None:
                    break
                got += item
                conns[0].resume_reading()
            sender.join(10)
        assert bytes(got) == payload
        assert violations == []
    finally:
        assert_no_leaks(srv.shutdown())


def test_pause_reading_on_a_client(backend: str) -> None:
    """The client's connection has the same reading flow control."""
    srv = Server(Echo, port=0, backend=backend).start()
    proto = PauseOnFirst()
    try:
        with Client(lambda: proto, "127.0.0.1", srv.address[1], backend=backend) as client:
            conn = client.connection
            assert conn is not None
            conn.send(b"one")
            assert wait_until(lambda: len(proto.events) == 1)
            conn.send(b"two")
            held_while_paused(conn, 6)
            assert proto.events == [("data", b"one")]
            conn.resume_reading()
            assert wait_until(lambda: _data(proto.events) == b"onetwo")
    finally:
        assert_no_leaks(srv.shutdown())


# --------------------------------------------------------------------------
# One argument order: connect(handler, host, port), as Client and Server


class Greeting(Protocol):
    def __init__(self) -> None:
        self.got = bytearray()

    def data_received(self, conn: Connection, data: bytes) -> None:
        self.got += data


def _roundtrip(client: Client, proto: Greeting) -> None:
    try:
        assert client.connection is not None
        client.connection.send(b"hi")
        assert wait_until(lambda: bytes(proto.got) == b"hi")
    finally:
        client.close()


def test_connect_takes_the_order_of_client_and_server(backend: str) -> None:
    """connect(handler, host, port) by position and by name, no warning."""
    import inspect

    assert list(inspect.signature(connect).parameters)[:3] == ["handler", "host", "port"]
    assert list(inspect.signature(Client).parameters)[:3] == ["handler", "host", "port"]
    assert list(inspect.signature(Server).parameters)[:3] == ["handler", "host", "port"]
    srv = Server(Echo, port=0, backend=backend).start()
    try:
        port = srv.address[1]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for call in (
                lambda p: connect(lambda: p, "127.0.0.1", port, backend=backend),
                lambda p: connect(lambda: p, host="127.0.0.1", port=port, backend=backend),
                lambda p: connect(handler=lambda: p, host="127.0.0.1", port=port,
                                  backend=backend),
                lambda p: connect(host="127.0.0.1", port=port, handler=lambda: p,
                                  backend=backend),  # the old names still fit
            ):
                proto = Greeting()
                _roundtrip(call(proto), proto)
    finally:
        assert_no_leaks(srv.shutdown())


def test_connect_old_positional_order_warns_and_works(backend: str) -> None:
    """connect(host, port, handler), the order before issue 11, still
    connects, with a DeprecationWarning pointing at the caller."""
    srv = Server(Echo, port=0, backend=backend).start()
    try:
        port = srv.address[1]
        for call in (
            lambda p: connect("127.0.0.1", port, lambda: p, backend=backend),
            lambda p: connect("127.0.0.1", port, handler=lambda: p, backend=backend),
        ):
            proto = Greeting()
            with pytest.warns(DeprecationWarning, match=r"connect\(handler, host, port\)") as w:
                client = call(proto)
            assert w[0].filename == __file__
            _roundtrip(client, proto)
    finally:
        assert_no_leaks(srv.shutdown())


def test_connect_argument_errors() -> None:
    with pytest.raises(TypeError, match="handler"):
        connect(host="127.0.0.1", port=1)
    with pytest.raises(TypeError, match="multiple values"):
        connect(Echo, "127.0.0.1", 1, host="127.0.0.1")
    with pytest.raises(TypeError, match=r"Client\(handler, host, port\)"):
        Client("127.0.0.1", 9527, Echo)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Handlers written for asyncio are refused up front, never on the first data


class AioEcho(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)


class DuckAio:
    """asyncio-shaped, without the base class."""

    def data_received(self, data: bytes) -> None:
        pass


class BadEof(Protocol):
    def eof_received(self) -> None:  # type: ignore[override]
        pass


class Fine:
    """Every accepted form of an iocp.server protocol method."""

    def connection_made(self, conn: Any) -> None: ...
    def data_received(self, conn: Any, data: bytes, *extra: Any) -> None: ...
    def eof_received(self, conn: Any, unused: int = 0) -> None: ...
    @staticmethod
    def connection_lost(conn: Any, exc: Any) -> None: ...
    @classmethod
    def pause_writing(cls, conn: Any) -> None: ...
    def resume_writing(self, *args: Any) -> None: ...


@pytest.mark.parametrize(
    "handler, match",
    [
        (AioEcho, "asyncio protocol"),
        (AioEcho(), "asyncio protocol"),
        (asyncio.BufferedProtocol, "asyncio protocol"),
        (DuckAio, r"data_received must take \(conn, data\)"),
        (DuckAio(), r"data_received must take \(conn, data\)"),
        (BadEof, r"eof_received must take \(conn\)"),
    ],
)
def test_asyncio_handlers_are_refused_at_construction(handler: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        Server(handler, port=0)
    with pytest.raises(TypeError, match=match):
        Client(handler, "127.0.0.1", 1)


def test_iocp_handlers_of_every_shape_are_accepted() -> None:
    for handler in (Fine, Fine(), Echo, Protocol, lambda: Fine()):
        Server(handler, port=0)
        Client(handler, "127.0.0.1", 1)


def test_asyncio_protocol_from_a_factory_refused_before_any_callback(backend: str) -> None:
    """A factory can only be checked on its first product: the connection is
    refused then (Server: logged and closed; Client: connect() raises), and
    no method of the asyncio protocol is ever called."""
    calls: List[str] = []

    class Spy(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            calls.append("made")

        def data_received(self, data: bytes) -> None:
            calls.append("data")

    srv = Server(lambda: Spy(), port=0, backend=backend).start()
    try:
        with socket.create_connection(srv.address, timeout=5) as s:
            s.sendall(b"x")
            s.settimeout(5)
            try:  # closed by the server (a reset: "x" was not read); no callback ran
                assert s.recv(10) == b""
            except ConnectionResetError:
                pass
    finally:
        assert_no_leaks(srv.shutdown())
    echo = Server(Echo, port=0, backend=backend).start()
    try:
        client = Client(lambda: Spy(), "127.0.0.1", echo.address[1], backend=backend)
        with pytest.raises(TypeError, match="asyncio protocol"):
            client.connect(timeout=5)
        assert client.completion_port.closed
        assert_no_leaks(client.completion_port.stats())
    finally:
        assert_no_leaks(echo.shutdown())
    assert calls == []
