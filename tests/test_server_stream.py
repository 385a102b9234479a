"""iocp._core.Stream's face for iocp.server, on every backend: the C byte
counters and activity stamp, and server_write() (bind_server): the
thread, state and write-limit checks of Connection.send.

The helpers are tests/test_stream.py's."""

from __future__ import annotations

import threading
import time

import pytest

from .helpers import pump, tcp_pair
from .test_stream import Recorder, drain_nonblocking, make_stream, pattern


@pytest.fixture(params=[False, True], ids=["shared", "single"])
def sport(request, make_port):
    """A port, plain and single-issuer."""
    return make_port(single_issuer=request.param)



def test_counters_exact_after_echo(sport) -> None:
    """bytes_received / bytes_sent / last_activity are exact once the echo
    is done and the stream is lost; the stamp is time.monotonic()'s clock."""
    a, b = tcp_pair()
    proto = Recorder(echo=True)
    t0 = time.monotonic()
    st = make_stream(sport, a, proto)
    assert st.bytes_received == 0 and st.bytes_sent == 0
    assert t0 <= st.last_activity <= time.monotonic()
    total = 0
    for i in range(20):
        msg = pattern(100 * (i + 1), seed=i)
        before = time.monotonic()
        b.sendall(msg)
        got = bytearray()
        pump(sport, lambda g=got, m=msg: drain_nonblocking(b, g, len(m)) or len(g) >= len(m))
        assert bytes(got) == msg
        total += len(msg)
        assert st.bytes_received == total
        assert before <= st.last_activity <= time.monotonic()
    st.close()
    pump(sport, lambda: proto.lost)
    assert proto.lost == [None]
    assert st.bytes_received == total and st.bytes_sent == total
    assert st.last_activity <= time.monotonic()
    b.close()


def test_bytes_sent_leaves_out_dropped_writes(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    st.write(b"sent")
    sport.flush()
    st.write(b"never sent")
    st.abort()
    pump(sport, lambda: proto.lost)
    # The first send may or may not have left before the abort cancelled
    # it; the queued one never did.
    assert st.bytes_sent in (0, 4)
    assert st.bytes_received == 0
    b.close()


def test_server_write_checks_thread_state_and_limit(sport) -> None:
    a, b = tcp_pair()
    proto = Recorder()
    st = make_stream(sport, a, proto)
    cell = [None]
    foreign: list = []
    over: list = []
    st.bind_server(cell, 1000, foreign.append, lambda: over.append(True))
    # Nobody dispatches: the write goes to `foreign`, copied into bytes.
    buf = bytearray(b"abc")
    st.server_write(buf)
    buf[0] = ord("x")
    assert foreign == [b"abc"] and type(foreign[0]) is bytes
    assert st.get_write_buffer_size() == 0
    # Another thread dispatches: the same.
    t = threading.Thread(target=lambda: cell.__setitem__(0, threading.get_ident()))
    t.start()
    t.join()
    st.server_write(b"def")
    assert foreign == [b"abc", b"def"]
    # This thread dispatches: queued.
    cell[0] = threading.get_ident()
    st.server_write(memoryview(b"ghi"))
    st.server_write_here(b"jkl")
    assert st.get_write_buffer_size() == 6 and foreign == [b"abc", b"def"]
    assert st.bytes_sent == 0
    # Past the limit (1000 > high water here is not needed: n + high > limit).
    st.server_write(b"z" * 1001)
    assert over == [True] and st.get_write_buffer_size() == 6
    got = bytearray()
    pump(sport, lambda: drain_nonblocking(b, got, 6) or len(got) >= 6)
    assert bytes(got) == b"ghijkl"
    pump(sport, lambda: st.bytes_sent == 6)
    # Dropped after write_eof() and after close(), with no error.
    st.write_eof()
    st.server_write(b"dropped")
    st.close()
    st.server_write_here(b"dropped")
    pump(sport, lambda: proto.lost)
    assert st.bytes_sent == 6
    with pytest.raises(TypeError):
        st.server_write("text")
    with pytest.raises(TypeError):
        st.bind_server(None, 0, foreign.append, foreign.append)
    with pytest.raises(ValueError):
        st.bind_server([None], -1, foreign.append, foreign.append)
    b.close()
