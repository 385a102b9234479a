"""iocp._core.Stream: the connection core (issue 11), on every backend.

Each test drives the port one turn at a time (run_once with a short
timeout) in bounded loops; the peer is a plain blocking or non-blocking
socket read and written by the test itself.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import socket
import struct
import sys
import time

import pytest

import iocp
from iocp._core import Stream

from .helpers import pump, tcp_pair

HAS_UNIX = hasattr(socket, "AF_UNIX")


@pytest.fixture(params=[False, True], ids=["shared", "single"])
def sport(request, make_port):
    """A port, plain and single-issuer."""
    return make_port(single_issuer=request.param)


class Recorder(asyncio.Protocol):
    """An asyncio-style protocol that records every call."""

    def __init__(self, echo: bool = False, keep_open: bool = False) -> None:
        self.echo = echo
        self.keep_open = keep_open
        self.data = bytearray()
        self.calls: list = []
        self.lost: list = []
        self.stream: Stream | None = None

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.data += data
        if self.echo:
            self.stream.write(data)

    def eof_received(self):
        self.calls.append("eof")
        return self.keep_open

    def pause_writing(self) -> None:
        self.calls.append("pause")

    def resume_writing(self) -> None:
        self.calls.append("resume")

    def connection_lost(self, exc) -> None:
        self.lost.append(exc)


def make_stream(port, sock, proto, **kw) -> Stream:
    st = Stream(port, sock, proto, **kw)
    proto.stream = st
    st.start()
    return st


def recv_exactly(sock: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def drain_nonblocking(sock: socket.socket, into: bytearray, most: int) -> bool:
    """Reads what is there (up to `most` bytes); True at EOF."""
    sock.setblocking(False)
    try:
        while most > 0:
            chunk = sock.recv(min(most, 1 << 20))
            if not chunk:
                return True
            into += chunk
            most -= len(chunk)
    except BlockingIOError:
        pass
    return False


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes whose order can be checked (a running counter)."""
    words = (n + 3) // 4
    return struct.pack(f"<{words}I", *range(seed, seed + words))[:n]


# --------------------------------------------------------------------------
# echo


def test_echo_asyncio_protocol(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder(echo=True)
    st = make_stream(sport, a, proto)
    b.settimeout(10)
    for i in range(50):
        msg = b"message %d " % i * (i + 1)
        b.sendall(msg)
        got = b""
        deadline = time.monotonic() + 10
        b.setblocking(False)
        while len(got) < len(msg):
            assert time.monotonic() < deadline
            sport.run_once(0.01)
            try:
                got += b.recv(65536)
            except BlockingIOError:
                pass
        assert got == msg
    assert proto.data == b"".join(b"message %d " % i * (i + 1) for i in range(50))
    st.close()
    pump(sport, lambda: proto.lost)
    assert proto.lost == [None]
    assert a.fileno() == -1
    b.close()


class ConnProto:
    """iocp.server style: every method gets the connection first."""

    def __init__(self) -> None:
        self.events: list = []

    def data_received(self, conn, data) -> None:
        conn.stream.write(data[::-1])

    def eof_received(self, conn):
        self.events.append(("eof", conn.name))
        return False

    def connection_lost(self, conn, exc) -> None:
        self.events.append(("lost", conn.name, exc))


class Conn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.stream: Stream | None = None


def test_echo_conn_style(sport) -> None:
    a, b = tcp_pair()
    proto = ConnProto()
    conn = Conn("c1")
    conn.stream = Stream(sport, a, proto, conn=conn)
    conn.stream.start()
    b.sendall(b"abcdef")
    got = bytearray()
    pump(sport, lambda: drain_nonblocking(b, got, 100) or len(got) >= 6)
    assert bytes(got) == b"fedcba"
    b.shutdown(socket.SHUT_WR)
    pump(sport, lambda: len(proto.events) >= 2)
    assert proto.events == [("eof", "c1"), ("lost", "c1", None)]
    b.close()


class Buffered(asyncio.BufferedProtocol):
    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.data = bytearray()
        self.sizes: list[int] = []
        self.lost: list = []
        self.eof = 0

    def get_buffer(self, sizehint: int):
        assert sizehint > 0
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.sizes.append(nbytes)
        self.data += self.buf[:nbytes]

    def eof_received(self):
        self.eof += 1
        return False

    def connection_lost(self, exc) -> None:
        self.lost.append(exc)


def test_buffered_protocol(sport) -> None:
    a, b = tcp_pair()
    proto = Buffered(7)
    st = Stream(sport, a, proto)
    st.start()
    payload = pattern(100_000)
    b.sendall(payload)
    b.shutdown(socket.SHUT_WR)
    pump(sport, lambda: proto.lost)
    assert bytes(proto.data) == payload
    assert max(proto.sizes) <= 7
    assert proto.eof == 1 and proto.lost == [None]
    b.close()


def test_buffered_protocol_empty_buffer_aborts(make_port) -> None:
    port = make_port()
    seen = []
    port.exception_handler = lambda exc, where: seen.append((exc, where))
    a, b = tcp_pair()
    proto = Buffered(0)
    st = Stream(port, a, proto)
    st.start()
    b.sendall(b"x")
    pump(port, lambda: proto.lost)
    assert isinstance(seen[0][0], RuntimeError) and seen[0][1] is st
    assert proto.lost == [seen[0][0]]
    b.close()


@pytest.mark.skipif(not HAS_UNIX, reason="no AF_UNIX")
def test_unix_stream(sport) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proto = Recorder(echo=True)
    st = make_stream(sport, a, proto)
    b.sendall(b"unix!")
    got = bytearray()
    pump(sport, lambda: drain_nonblocking(b, got, 100) or len(got) >= 5)
    assert bytes(got) == b"unix!"
    st.abort()
    pump(sport, lambda: proto.lost)
    assert proto.lost == [None]
    b.close()


# --------------------------------------------------------------------------
# writing


def test_many_writes_in_one_iteration_are_one_send(sport) -> None:
    a, b = tcp_pair()
    sent = []

    class P(Recorder):
        def data_received(self, data):
            for i in range(100):
                self.stream.write(b"%03d," % i)
            sent.append(self.stream.stats()["sends"])

    proto = P()
    st = make_stream(sport, a, proto)
    b.sendall(b"go")
    pump(sport, lambda: sent)
    assert sent == [0]            # queued, not yet sent
    expect = b"".join(b"%03d," % i for i in range(100))
    assert recv_exactly(b, len(expect)) == expect
    assert st.stats()["sends"] == 1
    # Outside dispatch: writes then port.flush(): one more send.
    st.write(b"x")
    st.write(bytearray(b"y"))
    st.write(memoryview(b"zz"))
    assert st.stats()["queued"] == 4
    # (the first send is silent: its success may not be taken yet)
    assert 4 <= st.get_write_buffer_size() <= 404
    sport.flush()
    assert st.stats()["sends"] == 2
    # (io_uring starts a socket's next send once the earlier one's
    # completion is reaped: pump, do not just block on the peer)
    got = bytearray()
    pump(sport, lambda: drain_nonblocking(b, got, 10) or len(got) >= 4)
    assert bytes(got) == b"xyzz"
    st.close()
    pump(sport, lambda: proto.lost)
    b.close()


def test_more_writes_than_iov_max_keep_order(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    parts = [b"%05d|" % i for i in range(3000)]
    for p in parts:
        st.write(p)
    sport.flush()
    assert st.stats()["sends"] == 1
    expect = b"".join(parts)
    assert recv_exactly(b, len(expect)) == expect
    st.close()
    pump(sport, lambda: proto.lost)
    b.close()


def test_written_buffers_are_copied(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    ba = bytearray(b"before")
    st.write(ba)
    ba[:] = b"AFTER!"
    arr = memoryview(bytearray(b"0123456789"))[::2]   # not contiguous
    st.write(arr)
    sport.flush()
    assert recv_exactly(b, 11) == b"before02468"
    st.close()
    pump(sport, lambda: proto.lost)
    b.close()


@pytest.mark.parametrize("total", [4 << 20])
def test_large_write_slow_reader_flow_control(sport, total) -> None:
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    payload = pattern(total)
    st.write(payload)
    assert proto.calls == ["pause"]
    assert st.get_write_buffer_size() == total
    got = bytearray()
    deadline = time.monotonic() + 60
    while "resume" not in proto.calls:
        assert time.monotonic() < deadline, (len(got), st.stats())
        sport.run_once(0.01)
        drain_nonblocking(b, got, 256 << 10)     # a slow reader
    assert proto.calls == ["pause", "resume"]
    assert st.get_write_buffer_size() <= st.get_write_buffer_limits()[0]
    while len(got) < total:
        assert time.monotonic() < deadline
        sport.run_once(0.01)
        drain_nonblocking(b, got, 1 << 20)
    assert bytes(got) == payload
    st.close()
    pump(sport, lambda: proto.lost)
    assert proto.calls == ["pause", "resume"]
    b.close()


def test_many_writes_slow_reader_keep_order_and_alternate(sport) -> None:
    """A writer that writes whenever it may: pauses and resumes alternate,
    each resume follows a pause, and every byte arrives in order."""
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    st.set_write_buffer_limits(high=32768)
    chunks = [pattern(10_000 + i, seed=i * 7) for i in range(300)]
    expect = b"".join(chunks)
    got = bytearray()
    i = 0
    deadline = time.monotonic() + 60
    while len(got) < len(expect):
        assert time.monotonic() < deadline, (len(got), st.stats(), proto.calls[-3:])
        paused = proto.calls and proto.calls[-1] == "pause"
        while i < len(chunks) and not paused:
            st.write(chunks[i])
            i += 1
            paused = proto.calls and proto.calls[-1] == "pause"
        sport.run_once(0.01)
        drain_nonblocking(b, got, 64 << 10)
    assert bytes(got) == expect
    assert proto.calls.count("pause") >= 2
    for k, call in enumerate(proto.calls):
        assert call == ("pause" if k % 2 == 0 else "resume")
    st.close()
    pump(sport, lambda: proto.lost)
    b.close()


def test_one_byte_per_iteration_writer_gets_resume(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    st.write(b"F" * 200_000)
    assert proto.calls == ["pause"]
    got = bytearray()
    deadline = time.monotonic() + 30
    n = 0
    while "resume" not in proto.calls:
        assert time.monotonic() < deadline, st.stats()
        st.write(b".")          # one byte per loop iteration, never stops
        n += 1
        sport.run_once(0.01)
        drain_nonblocking(b, got, 1 << 20)
    assert proto.calls == ["pause", "resume"]
    st.close()
    while len(got) < 200_000 + n:
        assert time.monotonic() < deadline
        sport.run_once(0.01)
        drain_nonblocking(b, got, 1 << 20)
    assert bytes(got) == b"F" * 200_000 + b"." * n
    pump(sport, lambda: proto.lost)
    assert proto.lost == [None]
    b.close()


def test_close_flushes_first(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    payload = pattern(1 << 20)
    st.write(payload)
    st.close()
    assert st.is_closing()
    st.write(b"late")          # still accepted while data is queued (asyncio does)
    got = bytearray()
    deadline = time.monotonic() + 30
    eof = False
    while not eof:
        assert time.monotonic() < deadline
        sport.run_once(0.01)
        eof = drain_nonblocking(b, got, 1 << 20)
    assert bytes(got) == payload + b"late"
    pump(sport, lambda: proto.lost)
    assert proto.lost == [None]
    b.close()


def test_close_after_silent_sends_finishes(sport) -> None:
    """Sends below the high-water mark are silent; a close() with only
    those in flight still completes (a zero-byte fence wakes the loop)."""
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    st.write(b"small")
    sport.flush()
    assert st.stats()["fences"] == 0
    st.close()
    pump(sport, lambda: proto.lost)
    assert proto.lost == [None]
    assert recv_exactly(b, 10) == b"small"
    b.close()


def test_when_drained_waits_for_the_silent_sends(sport) -> None:
    """when_drained(): True at once with nothing written; after silent
    sends, False, then the callback once a fence confirmed them (the
    native sendfile's empty waiter rests on it); on loss it is called too."""
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    calls: list = []
    assert st.when_drained(lambda: calls.append("early")) is True
    st.write(b"x" * 1000)
    sport.flush()
    assert st.get_write_buffer_size() == 1000  # silent: not yet confirmed
    assert st.when_drained(lambda: calls.append("drained")) is False
    pump(sport, lambda: calls)
    assert calls == ["drained"]
    assert st.get_write_buffer_size() == 0
    assert st.stats()["fences"] >= 1
    assert recv_exactly(b, 1000) == b"x" * 1000
    # Lost before drained: the callback still runs, once.
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    st.write(b"y" * (1 << 22))
    assert st.when_drained(lambda: calls.append("lost")) is False
    st.abort()
    pump(sport, lambda: proto.lost)
    assert calls == ["drained", "lost"]
    b.close()


def test_write_eof_half_close(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    assert st.can_write_eof()
    st.write(b"last words")
    st.write_eof()
    with pytest.raises(RuntimeError):
        st.write(b"more")
    got = bytearray()
    pump(sport, lambda: drain_nonblocking(b, got, 100))
    assert bytes(got) == b"last words"
    # Reading still works after our side is shut.
    b.sendall(b"reply")
    pump(sport, lambda: proto.data == b"reply")
    assert not st.is_closing()
    b.close()
    pump(sport, lambda: proto.lost)
    assert proto.calls == ["eof"] and proto.lost == [None]


# --------------------------------------------------------------------------
# reading


def test_pause_reading_holds_data_and_resume_delivers_in_order(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    b.sendall(b"one,")
    pump(sport, lambda: proto.data == b"one,")
    st.pause_reading()
    assert not st.is_reading()
    b.sendall(b"two,")
    b.sendall(b"three,")
    for _ in range(20):
        sport.run_once(0.01)
    assert proto.data == b"one,"
    pump(sport, lambda: not st.stats()["recv_armed"])
    st.resume_reading()
    assert proto.data == b"one,"   # delivered by the next flush, not here
    pump(sport, lambda: proto.data == b"one,two,three,")
    b.sendall(b"four")
    pump(sport, lambda: proto.data == b"one,two,three,four")
    st.close()
    pump(sport, lambda: proto.lost)
    b.close()


def test_pause_inside_data_received(sport) -> None:
    a, b = tcp_pair()

    class P(Recorder):
        def data_received(self, data):
            super().data_received(data)
            self.stream.pause_reading()

    proto = P()
    st = make_stream(sport, a, proto)
    chunks = [b"<%d>" % i for i in range(30)]
    deliveries = 0
    for c in chunks:
        b.sendall(c)
    b.shutdown(socket.SHUT_WR)
    deadline = time.monotonic() + 20
    while not proto.lost:
        assert time.monotonic() < deadline
        before = len(proto.data)
        for _ in range(3):
            sport.run_once(0.01)
        # Paused after each delivery: at most one delivery per resume.
        if len(proto.data) != before:
            deliveries += 1
        st.resume_reading()
    assert bytes(proto.data) == b"".join(chunks)
    assert proto.calls == ["eof"] and proto.lost == [None]
    assert deliveries >= 1
    b.close()


def test_eof_kept_open_then_write_eof(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder(keep_open=True)
    st = make_stream(sport, a, proto)
    b.sendall(b"request")
    b.shutdown(socket.SHUT_WR)
    pump(sport, lambda: proto.calls == ["eof"])
    assert proto.data == b"request"
    assert not st.is_closing() and not proto.lost
    st.write(b"response")
    st.write_eof()
    got = bytearray()
    pump(sport, lambda: drain_nonblocking(b, got, 100))
    assert bytes(got) == b"response"
    assert not proto.lost
    st.close()
    pump(sport, lambda: proto.lost)
    assert proto.lost == [None]
    b.close()


def test_eof_closes_when_eof_received_is_false(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder(keep_open=False)
    make_stream(sport, a, proto)
    b.sendall(b"bye")
    b.shutdown(socket.SHUT_WR)
    pump(sport, lambda: proto.lost)
    assert proto.data == b"bye" and proto.calls == ["eof"] and proto.lost == [None]
    assert a.fileno() == -1
    b.settimeout(5)
    assert b.recv(10) == b""
    b.close()


def test_peer_reset_is_connection_lost_with_error(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder()
    make_stream(sport, a, proto)
    b.sendall(b"x")
    pump(sport, lambda: proto.data == b"x")
    b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    b.close()
    pump(sport, lambda: proto.lost)
    assert len(proto.lost) == 1
    exc = proto.lost[0]
    assert isinstance(exc, OSError)
    assert isinstance(exc, ConnectionResetError) or exc.errno in (errno.ECONNRESET,
                                                                  errno.EPIPE)


def test_reset_while_writing(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    st.write(b"z" * (8 << 20))
    sport.run_once(0.01)
    b.close()
    deadline = time.monotonic() + 20
    while not proto.lost:
        assert time.monotonic() < deadline
        st.write(b"more")
        sport.run_once(0.01)
    assert len(proto.lost) == 1 and isinstance(proto.lost[0], OSError)
    st.write(b"dropped")       # after the loss: silently dropped
    for _ in range(5):
        sport.run_once(0.01)
    assert len(proto.lost) == 1


# --------------------------------------------------------------------------
# abort, errors, port close


def test_abort_drops_queued_data_and_loses_once(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    st.write(b"never sent")
    st.abort()
    st.abort()
    st.close()
    assert st.is_closing()
    pump(sport, lambda: proto.lost)
    for _ in range(5):
        sport.run_once(0.01)
    assert proto.lost == [None]
    b.settimeout(5)
    try:
        assert b.recv(100) == b""
    except ConnectionResetError:
        pass
    assert st.stats()["sends"] == 0
    b.close()


def test_protocol_exception_goes_to_handler_and_aborts(sport) -> None:
    seen = []
    sport.exception_handler = lambda exc, where: seen.append((exc, where))
    a, b = tcp_pair()

    class Boom(Recorder):
        def data_received(self, data):
            raise ValueError("boom")

    proto = Boom()
    st = make_stream(sport, a, proto)
    b.sendall(b"x")
    pump(sport, lambda: proto.lost)
    assert len(seen) == 1 and isinstance(seen[0][0], ValueError) and seen[0][1] is st
    assert proto.lost == [seen[0][0]]
    b.close()


def test_on_error_hook_and_on_lost(sport) -> None:
    errors = []
    deferred = []
    a, b = tcp_pair()

    class Boom(Recorder):
        def eof_received(self):
            raise KeyError("eof")

    proto = Boom()
    st = Stream(sport, a, proto, on_error=errors.append,
                on_lost=lambda fn, *args: deferred.append((fn, args)))
    st.start()
    b.shutdown(socket.SHUT_WR)
    pump(sport, lambda: deferred)
    assert len(errors) == 1 and isinstance(errors[0], KeyError)
    assert not proto.lost          # on_lost got it instead
    fn, args = deferred[0]
    fn(*args)
    assert proto.lost == [errors[0]]
    b.close()


def test_port_close_with_live_streams_leaks_nothing(make_port, backend) -> None:
    port = make_port()
    protos, peers, socks = [], [], []
    for i in range(6):
        a, b = tcp_pair()
        p = Recorder()
        st = Stream(port, a, p)
        if i != 5:                 # one never started
            st.start()
        if i % 2:
            st.write(b"pending" * 1000)
        if i == 2:
            st.pause_reading()
        if i == 3:
            st.write(b"q" * (4 << 20))
            port.flush()
        protos.append(p)
        peers.append(b)
        socks.append(a)
    peers[0].sendall(b"data")
    port.run_once(0.05)
    port.close()
    for p in protos:
        assert p.lost == [None]
    for s in socks:
        assert s.fileno() == -1
    st = port.stats()
    assert st["live_ops"] == 0 and st["inflight"] == 0 and st["pinned_buffers"] == 0
    for b in peers:
        b.close()


def test_streams_free_their_memory(sport) -> None:
    """A finished stream is collectable (no reference kept by the port)."""
    import weakref

    a, b = tcp_pair()
    proto = Recorder(echo=True)
    st = make_stream(sport, a, proto)
    b.sendall(b"ping")
    got = bytearray()
    pump(sport, lambda: drain_nonblocking(b, got, 10) or len(got) >= 4)
    st.close()
    lost = proto.lost
    pump(sport, lambda: lost)
    ref = weakref.ref(proto)
    sref = weakref.ref(st)
    del st, proto
    gc.collect()
    assert sref() is None
    gc.collect()
    assert ref() is None
    b.close()


def test_get_many_drives_streams(make_port) -> None:
    port = make_port()
    a, b = tcp_pair()
    c, d = tcp_pair()
    port.register(c)
    proto = Recorder(echo=True)
    make_stream(port, a, proto)
    op = port.recv(c, 100)
    b.sendall(b"hi")
    d.sendall(b"plain")
    got = []
    deadline = time.monotonic() + 10
    while not got:
        assert time.monotonic() < deadline
        got = port.get_many(16, 0.05)
    assert [x.operation for x in got] == [op]
    assert all(isinstance(x, iocp.Completion) for x in got)
    pump(port, lambda: proto.data == b"hi")
    port.get_many(16, 0)         # flushes the echo
    assert recv_exactly(b, 2) == b"hi"
    port.unregister(c)
    for s in (b, c, d):
        s.close()


# --------------------------------------------------------------------------
# API surface and bad input


def test_extra_info_limits_protocol(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder()
    st = Stream(sport, a, proto, write_high_water=1000)
    assert st.get_extra_info("socket") is a
    assert st.get_extra_info("sockname") == a.getsockname()
    assert st.get_extra_info("peername") == a.getpeername()
    assert st.get_extra_info("nope", 42) == 42
    assert st.get_write_buffer_limits() == (250, 1000)
    st.set_write_buffer_limits(high=100, low=10)
    assert st.get_write_buffer_limits() == (10, 100)
    st.set_write_buffer_limits(low=10)
    assert st.get_write_buffer_limits() == (10, 40)
    assert st.get_protocol() is proto
    other = Recorder()
    st.set_protocol(other)
    assert st.get_protocol() is other
    assert st.is_reading() and not st.writing_paused
    st.pause_reading()
    assert not st.is_reading()
    st.resume_reading()
    st.start()
    assert st.is_reading() and st.stats()["recv_armed"]
    st.abort()
    pump(sport, lambda: other.lost)
    assert proto.lost == [] and other.lost == [None]
    assert st.get_protocol() is None
    b.close()


def test_addresses_outlive_the_close(sport) -> None:
    """The stream reads its addresses once; after the close (the socket
    gone) get_extra_info still gives them, a fresh peer tuple each time."""
    a, b = tcp_pair()
    want = (a.getsockname(), a.getpeername())
    proto = Recorder()
    st = Stream(sport, a, proto)
    st.start()
    st.abort()
    pump(sport, lambda: proto.lost)
    assert a.fileno() == -1
    assert (st.get_extra_info("sockname"), st.get_extra_info("peername")) == want
    assert st.get_extra_info("peername") is not st.get_extra_info("peername")
    b.close()


def test_data_methods_bound_per_instance_or_switched(sport) -> None:
    """A data_received that is not the class's function (set on the
    instance) is called as it is; set_protocol switches to the new
    protocol's own methods."""
    a, b = tcp_pair()
    got: list = []
    proto = Recorder()
    proto.data_received = lambda data: got.append(("instance", data))
    st = Stream(sport, a, proto)
    st.start()
    b.sendall(b"one")
    pump(sport, lambda: got)
    assert got == [("instance", b"one")] and proto.data == b""
    other = Recorder()
    st.set_protocol(other)
    b.sendall(b"two")
    pump(sport, lambda: other.data)
    assert bytes(other.data) == b"two" and got == [("instance", b"one")]
    st.abort()
    pump(sport, lambda: other.lost)
    b.close()


def test_bad_arguments(make_port) -> None:
    port = make_port()
    a, b = tcp_pair()
    proto = Recorder()
    with pytest.raises(TypeError):
        Stream(object(), a, proto)
    with pytest.raises(TypeError):
        Stream(None, a, proto)
    with pytest.raises(TypeError):
        Stream(port, 5, proto)
    with pytest.raises(TypeError):
        Stream(port, a, None)
    with pytest.raises(TypeError):
        Stream(port, a, object())
    with pytest.raises(TypeError):
        Stream(port, a, proto, on_lost=3)
    with pytest.raises(ValueError):
        Stream(port, a, proto, write_high_water=10, write_low_water=20)
    with pytest.raises(ValueError):
        Stream(port, a, proto, write_high_water=-1)
    with pytest.raises(TypeError):
        Stream(port, a, proto, write_high_water="big")
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(ValueError):
        Stream(port, u, proto)
    u.close()
    closed = socket.socket()
    closed.close()
    with pytest.raises(OSError):
        Stream(port, closed, proto)
    st = Stream(port, a, proto)
    with pytest.raises(TypeError):
        st.write("text")
    with pytest.raises(TypeError):
        st.write(12)
    with pytest.raises(TypeError):
        st.writelines([b"ok", None])
    with pytest.raises(ValueError):
        st.set_write_buffer_limits(high=1, low=2)
    with pytest.raises(TypeError):
        st.set_write_buffer_limits(high=1.5)
    st.write(b"")              # nothing to do
    assert st.get_write_buffer_size() == 2   # b"ok" from writelines
    st.start()
    with pytest.raises(RuntimeError):
        st.start()
    st.abort()
    pump(port, lambda: proto.lost)
    st.set_protocol(Recorder())   # after the loss: nothing to switch, ignored
    assert st.get_protocol() is None
    b.close()


def test_stream_on_closed_port(make_port) -> None:
    port = make_port()
    port.close()
    a, b = tcp_pair()
    with pytest.raises(ValueError):
        Stream(port, a, Recorder())
    a.close()
    b.close()


@pytest.mark.skipif(sys.implementation.name != "cpython", reason="refcounts")
def test_no_per_message_objects(make_port) -> None:
    """Echoing messages allocates no Operation or Completion: the port's
    record count stays flat and nothing is left behind."""
    port = make_port(single_issuer=True)
    a, b = tcp_pair()
    proto = Recorder(echo=True)
    make_stream(port, a, proto)
    b.setblocking(False)
    for i in range(200):
        b.sendall(b"m%03d" % i)
        got = b""
        deadline = time.monotonic() + 10
        while len(got) < 4:
            assert time.monotonic() < deadline
            port.run_once(0.01)
            try:
                got += b.recv(100)
            except BlockingIOError:
                pass
        assert got == b"m%03d" % i
        if i == 10:
            ops_then = port.stats()["live_ops"]
    assert port.stats()["live_ops"] <= ops_then + 1
    b.close()
    pump(port, lambda: proto.lost)


def test_run_drives_streams_and_can_return_on_their_events(make_port) -> None:
    port = make_port()
    a, b = tcp_pair()
    proto = Recorder(echo=True)
    make_stream(port, a, proto)
    b.sendall(b"over run()")
    # Without the flag run() runs out its timeout, flushing the echo
    # before each wait inside it.
    port.run(0.3)
    assert proto.data == b"over run()"
    assert recv_exactly(b, 10) == b"over run()"
    port.return_on_stream_events = True
    b.sendall(b"again")
    t0 = time.monotonic()
    while proto.data != b"over run()again":
        assert time.monotonic() - t0 < 10
        port.run(30)           # returns after the batch that delivered it
    assert recv_exactly(b, 5) == b"again"
    b.close()
    while not proto.lost:
        assert time.monotonic() - t0 < 10
        port.run(30)
    assert proto.lost == [None]


def test_abort_with_exception(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    with pytest.raises(TypeError):
        st.abort("not an exception")
    err = ConnectionError("mine")
    st.abort(err)
    pump(sport, lambda: proto.lost)
    assert proto.lost == [err]
    b.close()


def test_run_sends_what_its_last_callbacks_wrote(make_port) -> None:
    port = make_port()
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(port, a, proto)

    def write_and_stop(c) -> None:
        st.write(b"written in run()'s last batch")
        port.stop()

    port.post(callback=write_and_stop)
    port.run(10)
    assert st.stats()["sends"] == 1
    # No more port turns: the send started before run() returned.
    assert recv_exactly(b, 29) == b"written in run()'s last batch"
    st.close()
    pump(port, lambda: proto.lost)
    b.close()


def test_close_with_nothing_queued_drops_later_writes(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder(keep_open=True)
    deferred = []
    st = Stream(sport, a, proto, on_lost=lambda fn, exc: deferred.append((fn, exc)))
    st.start()
    b.shutdown(socket.SHUT_WR)
    pump(sport, lambda: proto.calls == ["eof"])      # the recv has ended
    st.close()
    # Nothing queued, nothing in flight: connection_lost is handed to
    # on_lost at once, and a write after close() is dropped (asyncio).
    assert len(deferred) == 1 and a.fileno() == -1
    st.write(b"dropped")
    assert st.get_write_buffer_size() == 0
    fn, exc = deferred[0]
    fn(exc)
    assert proto.lost == [None]
    b.settimeout(5)
    assert b.recv(10) == b""
    b.close()


@pytest.mark.parametrize("unpause", [False, True])
def test_set_protocol_while_write_paused(sport, unpause) -> None:
    a, b = tcp_pair()
    first = Recorder()
    st = make_stream(sport, a, first)
    st.write(b"p" * 200_000)
    assert first.calls == ["pause"] and st.writing_paused
    second = Recorder()
    st.set_protocol(second, unpause=unpause)
    assert st.writing_paused is (not unpause)
    got = bytearray()
    deadline = time.monotonic() + 30
    while len(got) < 200_000:
        assert time.monotonic() < deadline
        sport.run_once(0.01)
        drain_nonblocking(b, got, 1 << 20)
    pump(sport, lambda: st.get_write_buffer_size() == 0)
    # Kept paused: the new protocol gets the resume the writer was owed;
    # unpaused: nobody is told anything.
    assert second.calls == ([] if unpause else ["resume"])
    assert first.calls == ["pause"]
    st.close()
    pump(sport, lambda: second.lost)
    b.close()
