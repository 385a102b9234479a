"""io_uring side of the fast path (issue 10): multishot recv from provided
buffer groups that grow with load, silent sends as linked chains, and the
fallbacks for kernels without those features.

The generic contract is tests/test_fastpath.py; this file checks what only
io_uring does, through the backend's test knobs: IOCP_URING_DISABLE (ignore
kernel features, so a new kernel runs the fallback paths),
IOCP_URING_TEST_STARVE (SQ "full" every Nth request), IOCP_URING_POOL_MAX
(bound of the buffer groups) and IOCP_URING_STATS=1 (the port prints its
counters -- -ENOBUFS seen, growths, waits for buffers, chains -- to stderr
when it closes; read here from a child process).  Everything skips where
io_uring cannot run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

import iocp

from .helpers import close_all, tcp_pair

URING = iocp.backends().get("io_uring")
pytestmark = pytest.mark.skipif(URING is None, reason="io_uring cannot run here")
FEATURES = set(URING or ())

# Feature sets the fallback-sensitive tests run under ("starve": every 3rd
# SQE request finds the SQ full).
DISABLE_SETS = ["", "recv-multishot", "provided-buffers", "send-chain",
                "recv-multishot,send-chain,ext-arg,cancel-fd", "starve"]


@pytest.fixture
def backend() -> str:
    """Overrides the shared fixture: this module is io_uring only."""
    return "io_uring"


@pytest.fixture(params=DISABLE_SETS, ids=lambda s: "all" if not s else "no-" + s.replace(",", "+"))
def disabled(request, monkeypatch) -> str:
    """Ports made in the test ignore these kernel features."""
    monkeypatch.delenv("IOCP_URING_DISABLE", raising=False)
    monkeypatch.delenv("IOCP_URING_TEST_STARVE", raising=False)
    monkeypatch.delenv("IOCP_URING_POOL_MAX", raising=False)
    if request.param == "starve":
        monkeypatch.setenv("IOCP_URING_TEST_STARVE", "3")
    elif request.param:
        monkeypatch.setenv("IOCP_URING_DISABLE", request.param)
    return request.param


def idle(port: iocp.CompletionPort) -> bool:
    """Nothing in flight and nothing left to dispatch."""
    st = port.stats()
    return st["inflight"] == 0 and st["queued"] == 0


def pump(port: iocp.CompletionPort, until, timeout: float = 20.0) -> None:
    """Runs the port until `until()` holds; fails after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out pumping the port"
        port.run_once(0.05)


def stats_of_child(code: str, env: dict[str, str] | None = None) -> dict[str, int]:
    """Runs `code` in a child with IOCP_URING_STATS=1 and returns the sum of
    the counters its ports printed (one line per closed io_uring port)."""
    full_env = dict(os.environ)
    for k in ("IOCP_URING_DISABLE", "IOCP_URING_TEST_STARVE", "IOCP_URING_POOL_MAX"):
        full_env.pop(k, None)
    full_env.update(env or {})
    full_env["IOCP_URING_STATS"] = "1"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=root,
                          env=full_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    total: dict[str, int] = {}
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("iocp-uring-stats")]
    assert lines, proc.stderr
    for ln in lines:
        for word in ln.split()[1:]:
            k, v = word.split("=")
            total[k] = total.get(k, 0) + int(v)
    return total


# A child that arms N multishot recvs on sockets whose data is already
# there, so the kernel picks a buffer for every one of them in the same
# io_uring_enter, before anything is reaped: far more than a group starts
# with.  Checks every byte, that no completion reported an error before
# EOF, and that nothing leaked.
BURST = """
import socket, sys, time
import iocp
from tests.helpers import tcp_pair
n = int(sys.argv[1]) if len(sys.argv) > 1 else {n}
multishot = {multishot}
port = iocp.CompletionPort(backend="io_uring", queue_capacity={qcap})
pairs = [tcp_pair() for _ in range(n)]
got = {{}}
errors = []
finals = []
def cb(i):
    def on(c):
        if c.error is not None:
            errors.append((i, c.error))
        elif c.data:
            got[i] = got.get(i, b"") + c.data
        if not multishot:
            if c.data:
                port.recv(pairs[i][1], 1000, cb(i))
            else:
                finals.append(i)
        elif not c.more:
            finals.append(i)
    return on
for i, (a, b) in enumerate(pairs):
    a.sendall(b"%05d" % i * 100)
    a.shutdown(socket.SHUT_WR)
for i, (a, b) in enumerate(pairs):
    port.register(b)
    if multishot:
        port.recv(b, 0, cb(i), multishot=True)
    else:
        port.recv(b, 1000, cb(i))
deadline = time.monotonic() + 60
while len(finals) < n:
    assert time.monotonic() < deadline, (len(finals), len(got))
    port.run_once(0.1)
assert not errors, errors[:5]
assert all(got[i] == b"%05d" % i * 100 for i in range(n)), "bytes lost or mixed"
st = port.stats()
assert st["live_buffers"] == 0 and st["inflight"] == 0, st
for a, b in pairs:
    port.unregister(b)
    a.close(); b.close()
port.close()
"""


def test_multishot_burst_waits_in_the_sockets_and_surfaces_no_enobufs():
    """1000 sockets ready at once, far past the 256 buffers the 512 B group
    (where a multishot recv starts) begins with: the ring runs dry and the
    backend sees -ENOBUFS, but the caller never does; the recvs wait for
    the buffers to come back (parks) while the data waits in the sockets,
    so a burst of a few reaps leaves the group as it was (every buffer the
    kernel writes once stays resident), and every byte arrives."""
    st = stats_of_child(BURST.format(n=1000, multishot=True, qcap=1024))
    assert st["enobufs"] > 0, st         # the burst did outrun the group ...
    assert st["parks"] > 0, st           # ... and waited for its buffers
    assert st["tiny_bufs"] <= 512, st    # at most one doubling, not one per reap
    assert st["small_bufs"] == 256, st   # small messages took no 4 KiB buffer


# Rounds of the same burst on the same sockets: a shortage that goes on.
REPEATED_BURSTS = """
import sys, time
import iocp
from tests.helpers import tcp_pair
n, rounds = {n}, {rounds}
port = iocp.CompletionPort(backend="io_uring", queue_capacity=1024)
pairs = [tcp_pair() for _ in range(n)]
got = [0] * n
errors = []
def cb(i):
    def on(c):
        if c.error is not None or not c.more:
            errors.append((i, c.error))
        else:
            got[i] += len(c.data)
    return on
for i, (a, b) in enumerate(pairs):
    port.register(b)
    port.recv(b, 0, cb(i), multishot=True)
port.run_once(0.05)
deadline = time.monotonic() + 60
for r in range(1, rounds + 1):
    for a, _ in pairs:
        a.sendall(b"x" * 64)
    while sum(got) < 64 * n * r:
        assert time.monotonic() < deadline, (r, sum(got))
        port.run_once(0.1)
assert not errors, errors[:5]
assert got == [64 * rounds] * n, "bytes lost"
for a, b in pairs:
    port.unregister(b)
    a.close(); b.close()
port.close()
"""


def test_a_shortage_that_goes_on_grows_the_group():
    """The same burst again and again: the ring runs dry in reap after reap,
    and then the group grows -- in proportion to the load, not to the
    bound -- and nothing is lost or surfaced."""
    st = stats_of_child(REPEATED_BURSTS.format(n=1000, rounds=40))
    assert st["enobufs"] > 0, st
    assert 512 <= st["tiny_bufs"] <= 4096, st


# Sockets armed while a burst holds every buffer: some idle, some only at
# their end of stream.  The kernel answers -ENOBUFS to them too (the ring
# is empty when they are issued); they must neither spin nor wait for
# buffers they do not need.
IDLE_IN_A_BURST = """
import socket, time
import iocp
from tests.helpers import tcp_pair
port = iocp.CompletionPort(backend="io_uring", queue_capacity=1024)
busy = [tcp_pair() for _ in range(1000)]
idle = [tcp_pair() for _ in range(100)]
ended = [tcp_pair() for _ in range(100)]
got, finals, errors = {}, set(), []
def cb(key):
    def on(c):
        if c.error is not None:
            errors.append((key, c.error))
        elif c.data:
            got[key] = got.get(key, b"") + c.data
        if not c.more:
            finals.add(key)
    return on
for i, (a, b) in enumerate(busy):
    a.sendall(b"%05d" % i * 20)
for a, b in ended:
    a.shutdown(socket.SHUT_WR)
for group, pairs in (("busy", busy), ("idle", idle), ("ended", ended)):
    for i, (a, b) in enumerate(pairs):
        port.register(b)
        port.recv(b, 0, cb((group, i)), multishot=True)
def pump(until):
    deadline = time.monotonic() + 60
    while not until():
        assert time.monotonic() < deadline, (len(got), len(finals))
        port.run_once(0.1)
pump(lambda: len(got) == 1000 and len(finals) == 100 and
     all(len(got[("busy", i)]) == 100 for i in range(1000)))
assert finals == {("ended", i) for i in range(100)}, "an end of stream was lost"
assert not any(("ended", i) in got for i in range(100))
for i, (a, b) in enumerate(idle):
    a.sendall(b"late%03d" % i)
pump(lambda: all(got.get(("idle", i)) == b"late%03d" % i for i in range(100)))
assert not errors, errors[:5]
assert all(got[("busy", i)] == b"%05d" % i * 20 for i in range(1000))
st = port.stats()
assert st["live_buffers"] == 0, st
for pairs in (busy, idle, ended):
    for a, b in pairs:
        port.unregister(b)
        a.close(); b.close()
port.close()
"""


def test_idle_and_ended_sockets_in_a_burst_neither_spin_nor_wait():
    """Sockets armed while a burst has emptied the ring: the idle ones wait
    on a poll, not for buffers, and get their data when it comes; those at
    their end of stream get it at once."""
    st = stats_of_child(IDLE_IN_A_BURST)
    assert st["enobufs"] > 0, st
    assert st["enobufs"] < 20_000, st    # no re-arm storm
    assert st["idle_waits"] > 0, st


def test_singleshot_burst_grows_instead_of_falling_back():
    """The same burst with single-shot recvs: the group grows instead of
    every recv past the first buffers moving to a pool buffer."""
    st = stats_of_child(BURST.format(n=600, multishot=False, qcap=1024))
    assert st["grows"] >= 2, st
    assert st["small_bufs"] >= 512, st


def test_burst_at_a_tiny_pool_bound_waits_for_buffers():
    """With the groups bounded to 64 KiB (16 small buffers) the burst cannot
    be met by growth: multishot recvs wait for buffers to come back (parks)
    and re-arm, and still nothing is lost or surfaced."""
    st = stats_of_child(BURST.format(n=300, multishot=True, qcap=8),
                        env={"IOCP_URING_POOL_MAX": "65536"})
    assert st["small_bufs"] == 16, st
    assert st["parks"] > 0, st


@pytest.mark.parametrize("knobs", ["recv-multishot", "provided-buffers", "starve"])
def test_burst_under_fallbacks(knobs):
    env = {"IOCP_URING_TEST_STARVE": "3"} if knobs == "starve" else {
        "IOCP_URING_DISABLE": knobs}
    st = stats_of_child(BURST.format(n=300, multishot=True, qcap=16), env=env)
    if knobs == "provided-buffers":
        assert st["pool_bytes"] == 0, st  # poll + pool buffer per arrival


# ---------------------------------------------------------------- multishot


@pytest.mark.parametrize("cap", [0, 65536])
def test_multishot_stream_in_order_then_eof(make_port, disabled, cap):
    """Every byte in order, then EOF; kernel multishot starts on 512 B buffers
    whatever the cap (small messages must not cost 64 KiB each)."""
    port = make_port()
    a, b = tcp_pair()
    port.register(b)
    got: list[iocp.Completion] = []
    port.recv(b, cap, got.append, multishot=True)
    expected = b""
    for i in range(300):
        chunk = (b"%05d," % i) * (1 + i % 50)
        a.sendall(chunk)
        expected += chunk
    # More than a 4 KiB buffer at once: several completions, all in order.
    big = os.urandom(100_000)
    a.sendall(big)
    expected += big
    a.shutdown(socket.SHUT_WR)
    pump(port, lambda: got and not got[-1].more)
    assert all(c.more and c.error is None and c.data for c in got[:-1])
    assert got[-1].data == b"" and got[-1].error is None
    assert b"".join(c.data for c in got) == expected
    if "recv-multishot" not in disabled and "provided-buffers" not in disabled:
        assert max(len(c.data) for c in got) <= 4096
    close_all(port, a, b)


def test_multishot_cap_below_a_buffer_is_honoured(make_port, disabled):
    """A cap smaller than the group's buffers re-arms a single-shot recv of
    that size: no completion exceeds it."""
    port = make_port()
    a, b = tcp_pair()
    port.register(b)
    got: list[iocp.Completion] = []
    port.recv(b, 100, got.append, multishot=True)
    data = os.urandom(5000)
    a.sendall(data)
    pump(port, lambda: sum(len(c.data or b"") for c in got) >= len(data))
    assert all(0 < len(c.data) <= 100 and c.more for c in got)
    assert b"".join(c.data for c in got) == data
    close_all(port, a, b)


def test_idle_multishot_pins_no_buffer(make_port, disabled):
    port = make_port()
    pairs = [tcp_pair() for _ in range(50)]
    got: list[iocp.Completion] = []
    for _, b in pairs:
        port.register(b)
        port.recv(b, 0, got.append, multishot=True)
    port.run_once(0.05)              # the requests reach the kernel
    assert port.stats()["live_buffers"] == 0
    assert not got
    for i, (a, _) in enumerate(pairs):
        a.sendall(b"m%03d" % i)
    pump(port, lambda: len(got) >= 50)
    assert sorted(c.data for c in got) == sorted(b"m%03d" % i for i in range(50))
    assert port.stats()["live_buffers"] == 0   # copied out, given back
    for a, b in pairs:
        close_all(port, a, b)


def test_multishot_refuses_other_recvs(make_port):
    port = make_port()
    a, b = tcp_pair()
    port.register(b)
    op = port.recv(b, 0, None, multishot=True)
    for call in (lambda: port.recv(b, 10), lambda: port.recv_into(b, bytearray(10)),
                 lambda: port.recv(b, 0, None, multishot=True)):
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == 16  # EBUSY
    op.cancel()
    pump(port, lambda: idle(port))
    port.recv(b, 10)                 # free again once it is final
    close_all(port, a, b)


def test_multishot_cancel_and_unregister_complete_it(make_port, disabled):
    port = make_port()
    p1, p2 = tcp_pair(), tcp_pair()
    got1: list[iocp.Completion] = []
    got2: list[iocp.Completion] = []
    port.register(p1[1])
    port.register(p2[1])
    op1 = port.recv(p1[1], 0, got1.append, multishot=True)
    port.recv(p2[1], 0, got2.append, multishot=True)
    p1[0].sendall(b"before")
    p2[0].sendall(b"before")
    pump(port, lambda: got1 and got2)
    op1.cancel()
    port.unregister(p2[1])
    pump(port, lambda: not got1[-1].more and not got2[-1].more)
    for got in (got1, got2):
        assert b"".join(c.data for c in got[:-1]) == b"before"
        assert got[-1].cancelled
    assert port.stats()["inflight"] == 0
    port.register(p2[1])
    close_all(port, *p1, *p2)


def test_multishot_through_a_tiny_queue_loses_nothing(make_port, disabled):
    """queue_capacity=2: the backend never delivers more than fits (the
    rest waits in the CQ or, for a CQE that means two completions, owed),
    and everything arrives in order."""
    port = make_port(queue_capacity=2)
    pairs = [tcp_pair() for _ in range(20)]
    got: dict[int, list[iocp.Completion]] = {i: [] for i in range(20)}
    for i, (_, b) in enumerate(pairs):
        port.register(b)
        port.recv(b, 0, got[i].append, multishot=True)
    for rnd in range(20):
        for i, (a, _) in enumerate(pairs):
            a.sendall(b"%02d:%02d;" % (i, rnd))
    for a, _ in pairs:
        a.shutdown(socket.SHUT_WR)
    pump(port, lambda: all(g and not g[-1].more for g in got.values()))
    assert port.stats()["queue_peak"] <= 2
    for i in range(20):
        assert b"".join(c.data for c in got[i]) == b"".join(
            b"%02d:%02d;" % (i, r) for r in range(20))
    for a, b in pairs:
        close_all(port, a, b)


def test_close_with_multishots_waiting_for_buffers(monkeypatch):
    """A port closed while multishot recvs wait for buffers (a 64 KiB pool,
    callers holding nothing back) completes them all cancelled and leaks
    nothing."""
    monkeypatch.setenv("IOCP_URING_POOL_MAX", "65536")
    port = iocp.CompletionPort(backend="io_uring", queue_capacity=4)
    pairs = [tcp_pair() for _ in range(100)]
    for a, _ in pairs:
        a.sendall(b"z" * 3000)
    ops = []
    for _, b in pairs:
        port.register(b)
        ops.append(port.recv(b, 0, None, multishot=True))
    port.get_many(4, timeout=0.1)    # some arrive, the rest waits
    port.close()
    st = port.stats()
    assert st["live_ops"] == 0 and st["inflight"] == 0 and st["live_buffers"] == 0, st
    for a, b in pairs:
        a.close()
        b.close()


# ---------------------------------------------------------------- silent chains


CHAIN = """
import socket, threading, time
import iocp
from tests.helpers import tcp_pair
a, b = tcp_pair()
port = iocp.CompletionPort(backend="io_uring")
port.register(a)
n, size = {n}, 64
data = bytes(range(256)) * 80
reported = []
total = n * size
got = bytearray()
def reader():
    while len(got) < total:
        chunk = b.recv(1 << 16)
        if not chunk:
            break
        got.extend(chunk)
t = threading.Thread(target=reader, daemon=True)
t.start()
t0 = time.perf_counter()
for i in range(n):
    port.send(a, memoryview(data)[(i * size) % 16384:(i * size) % 16384 + size],
              reported.append, silent=True)
deadline = time.monotonic() + 60
while port.stats()["inflight"] or port.stats()["queued"]:
    assert time.monotonic() < deadline
    port.run_once(0.1)
elapsed = time.perf_counter() - t0
t.join(30)
assert not reported, reported[:3]
def piece(i):
    return bytes(memoryview(data)[(i * size) % 16384:(i * size) % 16384 + size])
assert bytes(got) == b"".join(piece(i) for i in range(n))
print("ELAPSED", elapsed)
port.unregister(a); a.close(); b.close(); port.close()
"""


def test_many_silent_sends_go_out_as_chains():
    """20 000 x 64 B silent sends queued on one socket: they go out as
    linked chains (far fewer ring round trips than sends), every byte in
    order, no completion reported."""
    st = stats_of_child(CHAIN.format(n=20000))
    assert st["chains"] > 0, st
    assert st["chained"] >= 19000, st        # nearly all of them linked
    assert st["chains"] <= 20000 // 16, st   # many sends per chain


def test_silent_sends_without_chains_one_at_a_time():
    st = stats_of_child(CHAIN.format(n=3000), env={"IOCP_URING_DISABLE": "send-chain"})
    assert st["chains"] == 0, st
    assert "send-chain" in FEATURES  # (this kernel has it: the knob took it away)


def test_chain_broken_in_the_middle_reports_the_rest(make_port, disabled):
    """The peer resets while thousands of silent 16 KiB sends are queued:
    the ones sent whole are silent and form a prefix; from the first
    failure on, every send is reported (its error, or cancelled), in order;
    none is lost."""
    port = make_port()
    a, b = tcp_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    port.register(a)
    n = 400
    reported: list[tuple[int, iocp.Completion]] = []
    payload = b"q" * 16384
    for i in range(n):
        port.send(a, payload, lambda c, i=i: reported.append((i, c)), silent=True)
    port.run_once(0.05)
    b.recv(100_000)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    b.close()                        # RST: the queued sends fail
    pump(port, lambda: idle(port))
    assert reported, "a reset must fail some sends"
    idx = [i for i, _ in reported]
    assert idx == sorted(idx)                       # in submission order
    assert idx == list(range(idx[0], n))            # a suffix: every later one
    assert all(c.error is not None for _, c in reported)
    close_all(port, a)


def test_mixed_silent_and_plain_sends_keep_order(make_port, disabled):
    port = make_port()
    a, b = tcp_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    port.register(a)
    plain: list[int] = []
    chunks = [(b"%06d" % i) * (1 + i % 300) for i in range(2000)]
    for i, chunk in enumerate(chunks):
        if i % 7 == 3:
            port.send(a, chunk, lambda c, i=i: plain.append(i) if c.error is None else None)
        elif i % 11 == 5:
            port.sendmsg(a, [chunk[:3], chunk[3:]], None, silent=True)
        else:
            port.send(a, chunk, None, silent=True)
    want = b"".join(chunks)
    got = bytearray()
    b.setblocking(False)

    def drained() -> bool:
        try:
            while True:
                d = b.recv(1 << 16)
                if not d:
                    break
                got.extend(d)
        except BlockingIOError:
            pass
        return len(got) >= len(want) and idle(port)

    pump(port, drained)
    assert bytes(got) == want
    assert plain == [i for i in range(2000) if i % 7 == 3]
    close_all(port, a, b)
