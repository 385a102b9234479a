"""iocp.server's two connection modes, on every backend: the single-thread
mode on the stream core (one thread dispatches the server's or client's own
port: threads=0/1) and the threaded mode (threads=N, or a shared port).
The same behaviour is asserted in both; where the core has no Stream every
connection is threaded and the mode checks are skipped."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, List

import pytest

from iocp import _core
from iocp.server import Client, Connection, Protocol, Server, WriteBufferFull

HAVE_STREAM = hasattr(_core, "Stream")
LEAK_KEYS = ("live_ops", "inflight", "pinned_buffers", "live_buffers", "queued")


def assert_no_leaks(stats: dict) -> None:
    for key in LEAK_KEYS:
        if key in stats:
            assert stats[key] == 0, stats
    assert stats.get("connections", 0) == 0, stats


def wait_until(pred: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.005)
    return bool(pred())


def recv_exact(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def on_stream(conn: Connection) -> bool:
    return hasattr(conn, "_stream")


class Keep(Protocol):
    """Echoes, and keeps its connection for the test to look at."""

    def __init__(self) -> None:
        self.conns: List[Connection] = []
        self.lost: List[Any] = []
        self.gone = threading.Event()

    def connection_made(self, conn: Connection) -> None:
        self.conns.append(conn)

    def data_received(self, conn: Connection, data: bytes) -> None:
        conn.send(data)

    def connection_lost(self, conn: Connection, exc: BaseException | None) -> None:
        self.lost.append(exc)
        self.gone.set()


@pytest.mark.skipif(not HAVE_STREAM, reason="the core has no Stream")
def test_mode_follows_threads_and_port_ownership(backend: str) -> None:
    cases = [(dict(), 1, True), (dict(), 0, True), (dict(), 4, False)]
    shared = _core.CompletionPort(backend=backend)
    cases.append((dict(completion_port=shared), 1, False))
    try:
        for kw, threads, want_stream in cases:
            proto = Keep()
            srv = Server(lambda p=proto: p, port=0, backend=backend, **kw).start(threads)
            try:
                with socket.create_connection(srv.address, timeout=5) as s:
                    s.sendall(b"ping")
                    if threads == 0:
                        port = srv.completion_port
                        end = time.monotonic() + 5
                        while not proto.conns and time.monotonic() < end:
                            port.run(timeout=0.02)
                    assert wait_until(lambda p=proto: bool(p.conns))
                    assert on_stream(proto.conns[0]) is want_stream, (kw, threads)
                    assert isinstance(proto.conns[0], Connection)
            finally:
                assert_no_leaks(srv.shutdown())
        srv = Server(Keep, port=0, backend=backend).start()
        try:
            with Client(Keep, "127.0.0.1", srv.address[1], backend=backend) as client:
                assert client.connection is not None and on_stream(client.connection)
        finally:
            assert_no_leaks(srv.shutdown())
    finally:
        shared.close()


@pytest.mark.parametrize("threads", [1, 4])
def test_counters_in_both_modes(backend: str, threads: int) -> None:
    """bytes_received, bytes_sent, write_buffer_size and last_activity mean
    the same on the stream core and on the threaded path."""
    proto = Keep()
    srv = Server(lambda: proto, port=0, backend=backend).start(threads=threads)
    payload = os.urandom(300_000)
    try:
        with socket.create_connection(srv.address, timeout=5) as s:
            assert wait_until(lambda: bool(proto.conns))
            conn = proto.conns[0]
            before = conn.last_activity
            s.sendall(payload)
            assert recv_exact(s, len(payload), 10) == payload
            assert wait_until(lambda: conn.bytes_sent == len(payload))
            assert conn.bytes_received == len(payload)
            assert conn.write_buffer_size == 0
            assert conn.last_activity >= before
            assert not conn.closing and not conn.writing_paused and not conn.reading_paused
    finally:
        assert_no_leaks(srv.shutdown())


@pytest.mark.parametrize("threads", [1, 4])
def test_one_send_over_write_limit_aborts_in_both_modes(backend: str, threads: int) -> None:
    """A single send() past write_limit, with no pause before it, is refused
    as the threaded path always did: WriteBufferFull, connection aborted."""

    class Big(Keep):
        def connection_made(self, conn: Connection) -> None:
            super().connection_made(conn)
            conn.send(b"x" * (2 << 20))

    proto = Big()
    srv = Server(lambda: proto, port=0, backend=backend, write_high_water=64 << 10,
                 write_limit=1 << 20).start(threads=threads)
    try:
        with socket.create_connection(srv.address, timeout=5):
            assert proto.gone.wait(5)
        assert len(proto.lost) == 1 and isinstance(proto.lost[0], WriteBufferFull)
    finally:
        assert_no_leaks(srv.shutdown())


@pytest.mark.parametrize("threads", [1, 4])
def test_calls_from_another_thread_in_both_modes(backend: str, threads: int) -> None:
    """send, pause_reading, resume_reading, write_eof and close from a thread
    that does not run the port: they take effect, in the order made."""
    proto = Keep()
    srv = Server(lambda: proto, port=0, backend=backend).start(threads=threads)
    try:
        with socket.create_connection(srv.address, timeout=5) as s:
            assert wait_until(lambda: bool(proto.conns))
            conn = proto.conns[0]
            done = threading.Event()

            def worker() -> None:
                for i in range(100):
                    conn.send(b"%03d" % i)
                conn.pause_reading()
                conn.resume_reading()
                conn.write_eof()
                conn.send(b"dropped: after write_eof")
                done.set()

            threading.Thread(target=worker).start()
            assert done.wait(5)
            s.settimeout(5)
            got = bytearray()
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
            assert bytes(got) == b"".join(b"%03d" % i for i in range(100))
            s.sendall(b"still read")  # half-closed: reading goes on
            assert wait_until(lambda: conn.bytes_received == 10)
            threading.Thread(target=conn.close).start()
            assert proto.gone.wait(5)
        assert proto.lost == [None]
    finally:
        assert_no_leaks(srv.shutdown())


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("where", ["data_received", "pause_writing"])
def test_a_raising_callback_aborts_in_both_modes(
    backend: str, threads: int, where: str, caplog: Any
) -> None:
    """Whatever callback raises (pause_writing too, which the stream core
    alone would only report), the error is logged and connection_lost gets
    the exception, once."""

    class Boom(Keep):
        def data_received(self, conn: Connection, data: bytes) -> None:
            if where == "data_received":
                raise ValueError("boom")
            conn.send(b"y" * (256 << 10))  # past the high-water mark: pause_writing

        def pause_writing(self, conn: Connection) -> None:
            raise ValueError("boom")

    proto = Boom()
    srv = Server(lambda: proto, port=0, backend=backend).start(threads=threads)
    try:
        with socket.create_connection(srv.address, timeout=5) as s:
            s.sendall(b"go")
            assert proto.gone.wait(5)
        assert len(proto.lost) == 1 and isinstance(proto.lost[0], ValueError)
        assert any("aborting the connection" in r.getMessage() for r in caplog.records)
    finally:
        assert_no_leaks(srv.shutdown())


@pytest.mark.parametrize("threads", [1, 4])
def test_call_posted_after_the_loop_threads_stopped_runs_in_shutdown(
    backend: str, threads: int
) -> None:
    """close() from another thread once the loop threads are gone (as
    shutdown() leaves it: it runs the port on its own thread then).  The
    posted call must run there, once: a version that re-checked its thread
    there re-posted itself for ever and shutdown() ended with the
    connection and its operations left."""
    proto = Keep()
    srv = Server(lambda: proto, port=0, backend=backend).start(threads=threads)
    with socket.create_connection(srv.address, timeout=5) as s:
        s.sendall(b"hi")
        assert recv_exact(s, 2) == b"hi"
        conn = proto.conns[0]
        srv._loop.stop_threads()
        assert not srv._loop.threads
        closer = threading.Thread(target=conn.close)
        closer.start()
        closer.join(5)
        final = srv.shutdown()
        s.settimeout(5)
        assert s.recv(10) == b""
    assert proto.lost == [None]
    assert_no_leaks(final)


class Stamps(Protocol):
    """Echoes; records the counters each data_received sees and those left
    at connection_lost."""

    def __init__(self) -> None:
        self.conns: List[Connection] = []
        self.seen: List[Any] = []  # (len(data), bytes_received, last_activity, now)
        self.final: List[Any] = []
        self.gone = threading.Event()

    def connection_made(self, conn: Connection) -> None:
        self.conns.append(conn)

    def data_received(self, conn: Connection, data: bytes) -> None:
        self.seen.append((len(data), conn.bytes_received, conn.last_activity, time.monotonic()))
        conn.send(data)

    def connection_lost(self, conn: Connection, exc: BaseException | None) -> None:
        self.final.append(
            (exc, conn.bytes_received, conn.bytes_sent, conn.last_activity, time.monotonic())
        )
        self.gone.set()


@pytest.mark.parametrize("threads", [1, 4])
def test_counters_exact_after_an_echo_in_both_modes(backend: str, threads: int) -> None:
    """bytes_received counts each chunk before its data_received; once the
    connection is lost bytes_received and bytes_sent are exactly what was
    echoed, and last_activity is time.monotonic()'s clock: no earlier than
    the last send of the peer, no later than connection_lost."""
    proto = Stamps()
    srv = Server(lambda: proto, port=0, backend=backend).start(threads=threads)
    total = 0
    try:
        t0 = time.monotonic()
        with socket.create_connection(srv.address, timeout=5) as s:
            for i in range(30):
                msg = os.urandom(37 * (i + 1))
                last_send = time.monotonic()
                s.sendall(msg)
                assert recv_exact(s, len(msg)) == msg
                total += len(msg)
            assert wait_until(lambda: bool(proto.conns))
            assert on_stream(proto.conns[0]) is (HAVE_STREAM and threads == 1)
        assert proto.gone.wait(5)
        running = 0
        for n, received, stamp, now in proto.seen:
            running += n
            assert received == running
            assert t0 <= stamp <= now
        assert running == total
        (exc, received, sent, stamp, lost_at), = proto.final
        assert exc is None and received == total and sent == total
        assert last_send <= stamp <= lost_at
    finally:
        assert_no_leaks(srv.shutdown())


@pytest.mark.parametrize("threads", [1, 4])
def test_bytes_sent_leaves_out_data_dropped_at_close(backend: str, threads: int) -> None:
    class CloseAfterReply(Stamps):
        def data_received(self, conn: Connection, data: bytes) -> None:
            conn.send(data)
            conn.close()
            conn.send(b"dropped: after close()")

    proto = CloseAfterReply()
    srv = Server(lambda: proto, port=0, backend=backend).start(threads=threads)
    try:
        with socket.create_connection(srv.address, timeout=5) as s:
            s.sendall(b"once")
            assert recv_exact(s, 100) == b"once"  # then EOF: nothing else came
            assert proto.gone.wait(5)
        (exc, received, sent, _, _), = proto.final
        assert exc is None and received == 4 and sent == 4
    finally:
        assert_no_leaks(srv.shutdown())


@pytest.mark.skipif(not HAVE_STREAM, reason="the core has no Stream")
@pytest.mark.parametrize("threads", [0, 1])
def test_idle_timeout_on_the_stream_core(backend: str, threads: int) -> None:
    """The idle check (on the loop's timers) reads the stream's own stamp:
    a connection silent for idle_timeout is closed with TimeoutError after
    its last echo, not before; connection_lost sees the counters."""
    proto = Stamps()
    timeout = 0.3
    srv = Server(lambda: proto, port=0, backend=backend, idle_timeout=timeout).start(threads)
    port = srv.completion_port

    def drive(pred: Any, limit: float = 10.0) -> bool:
        if threads:
            return wait_until(pred, limit)
        end = time.monotonic() + limit
        while not pred() and time.monotonic() < end:
            port.run(timeout=0.02)
        return bool(pred())

    try:
        with socket.create_connection(srv.address, timeout=5) as s:
            sent_at = time.monotonic()
            s.sendall(b"ping")
            got = bytearray()
            s.setblocking(False)

            def echoed() -> bool:
                try:
                    got.extend(s.recv(10))
                except BlockingIOError:
                    pass
                return len(got) >= 4

            assert drive(echoed)
            assert bytes(got) == b"ping"
            assert on_stream(proto.conns[0])
            assert drive(proto.gone.is_set)
        (exc, received, sent, stamp, lost_at), = proto.final
        assert isinstance(exc, TimeoutError), exc
        assert received == 4 and sent == 4
        # The echo (its delivery, then its send's completion) was the last
        # activity, and the connection lived idle_timeout past it.
        assert sent_at <= stamp and lost_at - stamp >= timeout
    finally:
        if threads == 0:
            srv.request_shutdown()
        assert_no_leaks(srv.shutdown())
