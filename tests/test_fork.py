"""fork(): a port belongs to the process that created it.

Issue 9, item 7.  The kernel objects behind a port (the io_uring rings, the
epoll set and its eventfd) are shared with a forked child, so a child that
waits on an inherited port steals the parent's completions (or, on epoll,
its readiness edges and the data behind them), and a child that cancels or
unregisters acts on the parent's operations.  A port used after fork()
raises RuntimeError in the child; closing or dropping it there only frees
the child's copy, and the parent carries on as if nothing happened.

Every scenario runs in a fresh interpreter (or a forked child that always
ends with os._exit), bounded by timeouts, so a regression fails a test
instead of hanging the suite.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest

import iocp

from .helpers import close_all

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX")

BOUND = 10.0  # seconds any single step may take

# The whole parent/child scenario, run as `python -c SCENARIO backend mode`.
# It prints one JSON line: what the child saw and what the parent saw.
SCENARIO = textwrap.dedent(
    r"""
    import gc, json, os, socket, sys, threading, time
    import iocp

    BOUND = 10.0
    backend, mode = sys.argv[1], sys.argv[2]
    port = iocp.CompletionPort(backend=backend)
    a, b = socket.socketpair()
    port.register(a)
    got = threading.Event()
    results = []

    def on_recv(c):
        results.append((c.nbytes, c.data, c.cancelled, repr(c.error)))
        got.set()

    if mode == "idle_drop":
        # Nothing in flight at fork time (so the child's __dealloc__ frees
        # its copy at once), after a round trip that set the backend up.
        port.recv(a, 100)
        b.send(b"warm")
        assert port.get(timeout=BOUND).data == b"warm"
        pending = None
    else:
        pending = port.recv(a, 100, on_recv)   # in flight in the parent across fork()
    runners = []
    if mode == "threads":
        # Parent threads inside run() at fork time: one sleeps in the
        # kernel, one on the port's condition variable.
        for _ in range(2):
            t = threading.Thread(target=port.run, kwargs={"timeout": 4 * BOUND}, daemon=True)
            t.start()
            runners.append(t)
        time.sleep(0.2)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        seen = {}
        def report():
            os.write(wfd, json.dumps(seen).encode())
            os.close(wfd)
        def attempt(name, fn):
            try:
                fn()
                seen[name] = "ok"
            except Exception as exc:
                seen[name] = f"{type(exc).__name__}: {exc}"
        if mode == "use":
            # Each would, on the shared kernel objects, steal or cancel the
            # parent's work.  b.send wakes the parent's recv meanwhile.
            b.send(b"ping")
            attempt("get", lambda: port.get(timeout=1))
            attempt("run", lambda: port.run(timeout=1))
            attempt("recv", lambda: port.recv(a, 10))
            attempt("post", lambda: port.post())
            attempt("cancel", pending.cancel)
            attempt("unregister", lambda: port.unregister(a))
            attempt("register", lambda: port.register(socket.socket()))
            attempt("stop", port.stop)
            attempt("repr", lambda: repr(port))
            attempt("close", port.close)
            seen["closed"] = port.closed
            report()
            os._exit(0)
        if mode in ("close", "threads"):
            attempt("close", port.close)
            seen["closed"] = port.closed
        if mode == "fresh":
            # A port made in the child works, next to the inherited one.
            with iocp.CompletionPort(backend=backend) as mine:
                c, d = socket.socketpair()
                mine.register(c)
                op = mine.recv(c, 10)
                d.send(b"child")
                comp = mine.get(timeout=BOUND)
                seen["fresh"] = comp.data.decode() if comp else None
                mine.unregister(c)
                c.close()
                d.close()
        if mode in ("drop", "idle_drop"):
            del pending
            del port
            gc.collect()
            seen["dropped"] = True
        report()
        if mode == "os_exit":
            os._exit(0)
        # Every other mode ends with a normal interpreter exit: atexit,
        # module teardown, and the port's __dealloc__ in the child.
        sys.exit(0)

    os.close(wfd)
    child = b""
    while True:
        chunk = os.read(rfd, 65536)
        if not chunk:
            break
        child += chunk
    os.close(rfd)
    deadline = time.monotonic() + BOUND
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            status = -1
            break
        time.sleep(0.01)
    out = {"child": json.loads(child or b"{}"), "child_status": status}

    # The parent: its recv still completes, a send round trip works, close returns.
    if pending is None:
        pending = port.recv(a, 100, on_recv)
    if mode != "use":
        b.send(b"ping")
    if not runners:
        t = threading.Thread(target=port.run, kwargs={"timeout": 4 * BOUND}, daemon=True)
        t.start()
        runners.append(t)
    out["recv_done"] = got.wait(BOUND)
    out["recv"] = [(n, d.decode() if d else None, cx, e) for n, d, cx, e in results]
    sent = threading.Event()
    port.send(a, b"pong", lambda c: sent.set())
    out["send_done"] = sent.wait(BOUND)
    b.settimeout(BOUND)
    try:
        out["peer_got"] = b.recv(100).decode()
    except OSError as exc:
        out["peer_got"] = repr(exc)
    closer = threading.Thread(target=port.close, daemon=True)
    closer.start()
    closer.join(BOUND)
    out["close_returned"] = not closer.is_alive()
    for t in runners:
        t.join(BOUND)
    out["runners_returned"] = not any(t.is_alive() for t in runners)
    out["stats"] = port.stats()
    print(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)
    """
)


def _scenario(backend: str, mode: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", SCENARIO, backend, mode],
        capture_output=True,
        text=True,
        timeout=8 * BOUND,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, (proc.stdout, proc.stderr)
    return json.loads(lines[-1])


def _assert_parent_unharmed(out: dict[str, Any]) -> None:
    assert out["child_status"] == 0, out
    assert out["recv_done"], out
    assert out["recv"] == [[4, "ping", False, "None"]], out
    assert out["send_done"], out
    assert out["peer_got"] == "pong", out
    assert out["close_returned"], out
    assert out["runners_returned"], out
    assert out["stats"]["inflight"] == 0, out
    assert out["stats"]["live_ops"] == 0, out


FORK_ERROR = "cannot be used after fork()"


def test_child_use_raises_and_the_parent_keeps_its_completions(backend: str) -> None:
    out = _scenario(backend, "use")
    _assert_parent_unharmed(out)
    child = out["child"]
    for name in ("get", "run", "recv", "post", "cancel", "unregister", "register"):
        assert child[name].startswith("RuntimeError: ") and FORK_ERROR in child[name], child
        assert "created in process " in child[name], child
    assert "create a new port in the child" in child["get"]
    # stop() and repr() touch nothing shared and stay harmless; close() frees
    # the child's copy only.
    assert child["stop"] == child["repr"] == child["close"] == "ok", child
    assert child["closed"] is True


@pytest.mark.parametrize("mode", ["close", "drop", "idle_drop", "os_exit", "fresh", "threads"])
def test_parent_unharmed_by_what_the_child_does(backend: str, mode: str) -> None:
    out = _scenario(backend, mode)
    child = out["child"]
    if mode in ("close", "threads"):
        assert child["close"] == "ok" and child["closed"] is True, child
    if mode == "fresh":
        assert child["fresh"] == "child", child
    _assert_parent_unharmed(out)


def _read_bounded(rfd: int, pid: int) -> str:
    """Everything the child writes to the pipe; kills a child that hangs."""
    data = b""
    deadline = time.monotonic() + BOUND
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([rfd], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the child hung; it said {data!r}")
            chunk = os.read(rfd, 4096)
            if not chunk:
                return data.decode()
            data += chunk
    finally:
        os.close(rfd)


def test_error_names_the_creating_process(make_port) -> None:
    """In-process variant (the fixture's leak check covers the parent's
    port): the child reports the error text through a pipe and os._exit()s."""
    port = make_port()
    a, b = socket.socketpair()
    port.register(a)
    op = port.recv(a, 10)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            try:
                port.get(timeout=0)
                msg = "no error"
            except BaseException as exc:
                msg = f"{type(exc).__name__}: {exc}"
            port.close()
            os.write(wfd, msg.encode())
        finally:
            os._exit(0)
    os.close(wfd)
    msg = _read_bounded(rfd, pid)
    _, status = os.waitpid(pid, 0)
    assert status == 0
    assert msg.startswith("RuntimeError: ") and f"process {os.getpid()}" in msg, msg
    b.send(b"x")
    c = port.get(timeout=BOUND)
    assert c is not None and c.operation is op and c.data == b"x"
    closer = threading.Thread(target=port.close, daemon=True)
    close_all(port, a, b)
    closer.start()
    closer.join(BOUND)
    assert not closer.is_alive(), "close() hung after a child used the port"


def test_server_workers_refuse_a_shared_port() -> None:
    """serve_forever(workers=K) makes one port per worker, after fork();
    a port given to the server cannot be shared that way."""
    with iocp.CompletionPort() as port:
        server = iocp.Server(lambda: None, port=0, completion_port=port)
        with pytest.raises(ValueError, match="fork"):
            server.serve_forever(workers=2, handle_signals=False)
