"""Large messages on a multishot recv (issue 10): the buffer size follows
the socket.

A multishot recv starts on small buffers (io_uring: the 512 B provided-
buffer group), so small messages cost small buffers and an idle socket
pins none.  A socket that fills its buffers moves up to larger ones (io_uring:
512 B, 4 KiB, 64 KiB, a size per full buffer), so a 64 KiB message is
about one completion instead of 128, and back down a size at a time after
runs of small arrivals.  epoll reads each arrival whole
(up to 64 KiB) into its scratch buffer; IOCP reads a socket that delivers
large arrivals at the size FIONREAD gives at once.

The bound asserted: a 64 KiB message written by one send over loopback,
once the socket has switched (after the warm-up), arrives in at
most 4 completions (the design gives 1, or 2 when the receiver runs
between the two loopback segments of the message; 4 leaves room for a
segment split more).  With 512 B buffers it would be at least 128.  On
io_uring the switch takes the first two messages (512 B -> 4 KiB ->
64 KiB), so two are warm-up.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import textwrap

import pytest

import iocp

from .helpers import close_all, pump, tcp_pair

BIG = 65536
MAX_COMPLETIONS_PER_BIG = 4


def big_pair() -> tuple[socket.socket, socket.socket]:
    """A loopback pair whose socket buffers hold several 64 KiB messages, so
    one sendall() of a message is one send the kernel takes whole."""
    client, server = tcp_pair()
    for s in (client, server):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return client, server


def message(i: int, size: int) -> bytes:
    """`size` bytes that differ per message and per position."""
    head = b"%08d" % i
    return (head * (size // len(head) + 1))[:size]


def received(got: list[iocp.Completion]) -> int:
    return sum(c.nbytes for c in got if c.ok and c.data)


@pytest.mark.parametrize("cap", [0, BIG], ids=["nocap", "cap64k"])
@pytest.mark.parametrize("single_issuer", [False, True], ids=["mt", "si"])
def test_big_messages_take_few_completions(make_port, cap, single_issuer):
    port = make_port(single_issuer=single_issuer)
    client, server = big_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    op = port.recv(server, cap, got.append, multishot=True)
    expected = b""
    per_message = []
    for i in range(9):           # messages 0 and 1 are the warm-up (the switch)
        msg = message(i, BIG)
        before = len(got)
        expected += msg
        client.sendall(msg)
        want = len(expected)
        pump(port, lambda want=want: received(got) >= want)
        per_message.append(len(got) - before)
    assert all(c.more and c.ok for c in got), [c for c in got if not c.ok][:3]
    assert max(per_message[2:]) <= MAX_COMPLETIONS_PER_BIG, per_message
    assert all(c.nbytes <= BIG for c in got)
    # Small messages afterwards: one completion each, every byte.
    for i in range(40):
        msg = message(i, 100)
        before = len(got)
        expected += msg
        client.sendall(msg)
        want = len(expected)
        pump(port, lambda want=want: received(got) >= want)
        assert len(got) - before == 1 and got[-1].data == msg
    client.close()
    pump(port, lambda: op.done)
    assert b"".join(c.data for c in got if c.data) == expected
    assert got[-1].eof and not got[-1].more
    close_all(port, server)


def test_mixed_sizes_keep_every_byte_in_order(make_port):
    """Sizes that cross the switch both ways, many times, with more than
    one message in flight: nothing lost, nothing reordered."""
    port = make_port()
    client, server = big_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    op = port.recv(server, 0, got.append, multishot=True)
    rng = random.Random(10)
    sizes = []
    for _ in range(12):
        sizes += [rng.randrange(1, 300) for _ in range(rng.randrange(1, 40))]
        sizes += [rng.randrange(4096, 3 * BIG) for _ in range(rng.randrange(1, 5))]
    expected = b""
    batch = b""
    for i, size in enumerate(sizes):
        msg = message(i, size)
        expected += msg
        batch += msg
        if i % 3 == 2 or size > 4096:
            client.sendall(batch)
            batch = b""
            want = len(expected)
            pump(port, lambda want=want: received(got) >= want)
    client.sendall(batch)
    client.shutdown(socket.SHUT_WR)
    pump(port, lambda: op.done)
    data = b"".join(c.data for c in got if c.data)
    assert len(data) == len(expected) and data == expected
    assert all(c.more for c in got[:-1]) and got[-1].eof
    assert all(c.nbytes <= BIG for c in got)
    close_all(port, client, server)


def test_cancel_right_after_a_big_message(make_port):
    """A cancel while the socket is switching buffer sizes (io_uring: its
    own cancel of the armed request is out) still ends the op cancelled,
    once, with every byte that came before it."""
    port = make_port()
    client, server = big_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    op = port.recv(server, 0, got.append, multishot=True)
    msg = message(1, 3 * BIG)
    client.sendall(msg)
    pump(port, lambda: got)
    assert op.cancel() is True
    pump(port, lambda: op.done)
    finals = [c for c in got if not c.more]
    assert len(finals) == 1 and finals[0] is got[-1]
    data = b"".join(c.data for c in got if c.data)
    assert msg.startswith(data)
    # What the cancel left in the socket is read by the next recv.
    rest = []
    op2 = port.recv(server, 0, rest.append, multishot=True)
    pump(port, lambda: len(data) + received(rest) >= len(msg))
    assert data + b"".join(c.data for c in rest) == msg
    op2.cancel()
    pump(port, lambda: op2.done)
    close_all(port, client, server)


def test_idle_socket_after_big_messages_pins_nothing(make_port):
    port = make_port()
    client, server = big_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    op = port.recv(server, 0, got.append, multishot=True)
    for i in range(3):
        client.sendall(message(i, BIG))
    pump(port, lambda: received(got) >= 3 * BIG)
    port.run_once(0)
    st = port.stats()
    assert st["live_buffers"] == 0 and st["pinned_buffers"] == 0, st
    op.cancel()
    pump(port, lambda: op.done)
    close_all(port, client, server)


# ------------------------------------------------- io_uring: the switch itself

URING = iocp.backends().get("io_uring")

# A child: big messages, then small ones, on one multishot recv; the port
# prints its counters when it closes (IOCP_URING_STATS=1).
SWITCH = """
import socket, iocp
from tests.helpers import tcp_pair, pump
port = iocp.CompletionPort(backend="io_uring", single_issuer={si})
client, server = tcp_pair()
for s in (client, server):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
port.register(server)
got = []
op = port.recv(server, 0, got.append, multishot=True)
n = 0
counts = []
for size, count in {plan}:
    for i in range(count):
        before = len(got)
        client.sendall(b"x" * size)
        n += size
        pump(port, lambda: sum(c.nbytes for c in got) >= n)
        counts.append(len(got) - before)
print(counts)
op.cancel()
pump(port, lambda: op.done)
assert sum(c.nbytes for c in got) == n
port.unregister(server)
port.close()
"""


def switch_stats(plan: list[tuple[int, int]], si: bool = False,
                 disable: str = "") -> tuple[dict[str, int], list[int]]:
    """Runs SWITCH in a child: the port's counters, and the completions
    each message took."""
    env = dict(os.environ, IOCP_URING_STATS="1")
    for k in ("IOCP_URING_DISABLE", "IOCP_URING_TEST_STARVE", "IOCP_URING_POOL_MAX"):
        env.pop(k, None)
    if disable:
        env["IOCP_URING_DISABLE"] = disable
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = textwrap.dedent(SWITCH.format(si=si, plan=plan))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("iocp-uring-stats")]
    assert len(line) == 1, proc.stderr
    counts = [int(x) for x in proc.stdout.strip().strip("[]").split(",") if x.strip()]
    return {k: int(v) for k, v in (w.split("=") for w in line[0].split()[1:])}, counts


@pytest.mark.skipif(URING is None, reason="io_uring cannot run here")
@pytest.mark.parametrize("si", [False, True], ids=["mt", "si"])
def test_uring_switches_up_once_and_down_after_a_run_of_small(si):
    # Only small: never leaves the 512 B group, no 64 KiB buffer made.
    st, counts = switch_stats([(100, 40)], si=si)
    assert st["regroups"] == 0 and st["large_bufs"] == 0, st
    assert counts == [1] * 40
    # Big then small: up at the first full small buffer (the first message
    # still comes in 512 B pieces, the second in 4 KiB ones: two switches up),
    # down after the run of small arrivals
    # (16), not before.  14, not 15: the last big message's tail segment
    # may come as an arrival of its own and count as a small one.
    st, counts = switch_stats([(BIG, 5), (100, 14)], si=si)
    assert st["regroups"] == 2 and st["large_bufs"] > 0, st
    assert counts[0] >= 2 and max(counts[2:5]) <= MAX_COMPLETIONS_PER_BIG, counts
    # Down one size per run: 64 KiB -> 4 KiB -> 512 B buffers.
    st, _ = switch_stats([(BIG, 5), (100, 40)], si=si)
    assert st["regroups"] == 4, st
    # Short runs of small messages between big ones do not switch down.
    st, counts = switch_stats([(BIG, 3), (100, 5), (BIG, 3), (100, 5), (BIG, 3)], si=si)
    assert st["regroups"] == 2, st
    assert max(counts[2:]) <= MAX_COMPLETIONS_PER_BIG, counts


@pytest.mark.skipif(URING is None, reason="io_uring cannot run here")
@pytest.mark.skipif("recv-multishot" not in (URING or ()), reason="no kernel multishot recv")
def test_uring_emulated_multishot_switches_without_cancels():
    """Where the kernel has no multishot recv, every arrival re-arms a
    single-shot recv anyway: the group changes at the re-arm, with no
    cancel of our own."""
    st, counts = switch_stats([(BIG, 5), (100, 40)], disable="recv-multishot")
    assert st["regroups"] == 0 and st["large_bufs"] > 0, st
    assert max(counts[2:5]) <= MAX_COMPLETIONS_PER_BIG, counts
    assert counts[5:] == [1] * 40


# Feature sets of tests/test_fastpath_uring.py: the switch on every
# fallback path ("starve": every 3rd SQE request finds the SQ full, so the
# switch's own cancel waits on the cancel backlog).
URING_SETS = ["", "recv-multishot", "provided-buffers", "cancel-fd,ext-arg", "starve"]


@pytest.mark.skipif(URING is None, reason="io_uring cannot run here")
@pytest.mark.parametrize("knobs", URING_SETS, ids=lambda s: "all" if not s else "no-" + s)
@pytest.mark.parametrize("si", [False, True], ids=["mt", "si"])
def test_uring_switching_on_every_fallback_keeps_every_byte(backend, make_port, monkeypatch,
                                                            knobs, si):
    if backend != "io_uring":
        pytest.skip("io_uring feature sets")
    monkeypatch.delenv("IOCP_URING_DISABLE", raising=False)
    monkeypatch.delenv("IOCP_URING_TEST_STARVE", raising=False)
    monkeypatch.delenv("IOCP_URING_POOL_MAX", raising=False)
    if knobs == "starve":
        monkeypatch.setenv("IOCP_URING_TEST_STARVE", "3")
    elif knobs:
        monkeypatch.setenv("IOCP_URING_DISABLE", knobs)
    port = make_port(single_issuer=si)
    client, server = big_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    op = port.recv(server, 0, got.append, multishot=True)
    expected = b""
    # Up, down, up again, with a cancel and a new recv in the middle.
    plan = [BIG] * 3 + [100] * 20 + [BIG] * 3 + [3 * BIG] + [50] * 3
    for i, size in enumerate(plan):
        msg = message(i, size)
        expected += msg
        client.sendall(msg)
        want = len(expected)
        pump(port, lambda want=want: received(got) >= want)
    assert op.cancel() is True
    pump(port, lambda: op.done)
    assert got[-1].cancelled and all(c.more for c in got[:-1])
    op = port.recv(server, 0, got.append, multishot=True)
    for i in range(3):
        msg = message(100 + i, BIG)
        expected += msg
        client.sendall(msg)
    client.shutdown(socket.SHUT_WR)
    pump(port, lambda: op.done)
    assert b"".join(c.data for c in got if c.data) == expected
    assert got[-1].eof and all(c.nbytes <= BIG for c in got)
    close_all(port, client, server)
