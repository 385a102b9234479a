"""The fast-path surface of the port (issue 10), on every backend: multishot
recv, silent sends, poll, run_once and single-issuer ports.

Multishot recv and poll are carried out by the backends; the rest (the
Python surface, silent-send emulation, run_once, single-issuer checks) by
the core, so those tests hold on every backend whatever it implements."""

from __future__ import annotations

import contextlib
import errno
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import iocp
from tests.helpers import close_all, pump, tcp_pair

# iocp_native.h: a single-issuer port used from a thread that does not own it.
EWRONGTHREAD = -0x20000002


def read_ready(sock: socket.socket, into: bytearray) -> int:
    """Appends what `sock` has ready (without blocking); returns the total."""
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            into.extend(chunk)
    except BlockingIOError:
        pass
    return len(into)


def settled(port: iocp.CompletionPort) -> bool:
    st = port.stats()
    return st["live_ops"] == 0 and st["inflight"] == 0 and st["pinned_buffers"] == 0


# ---------------------------------------------------------------- multishot recv


def test_multishot_recv_gets_every_byte_in_order_then_eof(port):
    client, server = tcp_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    op = port.recv(server, 4096, got.append, multishot=True)
    expected = b""
    for i in range(200):
        chunk = (b"%05d:" % i) * (1 + i % 7)
        expected += chunk
        client.sendall(chunk)
        want = len(expected)
        pump(port, lambda want=want: sum(c.nbytes for c in got) >= want)
    client.close()
    pump(port, lambda: op.done)
    assert all(c.more and c.ok and c.data for c in got[:-1]), got[:5]
    assert b"".join(c.data for c in got) == expected
    last = got[-1]
    assert not last.more and last.eof and last.data == b""
    assert len(got) >= 2 and op.done
    close_all(port, server)


def test_multishot_recv_ends_on_cancel(port):
    client, server = tcp_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    op = port.recv(server, 0, got.append, multishot=True)
    client.sendall(b"first")
    pump(port, lambda: got)
    assert got[0].more and got[0].data == b"first"
    assert op.cancel() is True
    pump(port, lambda: op.done)
    assert b"".join(c.data or b"" for c in got) == b"first"
    assert got[-1].cancelled and not got[-1].more and got[-1].error is not None
    assert all(c.more for c in got[:-1])
    close_all(port, client, server)


def test_recv_while_multishot_recv_is_armed_is_ebusy(port):
    client, server = tcp_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    op = port.recv(server, 1024, got.append, multishot=True)
    for call in (lambda: port.recv(server, 10), lambda: port.recv_into(server, bytearray(8)),
                 lambda: port.recv(server, 10, multishot=True)):
        with pytest.raises(OSError) as info:
            call()
        assert info.value.errno == errno.EBUSY
    assert port.stats()["live_ops"] == 1 and port.stats()["pinned_buffers"] == 0
    op.cancel()
    pump(port, lambda: op.done)
    # Once it ended, recv works again on the socket.
    client.sendall(b"again")
    port.recv(server, 10, got.append)
    pump(port, lambda: got and got[-1].data == b"again")
    close_all(port, client, server)


def test_multishot_recv_argument_checks(port):
    client, server = tcp_pair()
    port.register(server)
    with pytest.raises(ValueError):
        port.recv(server, 0)
    with pytest.raises(ValueError):
        port.recv(server, -1, multishot=True)
    assert settled(port)
    close_all(port, client, server)


# ---------------------------------------------------------------- silent sends


@pytest.mark.parametrize("how", ["send", "sendmsg"])
def test_silent_send_success_runs_no_callback_and_leaks_nothing(port, how):
    client, server = tcp_pair()
    port.register(server)
    called: list[iocp.Completion] = []
    payload = b""
    for i in range(50):
        part = b"msg%03d;" % i
        payload += part
        if how == "send":
            op = port.send(server, part, called.append, silent=True)
        else:
            op = port.sendmsg(server, [part[:3], memoryview(part)[3:]], called.append,
                              silent=True)
    received = bytearray()
    pump(port, lambda: read_ready(client, received) >= len(payload))
    assert bytes(received) == payload
    pump(port, lambda: settled(port))
    assert called == [] and op.done
    assert port.stats()["live_ops"] == 0
    close_all(port, client, server)


def test_silent_large_send_completes_silently_across_partial_writes(port):
    client, server = tcp_pair()
    port.register(server)
    called: list[iocp.Completion] = []
    payload = bytes(range(256)) * 16384          # 4 MiB: many partial writes
    op = port.send(server, payload, called.append, silent=True)
    received = bytearray()

    def reader() -> None:
        client.settimeout(20)
        while len(received) < len(payload):
            chunk = client.recv(1 << 20)
            if not chunk:
                return
            received.extend(chunk)

    t = threading.Thread(target=reader)
    t.start()
    pump(port, lambda: op.done, timeout=30)
    t.join(30)
    assert bytes(received) == payload
    assert called == [] and settled(port)
    close_all(port, client, server)


def test_silent_send_failure_runs_its_callback(port):
    client, server = tcp_pair()
    port.register(server)
    server.shutdown(socket.SHUT_WR)
    got: list[iocp.Completion] = []
    port.send(server, b"too late", got.append, silent=True)
    pump(port, lambda: got)
    assert len(got) == 1 and isinstance(got[0].error, OSError) and not got[0].more
    assert got[0].nbytes == 0
    pump(port, lambda: settled(port))
    close_all(port, client, server)


def test_silent_send_to_a_reset_peer_reports_the_error(port):
    client, server = tcp_pair()
    port.register(server)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()  # RST
    # The RST must have arrived before the sends: wait for a (non-silent)
    # recv to see it (an error; Wine reports end of stream instead).
    seen: list[iocp.Completion] = []
    port.recv(server, 10, seen.append)
    pump(port, lambda: seen)
    assert isinstance(seen[0].error, OSError) or seen[0].eof
    got: list[iocp.Completion] = []
    port.send(server, b"x" * 1000, got.append, silent=True)
    pump(port, lambda: got)
    assert isinstance(got[0].error, OSError)
    close_all(port, server)


def test_silent_send_cancelled_runs_its_callback(port):
    client, server = tcp_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    # The peer never reads: the second send waits behind a full buffer.
    port.send(server, b"x" * (16 << 20), got.append, silent=True)
    op = port.send(server, b"tail", got.append, silent=True)
    assert op.cancel() is True
    pump(port, lambda: op.done)
    tail = [c for c in got if c.operation is op]
    assert len(tail) == 1 and tail[0].cancelled
    close_all(port, client, server)
    pump(port, lambda: settled(port))
    # The big send was cancelled by unregister, or (where the kernel took
    # all 16 MiB at once) succeeded silently: never a success callback.
    assert all(c.cancelled or c.error is not None for c in got)


# ---------------------------------------------------------------- poll


def test_poll_argument_checks(port):
    client, server = tcp_pair()
    port.register(server)
    for bad, exc in ((0, ValueError), (iocp.POLLERR, ValueError), (iocp.POLLHUP, ValueError),
                     (iocp.POLLIN | 0x100, ValueError), (True, TypeError), ("in", TypeError),
                     (1.0, TypeError)):
        with pytest.raises(exc):
            port.poll(server, bad)
    with pytest.raises(ValueError):
        port.poll(client, iocp.POLLIN)             # not registered
    assert settled(port)
    close_all(port, client, server)


def test_poll_constants():
    assert (iocp.POLLIN, iocp.POLLOUT, iocp.POLLERR, iocp.POLLHUP) == (1, 4, 8, 16)


def test_poll_writable_one_shot(port):
    client, server = tcp_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    op = port.poll(server, iocp.POLLOUT, got.append)
    pump(port, lambda: op.done)
    assert len(got) == 1 and got[0].ok and not got[0].more
    assert got[0].data & iocp.POLLOUT and got[0].kind == "poll"
    close_all(port, client, server)


def test_poll_readable_one_shot(port):
    client, server = tcp_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    op = port.poll(server, iocp.POLLIN, got.append)
    assert port.run_once(0) == 0 and not op.done     # nothing to read yet
    client.sendall(b"ping")
    pump(port, lambda: op.done)
    assert got[0].ok and got[0].data & iocp.POLLIN and not got[0].more
    assert server.recv(10) == b"ping"                 # poll consumed nothing
    close_all(port, client, server)


def test_poll_readable_multishot(port):
    client, server = tcp_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    op = port.poll(server, iocp.POLLIN, got.append, multishot=True)
    for i in range(3):
        client.sendall(b"%d" % i)
        pump(port, lambda i=i: len(got) > i)
        assert got[i].more and got[i].data & iocp.POLLIN
        assert server.recv(10) == b"%d" % i          # drain: the next is a new edge
    assert op.cancel() is True
    pump(port, lambda: op.done)
    assert not got[-1].more and got[-1].cancelled
    close_all(port, client, server)


# ---------------------------------------------------------------- run_once


def test_run_once_returns_after_one_batch_without_post_or_stop(port):
    client, server = tcp_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    port.recv(server, 100, got.append)
    client.sendall(b"hello")
    assert port.run_once(10) == 1
    assert [c.data for c in got] == [b"hello"]
    # Nothing else to do: a zero timeout polls and returns 0.
    assert port.run_once(0) == 0
    close_all(port, client, server)


def test_run_once_dispatches_to_the_handler(port):
    seen: list[iocp.Completion] = []
    port.post("k", 3)
    assert port.run_once(5, handler=seen.append) == 1
    assert seen[0].key == "k" and seen[0].nbytes == 3


def test_run_once_does_not_return_for_silent_successes_alone(port):
    client, server = tcp_pair()
    port.register(server)
    port.send(server, b"quiet", silent=True)
    t0 = time.monotonic()
    assert port.run_once(0.3) == 0               # the timeout, not the send
    assert time.monotonic() - t0 >= 0.25
    pump(port, lambda: settled(port))
    got: list[iocp.Completion] = []
    port.send(server, b"quiet", silent=True)
    port.post(callback=got.append)
    assert port.run_once(10) == 1 and len(got) == 1
    client.settimeout(10)
    assert client.recv(100) == b"quietquiet"
    pump(port, lambda: settled(port))
    close_all(port, client, server)


def test_run_once_respects_its_timeout(port):
    t0 = time.monotonic()
    assert port.run_once(0.2) == 0
    elapsed = time.monotonic() - t0
    assert 0.15 <= elapsed < 5


def test_run_once_refuses_bad_timeouts_and_nesting(port):
    for bad in (-1, float("nan")):
        with pytest.raises(ValueError):
            port.run_once(bad)
    errors: list[BaseException] = []

    def nested(c: iocp.Completion) -> None:
        try:
            port.run_once(0)
        except RuntimeError as exc:
            errors.append(exc)

    port.post(callback=nested)
    assert port.run_once(5) == 1
    assert len(errors) == 1


@contextlib.contextmanager
def stopping(port: iocp.CompletionPort) -> Iterator[None]:
    """While the block runs, another thread calls port.stop() every 10 ms
    (again and again until the block ends: a stop() that lands before the
    block's run starts waiting is, by design, not remembered by it)."""
    done = threading.Event()

    def stopper() -> None:
        while not done.wait(0.01):
            port.stop()

    t = threading.Thread(target=stopper)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join(10)


def test_stop_from_another_thread_ends_run_once(port):
    with stopping(port):
        t0 = time.monotonic()
        assert port.run_once(30) == 0
        assert time.monotonic() - t0 < 20


@pytest.mark.parametrize("single_issuer", [False, True])
@pytest.mark.parametrize("how", ["run", "run_once"])
def test_submissions_of_the_last_batch_start_before_run_returns(make_port, how,
                                                                 single_issuer):
    """run() and run_once() end their last batch on the way out: what its
    callbacks submitted is in the kernel's hands without another call on
    the port."""
    port = make_port(single_issuer=single_issuer)
    client, server = tcp_pair()
    port.register(server)

    def on_recv(c: iocp.Completion) -> None:
        port.send(server, c.data, silent=True)
        port.stop()

    port.recv(server, 100, on_recv)
    client.sendall(b"ping")
    if how == "run":
        assert port.run(10) == 1
    else:
        assert port.run_once(10) == 1
    client.settimeout(10)
    assert client.recv(100) == b"ping"              # no port call in between
    pump(port, lambda: settled(port))
    close_all(port, client, server)


# ---------------------------------------------------------------- single issuer


def run_in_thread(fn):
    """Runs fn() in a new thread; returns what it returned or raised."""
    out: dict = {}

    def body() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    assert not t.is_alive()
    return out


def test_single_issuer_echo_from_the_owner_thread(make_port):
    port = make_port(single_issuer=True)
    assert port.single_issuer
    client, server = tcp_pair()
    port.register(server)
    got: list[iocp.Completion] = []

    def on_recv(c: iocp.Completion) -> None:
        got.append(c)
        if c.data:
            port.send(server, c.data, silent=True)
            port.recv(server, 100, on_recv)

    port.recv(server, 100, on_recv)
    for i in range(20):
        msg = b"echo %d" % i
        client.sendall(msg)
        echoed = bytearray()
        want = len(msg)
        pump(port, lambda echoed=echoed, want=want: read_ready(client, echoed) >= want)
        assert bytes(echoed) == msg
    assert len(got) == 20
    close_all(port, client, server)
    pump(port, lambda: settled(port))


def test_single_issuer_refuses_other_threads(make_port):
    port = make_port(single_issuer=True)
    client, server = tcp_pair()
    port.register(server)                    # this thread is the owner now
    op = port.recv(server, 10)
    other = socket.socket()
    calls = {
        "register": lambda: port.register(other),
        "unregister": lambda: port.unregister(server),
        "recv": lambda: port.recv(server, 10),
        "send": lambda: port.send(server, b"x"),
        "poll": lambda: port.poll(server, iocp.POLLIN),
        "run_once": lambda: port.run_once(0),
        "run": lambda: port.run(0),
        "get": lambda: port.get(0),
        "cancel": lambda: op.cancel(),
        "close": lambda: port.close(),
    }
    for name, call in calls.items():
        out = run_in_thread(call)
        err = out.get("error")
        assert isinstance(err, RuntimeError), (name, out)
        assert f"owned by thread {threading.get_ident()}" in str(err), (name, err)
    # stats and the state properties work from anywhere.
    out = run_in_thread(lambda: (port.stats()["inflight"], port.closed, port.pending, repr(port)))
    assert out["value"][:3] == (1, False, 1)
    assert not port.closed
    other.close()
    close_all(port, client, server)


def test_single_issuer_owner_is_the_first_thread_that_uses_it(make_port):
    port = make_port(single_issuer=True)

    def use_and_close() -> int:
        port.post()
        n = port.run_once(5)
        port.close()
        return n

    # Creating the port made no owner; the worker is the first user.
    out = run_in_thread(use_and_close)
    assert out == {"value": 1}
    assert port.closed


def test_single_issuer_post_from_another_thread_wakes_the_owner(make_port):
    port = make_port(single_issuer=True)
    port.post()                                       # this thread owns it
    assert port.run_once(5) == 1
    ran_on: list[int] = []
    out = run_in_thread(lambda: port.post("k", 7, "obj",
                                          lambda c: ran_on.append(threading.get_ident())))
    assert isinstance(out.get("value"), iocp.Operation)
    seen: list[iocp.Completion] = []
    assert port.run_once(10, handler=seen.append) == 1
    assert ran_on == [threading.get_ident()]

    # A post from another thread while the owner is blocked in run_once.
    started = threading.Event()
    results: list[iocp.Completion] = []

    def poster() -> None:
        started.wait(10)
        port.post("late", 1, callback=results.append)

    t = threading.Thread(target=poster)
    t.start()
    started.set()
    try:
        pump(port, lambda: results, timeout=20)
    finally:
        t.join(10)
    assert results[0].key == "late" and results[0].nbytes == 1


def test_single_issuer_stop_from_another_thread(make_port):
    port = make_port(single_issuer=True)
    port.post()
    assert port.run_once(5) == 1
    with stopping(port):
        assert port.run(30) == 0


def test_single_issuer_close_delivers_foreign_posts(make_port):
    port = make_port(single_issuer=True)
    port.post()
    assert port.run_once(5) == 1
    got: list[iocp.Completion] = []
    out = run_in_thread(lambda: port.post("pending", callback=got.append))
    assert "value" in out
    port.close()
    assert [c.key for c in got] == ["pending"]


def test_single_issuer_native_entry_points_refuse_other_threads(make_port):
    """The native layer enforces the owner too (IOCP_EWRONGTHREAD), below
    the Python checks; iocp_port_wake stays open to every thread."""
    port = make_port(single_issuer=True)
    mine = port._test_native_entry_points()      # this thread: the owner
    # wait/run_once with a stale wake generation return 0 at once.
    assert mine["op_alloc"] == 0 and mine["wait"] == 0 and mine["run_once"] == 0
    assert mine["register"] < 0 and mine["submit"] < 0 and mine["wake"] == 0
    assert EWRONGTHREAD not in mine.values()
    out = run_in_thread(port._test_native_entry_points)
    theirs = out["value"]
    assert {k: v for k, v in theirs.items() if k != "wake"} == dict.fromkeys(
        ["op_alloc", "submit", "register", "unregister", "cancel_all", "wait", "run_once"],
        EWRONGTHREAD), theirs
    assert theirs["wake"] == 0
    # Nothing was taken or leaked by the refused calls.
    assert port.stats()["live_ops"] == 0


def test_ordinary_port_native_entry_points_work_from_any_thread(make_port):
    port = make_port()
    out = run_in_thread(port._test_native_entry_points)
    assert out["value"]["op_alloc"] == 0 and out["value"]["wait"] == 0
    assert port.stats()["live_ops"] == 0


def test_free_threaded_cpython_runs_the_module_with_the_gil():
    """Not free-threading compatible by decision (docs/architecture.md): the
    module must not declare Py_MOD_GIL_NOT_USED, so a 3.13t/3.14t
    interpreter turns the GIL back on when it imports iocp."""
    is_gil_enabled = getattr(sys, "_is_gil_enabled", None)
    if is_gil_enabled is not None:
        assert is_gil_enabled()          # iocp is imported by now
    pyx = Path(__file__).resolve().parent.parent / "src" / "iocp_core.pyx"
    if pyx.exists():                     # a source tree (not the wheel tests)
        first = pyx.read_text().splitlines()[0]
        assert "freethreading_compatible=False" in first
