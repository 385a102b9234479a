"""Cooperative ports (``CompletionPort(cooperative=True)``): on io_uring the
ring is set up with COOP_TASKRUN | TASKRUN_FLAG, so a completion the
kernel finishes in task work never interrupts the thread that started the
operation; that thread runs it when it next enters the kernel or sleeps.

The contract checked on every backend: a completion whose operation was
started by another thread still reaches the thread waiting on the port,
whether the starter then sleeps, waits on an Event or spins in Python.
On io_uring: which setup the ring got (IOCP_URING_STATS=1 prints it), and
that iocp.Server and iocp.Client ask for it exactly when they run at most
one loop thread.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import iocp
from iocp.server import Client, Server

from .helpers import close_all, tcp_pair

BOUND = 20.0  # seconds; a stuck completion fails the test instead of hanging it
COOP_BITS = 0x300  # (768) IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG


def _recv_started_by_other_thread(port: iocp.CompletionPort, then: str) -> bytes:
    """A worker thread starts a recv and then does `then` ("sleep", "wait"
    or "spin") until this thread, waiting on the port, got the data."""
    client, server = tcp_pair()
    got: list[bytes] = []
    started = threading.Event()
    delivered = threading.Event()
    port.register(server)

    def starter() -> None:
        port.recv(server, 100, lambda c: got.append(c.data))
        started.set()
        deadline = time.monotonic() + BOUND
        if then == "sleep":
            while not delivered.is_set() and time.monotonic() < deadline:
                time.sleep(0.2)
        elif then == "wait":
            delivered.wait(BOUND)
        else:  # spin in user code, no system call of its own
            n = 0
            while not delivered.is_set() and time.monotonic() < deadline:
                n += 1

    worker = threading.Thread(target=starter)
    worker.start()
    try:
        assert started.wait(BOUND)
        client.sendall(b"hello")
        deadline = time.monotonic() + BOUND
        while not got and time.monotonic() < deadline:
            port.run_once(0.05)
        delivered.set()
    finally:
        delivered.set()
        worker.join(BOUND)
        close_all(port, client, server)
    assert got, f"the completion never reached the waiting thread ({then})"
    return got[0]


@pytest.mark.parametrize("then", ["sleep", "wait", "spin"])
def test_completion_of_another_threads_op_reaches_the_waiter(make_port, then):
    port = make_port(cooperative=True)
    assert port.cooperative and not port.single_issuer
    assert _recv_started_by_other_thread(port, then) == b"hello"


def test_single_issuer_implies_cooperative(make_port):
    assert make_port(single_issuer=True).cooperative
    assert not make_port().cooperative


# ---------------------------------------------------------------- io_uring setup

URING = iocp.backends().get("io_uring")
needs_uring = pytest.mark.skipif(URING is None, reason="io_uring cannot run here")


def _setup_flags_of_child(code: str, disable: str = "") -> list[int]:
    """Runs `code` in a child with IOCP_URING_STATS=1; the setup flags of
    each io_uring port it closed, in order."""
    env = dict(os.environ, IOCP_URING_STATS="1", IOCP_URING_DISABLE=disable,
               IOCP_BACKEND="io_uring")
    env.pop("IOCP_URING_TEST_STARVE", None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    flags = [int(word.split("=")[1]) for line in proc.stderr.splitlines()
             if line.startswith("iocp-uring-stats")
             for word in line.split() if word.startswith("setup_flags=")]
    assert flags, proc.stderr
    return flags


_PORTS = """
import iocp
from tests.test_cooperative import _recv_started_by_other_thread
for coop in (True, False):
    port = iocp.CompletionPort(cooperative=coop)
    assert _recv_started_by_other_thread(port, "spin") == b"hello"
    port.close()
"""


@needs_uring
def test_cooperative_ring_is_set_up_with_coop_taskrun():
    coop, plain = _setup_flags_of_child(_PORTS)
    if "coop-taskrun" in URING:
        assert coop & COOP_BITS == COOP_BITS, hex(coop)
    assert plain & COOP_BITS == 0, hex(plain)


@needs_uring
def test_cooperative_port_falls_back_where_the_kernel_lacks_coop_taskrun():
    coop, plain = _setup_flags_of_child(_PORTS, disable="coop-taskrun")
    assert coop & COOP_BITS == 0 and plain & COOP_BITS == 0


# ---------------------------------------------------------------- Server and Client

class _Echo:
    def data_received(self, conn, data: bytes) -> None:  # type: ignore[no-untyped-def]
        conn.send(data)


@pytest.mark.parametrize("threads,coop", [(0, True), (1, True), (2, False)])
def test_server_port_is_cooperative_with_at_most_one_loop_thread(backend, threads, coop):
    server = Server(_Echo, host="127.0.0.1", port=0, backend=backend)
    server.start(threads=threads)
    try:
        assert server.completion_port.cooperative is coop
        if threads:
            client = Client(_Echo, "127.0.0.1", server.address[1], backend=backend)
            conn = client.connect(timeout=BOUND)
            try:
                assert client.completion_port.cooperative
                conn.send(b"ping")
            finally:
                client.close()
    finally:
        server.shutdown(BOUND)
