"""io_uring-only tests: what the shared suite cannot see from outside --
multishot accept, provided-buffer receives, CQ overflow under a stalled
consumer, cancel races, the fallback paths and the fallback to epoll.

Everything here skips (never fails) where io_uring cannot run.  The
backend's own environment knobs are used to reach code paths a new kernel
would otherwise never take: IOCP_URING_DISABLE names kernel features to
ignore, IOCP_URING_TEST_STARVE=N makes every Nth SQE request find the SQ
full, IOCP_URING_FAIL_SETUP=1 makes io_uring look unavailable.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

import iocp

from .helpers import close_all, tcp_pair

URING = iocp.backends().get("io_uring")
pytestmark = pytest.mark.skipif(URING is None, reason="io_uring cannot run here")
FEATURES = set(URING or ())

# Feature sets to run the fallback-sensitive tests under.
DISABLE_SETS = [
    "",
    "multishot-accept",
    "provided-buffers",
    "ext-arg",
    "cancel-fd",
    "ext-arg,provided-buffers,multishot-accept,cancel-fd,submit-all",
    "starve",  # every 3rd op/cancel finds the SQ full: the backlog paths
]


@pytest.fixture
def backend() -> str:
    """Overrides the shared fixture: this module is io_uring only."""
    return "io_uring"


@pytest.fixture(params=DISABLE_SETS, ids=lambda s: "all" if not s else "no-" + s.replace(",", "+"))
def disabled(request, monkeypatch) -> str:
    """Ports made in the test ignore these kernel features (read at port
    creation)."""
    monkeypatch.delenv("IOCP_URING_DISABLE", raising=False)
    monkeypatch.delenv("IOCP_URING_TEST_STARVE", raising=False)
    if request.param == "starve":
        monkeypatch.setenv("IOCP_URING_TEST_STARVE", "3")
    elif request.param:
        monkeypatch.setenv("IOCP_URING_DISABLE", request.param)
    return request.param


def drain(port, want, timeout=10.0):
    """Takes completions until `want(list)` is true or the time is up."""
    got = []
    deadline = time.monotonic() + timeout
    while not want(got):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        got.extend(port.get_many(256, min(left, 0.5)))
    return got


def test_features_reported():
    assert "nodrop" in FEATURES and "fast-poll" in FEATURES
    assert list(iocp.backends())[0] == "io_uring"  # best first


def test_default_port_is_io_uring(monkeypatch):
    monkeypatch.delenv("IOCP_BACKEND", raising=False)
    with iocp.CompletionPort() as port:
        assert port.backend == "io_uring"


# ---- multishot accept ---------------------------------------------------


def test_multishot_accept(make_port, listener, disabled):
    port = make_port()
    port.register(listener)
    op = port.accept(listener, multishot=True)
    n = 25
    clients = [socket.create_connection(listener.getsockname()) for _ in range(n)]
    got = drain(port, lambda g: len(g) >= n)
    assert len(got) == n
    peers = set()
    for c in got:
        assert c.ok and c.more and not c.cancelled, c
        conn, _addr = c.data
        # Not _addr: every shot of a multishot op shares one address field
        # in the op record, so only the connection itself is reliable.
        peers.add(conn.getpeername())
        conn.close()
    assert peers == {s.getsockname() for s in clients}
    assert not op.done
    assert op.cancel()
    last = drain(port, lambda g: len(g) >= 1)
    assert len(last) == 1 and last[0].cancelled and not last[0].more
    assert op.done
    close_all(port, listener)
    for s in clients:
        s.close()


def test_multishot_accept_survives_stalled_consumer(make_port, listener):
    """Connections accepted while nobody reaps: with a tiny CQ the kernel's
    multishot ends on overflow and the backend re-arms it -- every
    connection still shows up exactly once."""
    port = make_port(ring_entries=8, queue_capacity=4)
    port.register(listener)
    op = port.accept(listener, multishot=True)
    n = 120
    clients = [socket.create_connection(listener.getsockname()) for _ in range(n)]
    time.sleep(0.2)
    got = drain(port, lambda g: len(g) >= n, timeout=20)
    assert len(got) == n and all(c.more and c.ok for c in got)
    for c in got:
        c.data[0].close()
    op.cancel()
    assert drain(port, lambda g: len(g) >= 1)[0].cancelled
    for s in clients:
        s.close()


# ---- provided buffers ---------------------------------------------------


def test_idle_recvs_pin_no_memory(make_port, disabled):
    port = make_port()
    pairs = [tcp_pair() for _ in range(40)]
    ops = []
    for a, _ in pairs:
        port.register(a)
        ops.append(port.recv(a, 4096))
    port.get(timeout=0.05)  # let the requests reach the kernel
    live = port.stats()["live_buffers"]
    # Probing applies IOCP_URING_DISABLE as the port did.
    if "provided-buffers" in iocp.backends()["io_uring"]:
        assert live == 0
    else:
        assert live == 40  # pool buffers taken at submit
    for i, (_, b) in enumerate(pairs):
        b.sendall(b"x%03d" % i)
    got = drain(port, lambda g: len(g) >= 40)
    assert sorted(c.data for c in got) == sorted(b"x%03d" % i for i in range(40))
    assert port.stats()["live_buffers"] == 0
    for a, b in pairs:
        close_all(port, a)
        b.close()


def test_provided_buffers_run_out_and_pool_takes_over(make_port):
    """More receives complete than the ring has buffers, and the consumer
    holds off: the kernel answers -ENOBUFS and the backend re-issues those
    recvs with pool buffers.  Each buffer goes back exactly once."""
    port = make_port(queue_capacity=4)
    n = 300
    pairs = [tcp_pair() for _ in range(n)]
    for a, _b in pairs:
        port.register(a)
        port.recv(a, 1000)
    for i, (_, b) in enumerate(pairs):
        b.sendall(b"%04d" % i * 50)
    time.sleep(0.3)
    got = drain(port, lambda g: len(g) >= n, timeout=20)
    assert len(got) == n
    assert sorted(c.data for c in got) == sorted(b"%04d" % i * 50 for i in range(n))
    assert port.stats()["live_buffers"] == 0
    for a, b in pairs:
        close_all(port, a)
        b.close()


def test_large_recv_uses_pool(make_port):
    port = make_port()
    a, b = tcp_pair()
    port.register(a)
    port.recv(a, 200_000)  # larger than a ring buffer
    assert port.stats()["live_buffers"] == 1
    b.sendall(b"y" * 150_000)
    got = []
    while sum(len(c.data) for c in got) < 150_000:
        c = port.get(timeout=5)
        assert c is not None and c.ok
        got.append(c)
        if sum(len(c.data) for c in got) < 150_000:
            port.recv(a, 200_000)
    assert port.stats()["live_buffers"] == 0
    close_all(port, a, b)


# ---- CQ overflow --------------------------------------------------------


def test_cq_overflow_loses_nothing(make_port):
    """A tiny ring (8 SQEs, 32 CQEs) and queue (4), thousands of
    completions produced while nobody reaps: the kernel keeps the excess on
    its overflow list and the backend flushes it back.  Each arrives exactly
    once."""
    port = make_port(ring_entries=8, queue_capacity=4)
    n = 5000
    for i in range(n):
        port.post(i, nbytes=i)
    seen = {}
    deadline = time.monotonic() + 30
    while len(seen) < n and time.monotonic() < deadline:
        for c in port.get_many(3, 0.5):
            assert c.key not in seen, f"completion {c.key} delivered twice"
            assert c.nbytes == c.key
            seen[c.key] = True
    assert len(seen) == n
    assert port.get(timeout=0.1) is None


def test_cq_overflow_with_socket_traffic(make_port):
    port = make_port(ring_entries=8, queue_capacity=4)
    pairs = [tcp_pair() for _ in range(64)]
    rounds = 20
    for a, _ in pairs:
        port.register(a)
    for r in range(rounds):
        for i, (a, _) in enumerate(pairs):
            port.send(a, b"%02d%02d" % (i, r))
    got = drain(port, lambda g: len(g) >= 64 * rounds, timeout=30)
    assert len(got) == 64 * rounds and all(c.ok and c.nbytes == 4 for c in got)
    for i, (_, b) in enumerate(pairs):
        data = b""
        b.settimeout(10)
        while len(data) < 4 * rounds:
            data += b.recv(4096)
        assert data == b"".join(b"%02d%02d" % (i, r) for r in range(rounds))
    for a, b in pairs:
        close_all(port, a)
        b.close()


# ---- cancellation races -------------------------------------------------


@pytest.mark.parametrize("kind", ["recv", "recv_into"])
def test_cancel_while_data_arrives(make_port, kind, disabled):
    """Cancel racing with data: each op completes exactly once, either with
    its data or cancelled; every port buffer comes back once."""
    port = make_port()
    n = 150
    pairs = [tcp_pair() for _ in range(n)]
    ops = {}
    for i, (a, _) in enumerate(pairs):
        port.register(a, key=i)
        if kind == "recv":
            ops[i] = port.recv(a, 512)
        else:
            ops[i] = port.recv_into(a, bytearray(512))
    port.get(timeout=0.02)
    for i, (_, b) in enumerate(pairs):
        b.sendall(b"d%03d" % i)
        ops[i].cancel()
    got = drain(port, lambda g: len(g) >= n)
    assert len(got) == n
    assert sorted(c.key for c in got) == list(range(n))  # exactly once each
    for c in got:
        if c.cancelled:
            assert not c.ok
        else:
            data = c.data if kind == "recv" else bytes(c.data[: c.nbytes])
            assert data == b"d%03d" % c.key
    assert port.get(timeout=0.1) is None
    assert port.stats()["live_buffers"] == 0
    for a, b in pairs:
        close_all(port, a)
        b.close()


def test_cancel_big_send_reports_progress(make_port, disabled):
    port = make_port()
    a, b = tcp_pair()
    port.register(a)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    op = port.send(a, bytes(16 << 20))
    port.get(timeout=0.1)
    assert op.cancel()
    c = port.get(timeout=5)
    assert c is not None and c.cancelled
    assert 0 < c.nbytes < (16 << 20)
    assert port.get(timeout=0.1) is None
    close_all(port, a, b)


def test_unregister_cancels_then_close_is_safe(make_port, disabled):
    """Requests hold their file: unregister must stop them before the
    caller closes the descriptor, and the descriptor's next owner must not
    see them."""
    port = make_port()
    a, b = tcp_pair()
    port.register(a)
    ops = [port.recv(a, 100), port.recv_into(a, bytearray(10))]
    port.get(timeout=0.02)
    port.unregister(a)
    fd = a.fileno()
    a.close()
    got = drain(port, lambda g: len(g) >= 2)
    assert len(got) == 2 and all(c.cancelled for c in got)
    assert all(op.done for op in ops)
    # A new socket on the same descriptor number is not affected.
    c2, d2 = tcp_pair()
    if c2.fileno() == fd:
        port.register(c2)
        port.recv(c2, 100)
        d2.sendall(b"fresh")
        c = port.get(timeout=5)
        assert c.ok and c.data == b"fresh"
        close_all(port, c2)
    else:
        c2.close()
    d2.close()
    b.close()


def test_cancel_all_from_close_with_many_pending(listener):
    port = iocp.CompletionPort(backend="io_uring", ring_entries=8)
    port.register(listener)
    port.accept(listener, multishot=True)
    pairs = [tcp_pair() for _ in range(100)]
    for a, _ in pairs:
        port.register(a)
        port.recv(a, 64)
        port.send(a, b"z")
    port.close()  # cancel_all with an 8-entry SQ, then drain
    st = port.stats()
    assert st["inflight"] == 0 and st["live_buffers"] == 0
    for a, b in pairs:
        a.close()
        b.close()


# ---- waiting ------------------------------------------------------------


def test_timeouts_and_wake(make_port, disabled):
    port = make_port()
    t = time.monotonic()
    assert port.get(timeout=0.2) is None
    assert 0.15 < time.monotonic() - t < 2.0
    got = []

    def waiter():
        got.append(port.get(timeout=10))

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.1)
    port.post("hi")
    th.join(5)
    assert not th.is_alive() and got[0].key == "hi"


# ---- fallback to epoll --------------------------------------------------

FALLBACK_SCRIPT = """
import iocp
assert "io_uring" not in iocp.backends(), iocp.backends()
with iocp.CompletionPort() as p:
    print(p.backend)
try:
    iocp.CompletionPort(backend="io_uring")
except OSError as e:
    print("refused", e.errno)
else:
    print("accepted")
"""


def test_fallback_to_epoll_when_setup_fails():
    env = dict(os.environ, IOCP_URING_FAIL_SETUP="1")
    env.pop("IOCP_BACKEND", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert lines[0] == "epoll"
    assert lines[1] == "refused" and int(lines[2]) == 1  # EPERM



def test_fifo_order_under_fallbacks(make_port, disabled):
    """Sends and recvs in flight on one socket keep their order on every
    fallback path: pool recvs instead of provided buffers, one cancel per
    op, a TIMEOUT SQE per wait, and a starved SQ (FIFO heads issued from
    the backlog)."""
    from .test_ordering import _check_stream, _collect, _Reader, _small_buffers

    port = make_port()
    a_client, a_server = tcp_pair()  # a_client sends, a_server reads
    b_client, b_server = tcp_pair()  # b_client writes, b_server receives
    _small_buffers(a_client)
    port.register(a_client)
    port.register(b_server)
    chunks = [bytes([i + 1]) * 100_000 for i in range(20)]
    reader = _Reader(a_server, sum(map(len, chunks)))
    sends = [port.send(a_client, c) for c in chunks]
    recvs = [port.recv(b_server, 3000) if i % 2 else port.recv_into(b_server, bytearray(5000))
             for i in range(8)]
    reader.start()
    stream = bytes(range(256)) * 200  # more than the eight recvs take
    b_client.sendall(stream)
    done = _collect(port, sends + recvs)
    _check_stream(reader.finish(), b"".join(chunks))
    assert all(done[id(op)].ok for op in sends + recvs)
    got = b"".join(
        bytes(done[id(op)].data) if op.kind == "recv"
        else bytes(done[id(op)].data[: done[id(op)].nbytes])
        for op in recvs
    )
    _check_stream(got, stream[: len(got)])
    assert got
    close_all(port, a_client, a_server, b_client, b_server)
