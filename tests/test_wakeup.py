"""Work submitted from another thread while the poller sleeps in the kernel.

Issue 9, M1: on epoll a multishot accept submitted while another thread sat
in ``epoll_wait`` was only queued for the poller, which nobody woke, so a
connection already waiting in the backlog was not accepted until some
unrelated event arrived.  The property holds on every backend: whatever a
non-polling thread submits or cancels completes without any other event.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Callable, Iterator

import pytest

import iocp

from .helpers import close_all, tcp_pair

BOUND = 5.0  # seconds an op may take to complete once its cause is there


def _wait_blocked_in_kernel(thread: threading.Thread, timeout: float = 5.0) -> None:
    """Returns once `thread` sleeps in the kernel outside a futex (so in the
    port's own wait, not on the GIL or a condition variable).

    This is what makes the tests below fail before the fix rather than pass
    by luck: the submission must find the poller already asleep.  Where
    /proc cannot tell (not Linux), a short pause stands in; the property
    checked holds in either order, only the proof of the old bug needs it.
    """
    tid = thread.native_id
    base = f"/proc/self/task/{tid}"
    if not sys.platform.startswith("linux") or not os.path.exists(f"{base}/wchan"):
        time.sleep(0.2)
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"{base}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"{base}/wchan") as f:
            wchan = f.read().strip()
        if state == "S" and wchan not in ("", "0") and "futex" not in wchan:
            return
        time.sleep(0.001)
    raise AssertionError(f"the loop thread never blocked in the kernel ({state} {wchan})")


class Loop:
    """One thread running ``port.run()``; completions land in `events`."""

    def __init__(self, port: iocp.CompletionPort) -> None:
        self.port = port
        self.done = threading.Event()
        self.completions: list[iocp.Completion] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        try:
            self.port.run(timeout=60, handler=self.on_completion)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def on_completion(self, c: iocp.Completion) -> None:
        self.completions.append(c)
        self.done.set()

    def __enter__(self) -> Loop:
        self.thread.start()
        _wait_blocked_in_kernel(self.thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.port.stop()
        self.thread.join(BOUND)
        assert not self.thread.is_alive(), "run() did not return after stop()"
        assert self.error is None, self.error

    def wait_for(self, pred: Callable[[], bool]) -> None:
        deadline = time.monotonic() + BOUND
        while not pred():
            left = deadline - time.monotonic()
            assert left > 0, f"no completion within {BOUND} s: {self.completions}"
            self.done.wait(left)
            self.done.clear()

    def settle(self) -> None:
        """Waits until the loop thread is asleep in the kernel again."""
        _wait_blocked_in_kernel(self.thread)


@pytest.fixture
def listening(port: iocp.CompletionPort, listener: socket.socket) -> Iterator[socket.socket]:
    port.register(listener)
    yield listener
    port.unregister(listener)


def _connect(listener: socket.socket) -> socket.socket:
    c = socket.create_connection(listener.getsockname(), timeout=BOUND)
    return c


@pytest.mark.parametrize("multishot", [True, False], ids=["multishot", "single"])
def test_accept_of_a_waiting_connection_submitted_while_the_poller_sleeps(
    port: iocp.CompletionPort, listening: socket.socket, multishot: bool
) -> None:
    with Loop(port) as loop:
        client = _connect(listening)  # waits in the backlog; nobody accepts yet
        loop.settle()  # the listener's edge (if any) came and went
        op = port.accept(listening, multishot=multishot)
        loop.wait_for(lambda: any(c.operation is op and c.ok for c in loop.completions))
        if multishot:
            op.cancel()
            loop.wait_for(lambda: op.done)
    for c in loop.completions:
        if c.ok:
            c.data[0].close()
    client.close()


def test_multishot_accept_then_connect_while_the_poller_sleeps(
    port: iocp.CompletionPort, listening: socket.socket
) -> None:
    with Loop(port) as loop:
        op = port.accept(listening, multishot=True)
        loop.settle()
        clients = [_connect(listening) for _ in range(3)]
        loop.wait_for(lambda: sum(1 for c in loop.completions if c.ok) == 3)
        op.cancel()
        loop.wait_for(lambda: op.done)
    for c in loop.completions:
        if c.ok:
            c.data[0].close()
    for s in clients:
        s.close()


def test_recv_of_waiting_data_submitted_while_the_poller_sleeps(
    port: iocp.CompletionPort,
) -> None:
    a, b = tcp_pair()
    port.register(a)
    try:
        with Loop(port) as loop:
            b.sendall(b"waiting")
            loop.settle()
            op = port.recv(a, 100)
            loop.wait_for(lambda: op.done)
        (c,) = loop.completions
        assert c.ok and c.data == b"waiting"
    finally:
        close_all(port, a, b)


def test_cancel_from_another_thread_while_the_poller_sleeps(
    port: iocp.CompletionPort,
) -> None:
    a, b = tcp_pair()
    port.register(a)
    try:
        with Loop(port) as loop:
            op = port.recv(a, 100)
            loop.settle()
            assert op.cancel()
            loop.wait_for(lambda: op.done)
        (c,) = loop.completions
        assert c.cancelled
    finally:
        close_all(port, a, b)


def test_send_behind_a_blocked_send_submitted_while_the_poller_sleeps(
    port: iocp.CompletionPort,
) -> None:
    a, b = tcp_pair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    port.register(a)
    big = b"x" * (4 << 20)
    try:
        with Loop(port) as loop:
            first = port.send(a, big)       # fills the socket buffers and waits
            loop.settle()
            second = port.send(a, b"tail")  # queued behind it from this thread
            got = 0
            deadline = time.monotonic() + 4 * BOUND
            b.settimeout(BOUND)
            while got < len(big) + 4:
                assert time.monotonic() < deadline
                got += len(b.recv(1 << 20))
            loop.wait_for(lambda: first.done and second.done)
        assert all(c.ok for c in loop.completions)
    finally:
        close_all(port, a, b)
