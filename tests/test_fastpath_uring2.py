"""io_uring side of the fast path (issue 10): the single-issuer ring, the
wake-up that is safe from any thread, and the poll op.

What is checked here and not in tests/test_fastpath.py (the contract on
every backend) is what only io_uring has: each ring setup a single-issuer
port falls back to (forced with IOCP_URING_DISABLE, one subprocess each so
nothing of one setup leaks into the next), the ring being enabled by its
first user rather than its creator (seen from the kernel: another thread's
io_uring_enter is refused with EEXIST), a blocked owner woken by a foreign
thread through the eventfd (such a thread may not enter the ring), and
poll ops (IORING_OP_POLL_ADD, multishot or re-armed one-shot) living next
to recv and send on one socket, ended by cancel and unregister with nothing
left behind.

Everything skips (never fails) where io_uring cannot run.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import iocp

from .helpers import close_all, tcp_pair
from .test_wakeup import _wait_blocked_in_kernel

URING = iocp.backends().get("io_uring")
pytestmark = pytest.mark.skipif(URING is None, reason="io_uring cannot run here")
FEATURES = set(URING or ())
BOUND = 5.0  # seconds a wake-up or completion may take once its cause is there

# IOCP_URING_DISABLE sets, each giving the single-issuer port another setup:
# (disable words, whether the ring is SINGLE_ISSUER).
SETUPS = [
    ("", True),                                   # SINGLE_ISSUER|DEFER_TASKRUN
    ("defer-taskrun", True),                      # SINGLE_ISSUER|COOP_TASKRUN
    ("defer-taskrun,coop-taskrun", True),         # SINGLE_ISSUER
    ("single-issuer", False),                     # COOP_TASKRUN
    ("single-issuer,coop-taskrun", False),        # plain ring
    ("registered-ring", True),                    # no registered ring fd
    ("poll-multishot", True),                     # poll ops and wake re-armed
]


@pytest.fixture
def backend() -> str:
    """Overrides the shared fixture: this module is io_uring only."""
    return "io_uring"


def _uring_fds() -> set[int]:
    """The io_uring descriptors this process has open."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[io_uring]":
                out.add(int(name))
        except OSError:
            pass
    return out


def _enter_errno(fd: int) -> int:
    """io_uring_enter(fd, to_submit=1) from this thread: 0 or the errno
    (EEXIST: a single-issuer ring that belongs to another thread; EBADFD:
    not enabled yet).  Callers make sure the ring has no SQE pending (its
    owner idle after a flush), so a ring that lets this thread in submits
    nothing; the single-issuer check comes before the SQ is looked at."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    nr_io_uring_enter = 426
    r = libc.syscall(ctypes.c_long(nr_io_uring_enter), ctypes.c_int(fd), ctypes.c_uint(1),
                     ctypes.c_uint(0), ctypes.c_uint(0), None, ctypes.c_size_t(0))
    return 0 if r >= 0 else ctypes.get_errno()


class Owner:
    """A thread that runs what it is handed, so a test can make it a
    single-issuer port's owner, look at the port from the test's own thread
    in between, and have the owner close it at the end."""

    def __init__(self) -> None:
        import queue

        self._jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, box, done = job
            try:
                box["value"] = fn()
            except BaseException as exc:  # re-raised by the caller
                box["error"] = exc
            done.set()

    def start(self, fn) -> tuple[dict, threading.Event]:
        """Hands fn over without waiting: (result box, done event)."""
        box: dict = {}
        done = threading.Event()
        self._jobs.put((fn, box, done))
        return box, done

    def call(self, fn, timeout: float = 60.0):
        """Runs fn() on the owner thread; returns its value or raises."""
        box, done = self.start(fn)
        assert done.wait(timeout), "owner thread hung"
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def stop(self) -> None:
        self._jobs.put(None)
        self.thread.join(BOUND)


def _echo(port: iocp.CompletionPort, rounds: int = 20) -> None:
    """Ping-pong over a TCP pair through the port, from the calling thread."""
    client, server = tcp_pair()
    port.register(server)
    got: list[bytes] = []

    def on_recv(c: iocp.Completion) -> None:
        assert c.error is None, c.error
        got.append(c.data)
        if c.data:
            port.send(server, c.data)
            port.recv(server, 100, on_recv)

    port.recv(server, 100, on_recv)
    client.setblocking(False)
    for i in range(rounds):
        msg = b"ping %d" % i
        client.sendall(msg)
        # An event loop's turns: on a single-issuer port what a callback
        # submits may go to the kernel only with the next wait.
        echoed = b""
        deadline = time.monotonic() + BOUND
        while len(echoed) < len(msg):
            assert time.monotonic() < deadline, "echo stalled"
            port.run_once(0.01)
            try:
                echoed += client.recv(100)
            except BlockingIOError:
                pass
        assert echoed == msg
    client.close()
    deadline = time.monotonic() + BOUND
    while not got or got[-1] != b"":
        assert time.monotonic() < deadline, "EOF never came"
        port.run_once(0.1)
    port.unregister(server)
    server.close()


# ---------------------------------------------------------------- setups

_SETUP_SCRIPT = textwrap.dedent(
    """
    import json, os, socket, sys, time
    sys.path.insert(0, os.getcwd())
    import iocp
    from tests.test_fastpath_uring2 import (Owner, _echo, _enter_errno, _uring_fds,
                                            _wait_blocked_in_kernel)

    out = {"features": iocp.backends()["io_uring"]}
    before = _uring_fds()
    port = iocp.CompletionPort(backend="io_uring", single_issuer=True)
    (ring,) = _uring_fds() - before
    out["enter_before_use"] = _enter_errno(ring)

    def polls():
        a, b = socket.socketpair()
        port.register(a)
        seen = []
        port.poll(a, iocp.POLLOUT, seen.append)
        t0 = time.monotonic()
        while not seen and time.monotonic() - t0 < 5:
            port.run_once(0.1)
        out["pollout"] = [seen[0].data, seen[0].more] if seen else None
        events = []
        op = port.poll(a, iocp.POLLIN, events.append, multishot=True)
        for i in range(3):
            b.send(b"x")
            t0 = time.monotonic()
            while len(events) <= i and time.monotonic() - t0 < 5:
                port.run_once(0.1)
            a.recv(10)
        op.cancel()
        t0 = time.monotonic()
        while (not events or events[-1].more) and time.monotonic() - t0 < 5:
            port.run_once(0.1)
        out["pollin"] = [[c.data, c.more, c.cancelled] for c in events]
        port.unregister(a)
        a.close()
        b.close()

    def blocked_run():
        t0 = time.monotonic()
        n = port.run(30)
        return [n, time.monotonic() - t0]

    # The owner is a thread other than the creator (this one).
    owner = Owner()
    owner.call(lambda: _echo(port))
    owner.call(polls)
    out["enter_from_creator"] = _enter_errno(ring)
    box, done = owner.start(blocked_run)
    _wait_blocked_in_kernel(owner.thread)
    port.stop()
    done.wait(30)
    out["blocked_run"] = box.get("value", repr(box.get("error")))
    owner.call(port.close)
    owner.stop()
    out["rings_left"] = len(_uring_fds() - before)
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("disable,single", SETUPS, ids=[d or "best" for d, _ in SETUPS])
def test_single_issuer_setups(disable, single):
    env = dict(os.environ, IOCP_URING_DISABLE=disable)
    env.pop("IOCP_URING_TEST_STARVE", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _SETUP_SCRIPT], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for word in filter(None, disable.split(",")):
        assert word not in out["features"]
    # Unused, a single-issuer ring is still disabled (EBADFD); others answer.
    assert out["enter_before_use"] == (errno.EBADFD if single else 0)
    # Its first user owns it, not its creator: the kernel refuses the creator.
    assert out["enter_from_creator"] == (errno.EEXIST if single else 0)
    assert out["pollout"] == [iocp.POLLOUT, False]
    pollin = out["pollin"]
    assert len(pollin) >= 4, pollin
    assert all(data & iocp.POLLIN and more and not cancelled
               for data, more, cancelled in pollin[:-1]), pollin
    assert pollin[-1][1:] == [False, True], pollin
    # stop() from the creator thread ended the owner's blocked run().
    n, took = out["blocked_run"]
    assert n == 0 and took < BOUND, out["blocked_run"]
    assert out["rings_left"] == 0


# ---------------------------------------------------------------- owner and wake


def test_ring_is_enabled_by_its_first_user_not_its_creator(make_port):
    before = _uring_fds()
    port = make_port(single_issuer=True)
    (ring,) = _uring_fds() - before
    single = "single-issuer" in FEATURES
    if single:
        assert _enter_errno(ring) == errno.EBADFD    # nobody owns it yet
    owner = Owner()
    try:
        owner.call(lambda: _echo(port, rounds=5))
        assert owner.call(lambda: _enter_errno(ring)) == 0
        if single:
            assert _enter_errno(ring) == errno.EEXIST  # the worker owns it
        with pytest.raises(RuntimeError, match="single-issuer"):
            port.run_once(0)
        owner.call(port.close)
    finally:
        owner.stop()


def test_foreign_stop_ends_a_blocked_owner_every_time(make_port):
    port = make_port(single_issuer=True)
    owner = Owner()
    rounds = 50
    try:
        owner.call(port.post)
        assert owner.call(lambda: port.run_once(BOUND)) == 1
        for i in range(rounds):
            box, done = owner.start(lambda: port.run(timeout=30))
            _wait_blocked_in_kernel(owner.thread)
            port.stop()
            assert done.wait(BOUND), f"round {i}: the owner slept through stop()"
            assert box == {"value": 0}, box
        owner.call(port.close)
    finally:
        owner.stop()


def test_foreign_posts_are_delivered_while_the_owner_blocks(make_port):
    port = make_port(single_issuer=True)
    got: list[iocp.Completion] = []
    n_posts = 200
    owner = Owner()

    def loop() -> None:
        deadline = time.monotonic() + 30
        while len(got) < n_posts + 1 and time.monotonic() < deadline:
            port.run_once(5)

    try:
        owner.call(lambda: port.post("first", callback=got.append))
        box, done = owner.start(loop)
        for i in range(n_posts):
            if i % 50 == 0:
                _wait_blocked_in_kernel(owner.thread)
            port.post(i, callback=got.append)
        assert done.wait(40) and "error" not in box, box
        assert [c.key for c in got] == ["first", *range(n_posts)]
        owner.call(port.close)
    finally:
        owner.stop()


def test_wakes_racing_the_owner_are_never_lost(make_port):
    """A thread calling stop() without pause while the owner keeps
    entering and leaving run(): the eventfd is written at most once until
    the owner reaps it, and that bookkeeping races with every return, yet
    each run() ends within the bound; once the stops cease, a wait lasts
    its whole timeout again (no wake-up was left armed)."""
    port = make_port(single_issuer=True)
    owner = Owner()
    stop = threading.Event()

    def stopper() -> None:
        while not stop.is_set():
            port.stop()

    def runs() -> list[float]:
        took = []
        for _ in range(300):
            t0 = time.monotonic()
            assert port.run(timeout=30) == 0
            took.append(time.monotonic() - t0)
        return took

    t = threading.Thread(target=stopper)
    try:
        owner.call(port.post)
        assert owner.call(lambda: port.run_once(BOUND)) == 1
        t.start()
        took = owner.call(runs, timeout=300)
        assert max(took) < BOUND, max(took)
        stop.set()
        t.join(BOUND)

        def quiet_wait() -> float:
            t0 = time.monotonic()
            assert port.run_once(0.3) == 0
            return time.monotonic() - t0

        assert owner.call(quiet_wait) >= 0.25
        owner.call(port.close)
    finally:
        stop.set()
        owner.stop()


# ---------------------------------------------------------------- poll ops


@pytest.fixture(params=[False, True], ids=["multi-thread", "single-issuer"])
def mode(request) -> bool:
    return request.param


@pytest.fixture(params=["", "poll-multishot", "cancel-fd", "starve"],
                ids=["kernel-multishot", "re-armed", "cancel-each", "sq-starved"])
def poll_setup(request, monkeypatch) -> str:
    """Poll ops as the kernel runs them, re-armed one-shot (no multishot
    poll), cancelled one by one at unregister (no cancel by descriptor),
    and with every 3rd SQE refused (the backlog paths)."""
    monkeypatch.delenv("IOCP_URING_TEST_STARVE", raising=False)
    monkeypatch.delenv("IOCP_URING_DISABLE", raising=False)
    if request.param == "starve":
        monkeypatch.setenv("IOCP_URING_TEST_STARVE", "3")
    else:
        monkeypatch.setenv("IOCP_URING_DISABLE", request.param)
    return request.param


def _pump(port, until, timeout=BOUND) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out"
        port.run_once(0.05)


def test_poll_lives_beside_recv_and_send_on_one_socket(make_port, mode, poll_setup):
    port = make_port(single_issuer=mode)
    client, server = tcp_pair()
    port.register(server)
    events: list[iocp.Completion] = []
    recvs: list[iocp.Completion] = []
    sends: list[iocp.Completion] = []
    pop = port.poll(server, iocp.POLLIN, events.append, multishot=True)
    port.recv(server, 100, recvs.append)
    client.sendall(b"abc")
    _pump(port, lambda: recvs and events)
    assert recvs[0].data == b"abc"
    assert events[0].more and events[0].data & iocp.POLLIN
    # A send and a one-shot POLLOUT on the same socket, poll still armed.
    port.send(server, b"reply", sends.append)
    outs: list[iocp.Completion] = []
    port.poll(server, iocp.POLLOUT, outs.append)
    _pump(port, lambda: sends and outs)
    assert sends[0].nbytes == 5 and not outs[0].more and outs[0].data & iocp.POLLOUT
    client.settimeout(BOUND)
    assert client.recv(100) == b"reply"
    # More data: the armed poll hears it again (nobody else reads it now).
    n = len(events)
    client.sendall(b"more")
    _pump(port, lambda: len(events) > n)
    assert all(c.more for c in events)
    pop.cancel()
    _pump(port, lambda: not events[-1].more)
    assert events[-1].cancelled
    assert port.stats()["inflight"] == 0
    close_all(port, client, server)


def test_poll_unregister_and_close_end_it_cancelled(make_port, mode, poll_setup):
    port = make_port(single_issuer=mode)
    fds_before = len(os.listdir("/proc/self/fd"))
    a, b = socket.socketpair()
    port.register(a)
    e1: list[iocp.Completion] = []
    e2: list[iocp.Completion] = []
    port.poll(a, iocp.POLLIN, e1.append, multishot=True)
    port.poll(a, iocp.POLLIN, e2.append)          # one-shot, never ready
    port.run_once(0)
    port.unregister(a)
    _pump(port, lambda: e1 and not e1[-1].more and e2)
    assert e1[-1].cancelled and e2[0].cancelled
    # A poll still armed when the port closes completes cancelled too.
    port.register(a)
    e3: list[iocp.Completion] = []
    port.poll(a, iocp.POLLIN | iocp.POLLOUT, e3.append, multishot=True)
    _pump(port, lambda: e3)                       # writable at once
    assert e3[0].more and e3[0].data & iocp.POLLOUT
    port.close()
    assert e3[-1].cancelled and not e3[-1].more
    a.close()
    b.close()
    assert len(os.listdir("/proc/self/fd")) <= fds_before


def test_poll_reports_hangup(make_port, mode, poll_setup):
    port = make_port(single_issuer=mode)
    a, b = socket.socketpair()
    port.register(a)
    seen: list[iocp.Completion] = []
    port.poll(a, iocp.POLLIN, seen.append)
    b.close()
    _pump(port, lambda: seen)
    assert seen[0].data & (iocp.POLLHUP | iocp.POLLIN)
    assert not seen[0].more and not seen[0].cancelled
    close_all(port, a)


def test_many_single_issuer_ports_leave_no_descriptor():
    """Each port holds a ring and an eventfd; made and closed 40 times on
    one thread (20 at once: past the kernel's 16 registered rings per
    thread), every port works and nothing stays open."""

    def body() -> int:
        fds = len(os.listdir("/proc/self/fd"))
        ports = [iocp.CompletionPort(backend="io_uring", single_issuer=True)
                 for _ in range(20)]
        for p in ports:
            p.post()
            assert p.run_once(BOUND) == 1
        for p in ports:
            p.close()
        for _ in range(20):
            p = iocp.CompletionPort(backend="io_uring", single_issuer=True)
            p.post()
            assert p.run_once(BOUND) == 1
            p.close()
        return len(os.listdir("/proc/self/fd")) - fds

    owner = Owner()
    try:
        assert owner.call(body) <= 0
    finally:
        owner.stop()
