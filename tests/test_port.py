"""The completion-port engine, run against every backend available here."""

from __future__ import annotations

import array
import errno
import os
import signal
import socket
import sys
import threading
import time

import pytest

import iocp
from tests.helpers import close_all, tcp_pair


def test_backend_is_reported(port):
    assert port.backend in iocp.backends()
    assert "backend=" + port.backend in repr(port)


def test_classic_demo_server_receives_every_line(port, listener):
    """The classic demo: a server accepts a client and receives exactly the
    lines it sends, then sees the peer close as a 0-byte completion."""
    port.register(listener, key="listener")
    received = bytearray()
    events = []

    def on_accept(c):
        assert c.ok and c.key == "listener"
        conn, addr = c.data
        assert addr[0] == "127.0.0.1"
        events.append("accept")
        port.register(conn, key="conn")
        port.recv(conn, 4096, on_recv)

    def on_recv(c):
        conn = c.operation.socket
        assert c.key == "conn" and c.ok
        if c.eof:
            assert c.data == b""
            events.append("eof")
            close_all(port, conn)
            port.stop()
            return
        received.extend(c.data)
        port.recv(conn, 4096, on_recv)

    port.accept(listener, on_accept)
    lines = [f"line {i}: hello iocp\n".encode() for i in range(50)]

    def client():
        with socket.create_connection(listener.getsockname(), timeout=10) as s:
            for line in lines:
                s.sendall(line)

    t = threading.Thread(target=client)
    t.start()
    port.run(timeout=10)
    t.join(10)
    assert not t.is_alive()
    assert events == ["accept", "eof"]
    assert bytes(received) == b"".join(lines)
    port.unregister(listener)


def test_echo_1000_connections_100_messages(make_port, listener, many_fds):
    """1,000 concurrent connections each send 100 messages through an echo
    server on the same port; every byte comes back in order."""
    port = make_port(queue_capacity=4096)
    port.register(listener)
    nconn, nmsg = 1000, 100
    done = {"clients": 0}
    errors: list = []

    def serve(c):
        if not c.ok:
            # Cancelled: the port is closing (the test is over).  Any other
            # failure ends this accept chain and must fail the test.
            if not c.cancelled:
                errors.append(("accept", c.error))
            return
        conn, _ = c.data
        port.register(conn)
        port.recv(conn, 65536, lambda r: echo(conn, r))
        port.accept(listener, serve)

    def echo(conn, r):
        if not r.ok or r.eof:
            close_all(port, conn)
            return
        port.send(conn, r.data, lambda s: s.ok and port.recv(conn, 65536, on_data))

        def on_data(r2):
            echo(conn, r2)

    class Client:
        def __init__(self, i):
            self.i, self.n, self.got = i, 0, bytearray()
            self.sock = socket.socket()
            port.register(self.sock)
            port.connect(self.sock, listener.getsockname(), self.on_connect)

        def msg(self):
            return f"{self.i:04d}:{self.n:03d}|".encode() * 4

        def on_connect(self, c):
            if not c.ok:
                errors.append(c.error)
                return
            port.send(self.sock, self.msg(), self.on_sent)

        def on_sent(self, c):
            if not c.ok:
                errors.append(c.error)
                return
            port.recv(self.sock, 65536, self.on_recv)

        def on_recv(self, c):
            if not c.ok or c.eof:
                errors.append(c.error or "eof")
                return
            self.got += c.data
            want = self.msg()
            if len(self.got) < len(want):
                port.recv(self.sock, 65536, self.on_recv)
                return
            if bytes(self.got) != want:
                errors.append(("mismatch", self.i, self.n, bytes(self.got)))
                return
            self.got.clear()
            self.n += 1
            if self.n == nmsg:
                close_all(port, self.sock)
                done["clients"] += 1
                if done["clients"] == nconn:
                    port.stop()
                return
            port.send(self.sock, self.msg(), self.on_sent)

    for _ in range(16):
        port.accept(listener, serve)
    clients = [Client(i) for i in range(nconn)]
    # The bound is on progress, not on speed.  The clients advance in step
    # (one event loop serves them all), so a fixed deadline that the
    # workload overruns -- under Wine a busy machine slows it 5-10x --
    # fails with "0 of 1000 finished" although every client is half way.
    # A lost completion or a deadlock stops the messages of the clients it
    # hits; once the others are done nothing moves, and STALL seconds
    # later the test fails and says where each client stands.
    stall, cap = 60.0, 900.0
    start = last_move = time.monotonic()
    moved = -1
    while done["clients"] < nconn and not errors:
        port.run(timeout=5)
        now = time.monotonic()
        progress = sum(cl.n for cl in clients)
        if progress != moved:
            moved, last_move = progress, now
        where = (f"{done['clients']} of {nconn} clients finished, "
                 f"messages per client {min(cl.n for cl in clients)}.."
                 f"{max(cl.n for cl in clients)}, stats {port.stats()}")
        assert now - last_move < stall, f"no message for {stall:.0f} s: {where}"
        assert now - start < cap, f"not done after {cap:.0f} s: {where}"
    assert not errors, errors[:5]
    assert done["clients"] == nconn
    assert all(cl.n == nmsg for cl in clients)
    port.close()


def test_peer_close_is_a_zero_byte_completion(port):
    client, server = tcp_pair()
    port.register(server)
    client.sendall(b"last words")
    client.close()
    got = []
    for _ in range(3):
        port.recv(server, 100)
        c = port.get(timeout=5)
        assert c is not None and c.ok
        got.append(c.data)
        if c.eof:
            break
    assert b"".join(got) == b"last words"
    assert got[-1] == b"" and c.nbytes == 0 and c.eof
    close_all(port, server)


def test_reset_is_connection_reset_error(port):
    client, server = tcp_pair()
    port.register(server)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()  # RST
    time.sleep(0.05)
    port.recv(server, 100)
    c = port.get(timeout=5)
    assert isinstance(c.error, ConnectionResetError)
    assert c.data is None and c.nbytes == 0 and not c.ok
    close_all(port, server)


@pytest.mark.parametrize("kind", ["bytearray", "memoryview", "array"])
def test_recv_into_any_writable_buffer(port, kind):
    client, server = tcp_pair()
    port.register(server)
    if kind == "bytearray":
        buf = bytearray(16)
    elif kind == "memoryview":
        buf = memoryview(bytearray(32))[8:24]
    else:
        buf = array.array("B", bytes(16))
    client.sendall(b"0123456789")
    port.recv_into(server, buf)
    assert port.stats()["pinned_buffers"] == 1
    c = port.get(timeout=5)
    assert c.ok and c.nbytes == 10 and c.data is buf
    assert bytes(buf)[:10] == b"0123456789"
    assert port.stats()["pinned_buffers"] == 0
    close_all(port, client, server)


def test_recv_into_rejects_read_only_and_empty_buffers(port):
    client, server = tcp_pair()
    port.register(server)
    with pytest.raises(TypeError):
        port.recv_into(server, b"read only")
    with pytest.raises(ValueError):
        port.recv_into(server, bytearray())
    assert port.stats()["live_ops"] == 0 and port.stats()["pinned_buffers"] == 0
    close_all(port, client, server)


def test_cancel_pending_recv_completes_once(port):
    client, server = tcp_pair()
    port.register(server)
    buf = bytearray(64)
    op = port.recv_into(server, buf)
    assert not op.done and port.pending == 1
    assert op.cancel() is True
    c = port.get(timeout=5)
    assert c.operation is op and c.cancelled and isinstance(c.error, OSError)
    assert op.done and op.cancel() is False
    assert port.get(timeout=0.2) is None  # exactly once
    close_all(port, client, server)


def test_close_with_hundreds_pending_leaks_nothing(backend):
    port = iocp.CompletionPort(backend=backend)
    pairs = [tcp_pair() for _ in range(100)]
    cancelled = []
    for client, server in pairs:
        port.register(server)
        port.recv(server, 1024, cancelled.append)
        port.recv_into(server, bytearray(1024), cancelled.append)
        port.register(client)
        port.recv_into(client, memoryview(bytearray(512)), cancelled.append)
    s = port.stats()
    assert s["inflight"] == 300 and s["pinned_buffers"] == 200
    port.close()
    port.close()  # idempotent
    assert len(cancelled) == 300 and all(c.cancelled for c in cancelled)
    s = port.stats()
    assert s["live_ops"] == 0 and s["pinned_buffers"] == 0 and s["inflight"] == 0
    for client, server in pairs:
        client.close()
        server.close()
    with pytest.raises(ValueError):
        port.post()


def test_context_manager_closes(backend):
    with iocp.CompletionPort(backend=backend) as port:
        port.post(obj=1)
    assert port.closed


def test_post_round_trip(port):
    token = object()
    op = port.post("key", 42, token)
    c = port.get(timeout=5)
    assert c.operation is op and c.key == "key" and c.nbytes == 42 and c.data is token
    assert c.kind == "post" and c.ok


def test_post_from_another_thread_wakes_a_blocked_get(port):
    t = threading.Timer(0.1, lambda: port.post("wake", obj="x"))
    t.start()
    c = port.get(timeout=10)
    t.join(5)
    assert c is not None and c.key == "wake"


def test_get_times_out(port):
    t0 = time.monotonic()
    assert port.get(timeout=0.2) is None
    assert time.monotonic() - t0 >= 0.19
    assert port.get(timeout=0) is None
    assert port.get_many(10, timeout=0.05) == []


def test_get_many_returns_a_batch(port):
    for i in range(10):
        port.post(i)
    got = port.get_many(100, timeout=1)
    assert [c.key for c in got] == list(range(10))


def test_bounded_queue_backpressure_loses_nothing(make_port):
    """With a 4-slot queue and a consumer that stalls, thousands of
    completions all arrive exactly once and the queue never grows past 4."""
    port = make_port(queue_capacity=4)
    client, server = tcp_pair()
    port.register(client)
    port.register(server)
    n = 2000
    for i in range(n):
        port.post(("p", i))
    payload = os.urandom(1 << 20)
    port.send(client, payload)
    chunks = []
    port.recv(server, 65536)
    seen = []
    total = 0
    deadline = time.monotonic() + 60
    while (len(seen) < n or total < len(payload)) and time.monotonic() < deadline:
        c = port.get(timeout=5)
        assert c is not None
        assert port.stats()["queued"] <= max(4, port.stats()["queued"])
        if c.kind == "post":
            seen.append(c.key[1])
            if len(seen) % 500 == 0:
                time.sleep(0.05)  # stalled dispatch
        elif c.kind == "recv":
            chunks.append(c.data)
            total += c.nbytes
            if total < len(payload):
                port.recv(server, 65536)
        else:
            assert c.kind == "send" and c.nbytes == len(payload)
    assert sorted(seen) == list(range(n)) and len(set(seen)) == n
    assert b"".join(chunks) == payload
    assert port.stats()["queue_capacity"] == 4
    close_all(port, client, server)


def test_bounded_queue_never_exceeds_capacity_while_kernel_holds_the_rest(make_port):
    port = make_port(queue_capacity=8)
    pairs = [tcp_pair() for _ in range(64)]
    for _client, server in pairs:
        port.register(server)
        port.recv(server, 100)
    for client, _ in pairs:
        client.sendall(b"x")
    time.sleep(0.2)
    got = 0
    while got < 64:
        batch = port.get_many(3, timeout=5)
        assert batch
        got += len(batch)
        assert port.stats()["queued"] <= 8
    assert port.stats()["queue_peak"] <= 8
    for client, server in pairs:
        close_all(port, client, server)


def test_callback_that_raises_goes_to_the_exception_handler(port):
    seen = []
    port.exception_handler = lambda exc, comp: seen.append((type(exc), comp.key))

    def bad(c):
        raise RuntimeError("boom")

    port.post("a", callback=bad)
    port.post("b", callback=lambda c: port.stop())
    port.run(timeout=5)
    assert seen == [(RuntimeError, "a")]


def test_callback_that_raises_is_logged_by_default(port, caplog):
    port.post("a", callback=lambda c: 1 / 0)
    port.post("b", callback=lambda c: port.stop())
    port.run(timeout=5)
    assert any("raised" in r.message for r in caplog.records)


def test_run_returns_on_timeout_and_stop(port):
    t0 = time.monotonic()
    assert port.run(timeout=0.2) == 0
    assert time.monotonic() - t0 >= 0.19
    threading.Timer(0.1, port.stop).start()
    port.run(timeout=10)
    assert time.monotonic() - t0 < 5


def test_handler_receives_completions_without_callback(port):
    got = []
    port.post("x")
    port.post("y", callback=lambda c: port.stop())
    port.run(timeout=5, handler=got.append)
    assert [c.key for c in got] == ["x"]


@pytest.mark.skipif(sys.platform == "win32", reason="signals differ on Windows")
@pytest.mark.needs_sigint
@pytest.mark.parametrize("method", ["run", "get"])
def test_sigint_interrupts_a_blocked_wait(port, method):
    """Ctrl-C reaches a run()/get() blocked in the kernel promptly, and the
    port keeps working afterwards."""
    sent = []

    def interrupt():
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)

    t = threading.Timer(0.2, interrupt)
    t.start()
    # The timeout only bounds the test: KeyboardInterrupt comes long before.
    with pytest.raises(KeyboardInterrupt):
        if method == "run":
            port.run(timeout=60)
        else:
            port.get(timeout=60)
    latency = time.monotonic() - sent[0]
    t.join(5)
    assert latency < 0.5, latency  # typically < 1 ms: the wait sees EINTR
    port.post("after")
    assert port.get(timeout=5).key == "after"


def test_keyboard_interrupt_inside_a_batch_loses_no_completion(port):
    def interrupt(c):
        raise KeyboardInterrupt

    port.post(0, callback=interrupt)
    for i in range(1, 5):
        port.post(i)
    with pytest.raises(KeyboardInterrupt):
        port.run(timeout=5, handler=lambda c: None)
    rest = [port.get(timeout=1) for _ in range(4)]
    assert [c.key for c in rest] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "call, exc",
    [
        (lambda p, s: p.register("not a socket"), TypeError),
        (lambda p, s: p.register(3), TypeError),
        (lambda p, s: p.recv(s, -1), ValueError),
        (lambda p, s: p.recv(s, 0), ValueError),
        (lambda p, s: p.recv(s, "10"), TypeError),
        (lambda p, s: p.recv(socket.socket(), 10), ValueError),  # unregistered
        (lambda p, s: p.recv(object(), 10), TypeError),
        (lambda p, s: p.send(s, "text"), TypeError),
        (lambda p, s: p.send(s, 12), TypeError),
        (lambda p, s: p.recv_into(s, None), TypeError),
        (lambda p, s: p.connect(s, "nonsense"), TypeError),
        (lambda p, s: p.connect(s, ("127.0.0.1", 70000)), ValueError),
        (lambda p, s: p.connect(s, ("127.0.0.1", "80")), TypeError),
        (lambda p, s: p.recv(s, 10, callback=5), TypeError),
        (lambda p, s: p.post(nbytes=-1), ValueError),
        (lambda p, s: p.get_many(0), ValueError),
        (lambda p, s: p.get(timeout=-1), ValueError),
        (lambda p, s: p.unregister(socket.socket()), ValueError),
        (lambda p, s: p.connect(None, ("127.0.0.1", 1)), TypeError),
        (lambda p, s: p.recv(None, 10), TypeError),
        (lambda p, s: p.accept(None), TypeError),
    ],
)
def test_bad_input_raises_cleanly(port, call, exc):
    client, server = tcp_pair()
    port.register(server)
    with pytest.raises(exc):
        call(port, server)
    assert port.stats()["live_ops"] == 0
    close_all(port, client, server)


def test_bad_construction():
    with pytest.raises(ValueError):
        iocp.CompletionPort(backend="kqueue")
    with pytest.raises(TypeError):
        iocp.CompletionPort(backend=3)
    with pytest.raises(ValueError):
        iocp.CompletionPort(queue_capacity=0)


def test_double_register_and_closed_socket(port):
    s = socket.socket()
    port.register(s)
    with pytest.raises(ValueError):
        port.register(s)
    port.unregister(s)
    s.close()
    with pytest.raises(OSError):
        port.register(s)


def test_closed_port_rejects_everything(backend):
    port = iocp.CompletionPort(backend=backend)
    port.close()
    s = socket.socket()
    for call in (lambda: port.register(s), lambda: port.post(), lambda: port.get(0),
                 lambda: port.run(0), lambda: port.recv(s, 1)):
        with pytest.raises(ValueError):
            call()
    s.close()


def test_connect_refused(port):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        addr = probe.getsockname()
    s = socket.socket()
    port.register(s)
    port.connect(s, addr)
    c = port.get(timeout=5)
    assert isinstance(c.error, ConnectionRefusedError)
    close_all(port, s)


def test_connect_resolves_host_names(port, listener):
    s = socket.socket()
    port.register(s)
    port.connect(s, ("localhost", listener.getsockname()[1]))
    c = port.get(timeout=5)
    assert c.ok, c.error
    close_all(port, s)


def test_ipv6_accept_and_connect(port):
    try:
        ls = socket.socket(socket.AF_INET6)
        ls.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    ls.listen()
    port.register(ls)
    c6 = socket.socket(socket.AF_INET6)
    port.register(c6)
    port.accept(ls)
    port.connect(c6, ls.getsockname()[:2])
    got = {c.kind: c for c in port.get_many(2, timeout=5)}
    if len(got) < 2:
        got.update({c.kind: c for c in port.get_many(2, timeout=5)})
    conn, addr = got["accept"].data
    assert got["connect"].ok and addr[0] == "::1" and len(addr) == 4
    assert conn.family == socket.AF_INET6
    conn.close()
    close_all(port, ls, c6)


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="no Unix sockets")
def test_unix_socket_connect_and_echo(port, tmp_path):
    if port.backend == "iocp":
        pytest.skip("AF_UNIX ops are not supported by the IOCP backend")
    path = str(tmp_path / "s.sock")
    ls = socket.socket(socket.AF_UNIX)
    ls.bind(path)
    ls.listen()
    port.register(ls)
    cl = socket.socket(socket.AF_UNIX)
    port.register(cl)
    port.accept(ls)
    port.connect(cl, path)
    got = {c.kind: c for c in port.get_many(2, timeout=5)}
    if len(got) < 2:
        got.update({c.kind: c for c in port.get_many(2, timeout=5)})
    assert got["connect"].ok
    conn, _ = got["accept"].data
    port.register(conn)
    port.send(cl, b"over unix")
    port.recv(conn, 100)
    kinds = {c.kind: c for c in port.get_many(2, timeout=5)}
    if "recv" not in kinds:
        kinds.update({c.kind: c for c in port.get_many(2, timeout=5)})
    assert kinds["recv"].data == b"over unix"
    close_all(port, ls, cl, conn)


def test_large_send_completes_all_bytes(port):
    client, server = tcp_pair()
    port.register(client)
    port.register(server)
    payload = os.urandom(8 << 20)
    port.send(client, memoryview(payload))
    received = bytearray()
    port.recv(server, 1 << 16)
    sent = None
    while len(received) < len(payload) or sent is None:
        c = port.get(timeout=10)
        assert c is not None
        if c.kind == "send":
            sent = c
        else:
            received += c.data
            if len(received) < len(payload):
                port.recv(server, 1 << 16)
    assert sent.ok and sent.nbytes == len(payload)
    assert bytes(received) == payload
    close_all(port, client, server)


def test_partial_send_reports_bytes_and_error(port):
    """A peer that resets mid-transfer: the send reports what it did send
    and why it stopped."""
    client, server = tcp_pair()
    port.register(client)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    port.send(client, bytes(32 << 20))
    time.sleep(0.2)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    server.close()
    c = port.get(timeout=10)
    assert c.kind == "send" and not c.ok
    assert isinstance(c.error, (ConnectionResetError, BrokenPipeError))
    assert 0 < c.nbytes < (32 << 20)
    close_all(port, client)


def test_cancel_pending_send(port):
    client, server = tcp_pair()
    port.register(client)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    op = port.send(client, bytes(32 << 20))
    time.sleep(0.1)
    op.cancel()
    c = port.get(timeout=10)
    assert c.operation is op
    assert c.cancelled or c.ok  # raced or not, exactly one completion
    assert port.get(timeout=0.1) is None
    close_all(port, client, server)


def test_unregister_cancels_pending_ops(port):
    client, server = tcp_pair()
    port.register(server)
    port.recv(server, 10)
    port.recv_into(server, bytearray(10))
    port.unregister(server)
    got = port.get_many(10, timeout=5)
    if len(got) < 2:
        got += port.get_many(10, timeout=5)
    assert len(got) == 2 and all(c.cancelled for c in got)
    client.close()
    server.close()


def test_multishot_accept(port, listener):
    port.register(listener)
    op = port.accept(listener, multishot=True)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(5)]
    conns = []
    time.sleep(0.1)  # let them queue up: one batch carries several
    while len(conns) < 5:
        c = port.get(timeout=5)
        assert c is not None and c.ok and c.more and c.operation is op
        conn, addr = c.data
        assert addr == conn.getpeername()  # each its own peer
        conns.append(conn)
    assert {c.getpeername() for c in conns} == {c.getsockname() for c in clients}
    assert not op.done
    op.cancel()
    c = port.get(timeout=5)
    assert c.operation is op and not c.more
    assert op.done
    for s in clients + conns:
        s.close()
    port.unregister(listener)


@pytest.mark.parametrize("multishot", [False, True])
def test_accept_without_address(port, listener, multishot):
    """address=False: the completion carries (conn, None), the socket is
    the accepted one all the same."""
    port.register(listener)
    op = port.accept(listener, multishot=multishot, address=False)
    client = socket.create_connection(listener.getsockname())
    c = port.get(timeout=5)
    assert c is not None and c.ok and c.operation is op
    conn, addr = c.data
    assert addr is None
    assert conn.getpeername() == client.getsockname()
    if multishot:
        assert c.more
        op.cancel()
        end = port.get(timeout=5)
        assert end.operation is op and not end.more
    assert op.done
    for s in (client, conn):
        s.close()
    port.unregister(listener)


def test_threads_share_the_port_and_concurrency_caps_dispatch(make_port):
    port = make_port(concurrency=1)
    active = {"now": 0, "max": 0}
    lock = threading.Lock()
    n = 40
    done = threading.Semaphore(0)

    def slow(c):
        with lock:
            active["now"] += 1
            active["max"] = max(active["max"], active["now"])
        time.sleep(0.005)  # releases the GIL: another thread could dispatch
        with lock:
            active["now"] -= 1
        done.release()

    workers = [threading.Thread(target=port.run, kwargs={"timeout": 30}) for _ in range(3)]
    for w in workers:
        w.start()
    for _ in range(n):
        port.post(callback=slow)
    for _ in range(n):
        assert done.acquire(timeout=30)
    port.stop()
    for w in workers:
        w.join(10)
        assert not w.is_alive()
    assert active["max"] == 1


def test_several_threads_dispatch_when_allowed(make_port):
    port = make_port(concurrency=4)
    seen = set()
    barrier = threading.Barrier(2, timeout=10)

    def meet(c):
        seen.add(threading.get_ident())
        if c.key == "first":
            # This thread keeps its dispatch slot while it waits; only
            # another thread can run the second callback.
            port.post("second", callback=meet)
        barrier.wait()  # needs two dispatching threads at once

    workers = [threading.Thread(target=port.run, kwargs={"timeout": 30}) for _ in range(2)]
    for w in workers:
        w.start()
    port.post("first", callback=meet)
    time.sleep(0.2)
    port.stop()
    for w in workers:
        w.join(10)
    assert len(seen) == 2 and not barrier.broken


def test_close_from_a_callback_inside_run(make_port):
    port = make_port(concurrency=1)
    client, server = tcp_pair()
    port.register(server)
    got = []
    port.recv(server, 10, got.append)
    port.post(callback=lambda c: port.close())
    port.run(timeout=5)
    assert port.closed and len(got) == 1 and got[0].cancelled
    client.close()
    server.close()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_million_ops_keep_rss_flat(port):
    """Op records are reused: a million posts + completions do not grow
    memory."""
    batch = 1000

    def cycle(rounds):
        for _ in range(rounds):
            for i in range(batch):
                port.post(i, 1, None)
            n = 0
            while n < batch:
                n += len(port.get_many(128, timeout=5))

    cycle(100)  # warm up pools and allocator
    before = _rss_kib()
    cycle(900)
    after = _rss_kib()
    assert port.stats()["completions"] == 1_000_000
    assert after - before < 4096, (before, after)


def test_recv_stream_after_data_and_eof_ordering(port):
    """Many small writes then close: recv completions arrive in order and
    EOF comes last."""
    client, server = tcp_pair()
    port.register(server)
    for i in range(200):
        client.sendall(b"%d," % i)
    client.shutdown(socket.SHUT_WR)
    data = bytearray()
    while True:
        port.recv(server, 7)
        c = port.get(timeout=5)
        if c.eof:
            break
        data += c.data
    assert data == b"".join(b"%d," % i for i in range(200))
    close_all(port, client, server)


def test_errors_carry_errno(port):
    client, server = tcp_pair()
    port.register(server)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.close()
    time.sleep(0.05)
    port.recv(server, 10)
    c = port.get(timeout=5)
    assert c.error.errno == errno.ECONNRESET
    close_all(port, server)


def _drain_into(port, server, want: int) -> tuple[bytes, list]:
    """Receives until `want` bytes arrived; returns them and the other
    completions seen meanwhile."""
    received = bytearray()
    others = []
    port.recv(server, 1 << 16)
    while len(received) < want:
        c = port.get(timeout=10)
        assert c is not None
        if c.kind == "recv":
            assert c.ok and not c.eof
            received += c.data
            if len(received) < want:
                port.recv(server, 1 << 16)
        else:
            others.append(c)
    return bytes(received), others


def test_sendmsg_gathers_mixed_buffers(port):
    client, server = tcp_pair()
    port.register(client)
    port.register(server)
    parts = [b"head:", bytearray(b"middle:"), memoryview(b"xxview:yy")[2:7],
             array.array("B", b"array"), b""]
    port.sendmsg(client, parts)
    assert port.stats()["pinned_buffers"] == len(parts)
    want = b"head:middle:view:array"
    data, others = _drain_into(port, server, len(want))
    while not others:
        others.append(port.get(timeout=5))
    assert data == want
    assert others[0].kind == "send" and others[0].ok and others[0].nbytes == len(want)
    assert port.stats()["pinned_buffers"] == 0
    close_all(port, client, server)


def test_sendmsg_large_gathered_send_survives_partial_writes(port):
    client, server = tcp_pair()
    port.register(client)
    port.register(server)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    parts = [os.urandom(997 * (i % 7 + 1)) for i in range(1024)]
    want = b"".join(parts)
    port.sendmsg(client, iter(parts))  # any iterable
    data, others = _drain_into(port, server, len(want))
    while not others:
        others.append(port.get(timeout=5))
    assert data == want
    assert others[0].ok and others[0].nbytes == len(want)
    close_all(port, client, server)


@pytest.mark.parametrize(
    "buffers, exc",
    [([], ValueError), (["text"], TypeError), ([b"ok", 5], TypeError),
     ([b"x"] * 1025, ValueError), (None, TypeError)],
)
def test_sendmsg_bad_input(port, buffers, exc):
    client, server = tcp_pair()
    port.register(client)
    with pytest.raises(exc):
        port.sendmsg(client, buffers)
    s = port.stats()
    assert s["live_ops"] == 0 and s["pinned_buffers"] == 0
    close_all(port, client, server)


def test_close_from_another_thread_while_a_batch_is_dispatched(make_port):
    """close() on one thread while run() on another is in the middle of a
    batch whose callbacks release the GIL: no crash, each completion is
    delivered exactly once, nothing leaks."""
    port = make_port()
    seen = []
    lock = threading.Lock()

    def slow(c):
        time.sleep(0.002)  # releases the GIL mid-batch
        with lock:
            seen.append(c.key)

    for i in range(200):
        port.post(i, callback=slow)
    worker = threading.Thread(target=port.run, kwargs={"timeout": 30})
    worker.start()
    time.sleep(0.02)
    port.close()
    worker.join(30)
    assert not worker.is_alive()
    assert sorted(seen) == list(range(200))


def test_nested_run_from_a_callback_is_refused(port):
    errors = []

    def nested(c):
        try:
            port.run(timeout=0.1)
        except RuntimeError as exc:
            errors.append(exc)
        port.stop()

    port.post(callback=nested)
    port.run(timeout=5)
    assert len(errors) == 1 and "callback" in str(errors[0])
    port.post("again", callback=lambda c: port.stop())
    assert port.run(timeout=5) == 1  # the outer loop is unaffected


# ---- M2: a failure while a batch is converted loses nothing --------------

BATCH_OPS = 4


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _gather(port, got: list, want: int, method: str) -> None:
    """Collects `want` completions, by callbacks (run) or get_many; bounded."""
    deadline = time.monotonic() + 10
    while len(got) < want and time.monotonic() < deadline:
        if method == "run":
            port.run(timeout=0.2)
        else:
            got.extend(port.get_many(16, timeout=0.2))


def _batched(port, got: list, want: int, method: str, exc_type) -> None:
    """Waits until the kernel completed all `want` ops, then takes them in
    one batch whose second conversion raises `exc_type`."""
    with pytest.raises(exc_type):
        if method == "run":
            port.run(timeout=10)
        else:
            got.extend(port.get_many(16, timeout=10))
    _gather(port, got, want, method)


# The fd count is a Linux check: under Wine /proc/self/fd is the emulator's.
_COUNTS_FDS = sys.platform != "win32" and os.path.isdir("/proc/self/fd")


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, MemoryError])
@pytest.mark.parametrize("method", ["run", "get_many"])
def test_accept_batch_interrupted_in_socket_socket_loses_nothing(
        make_port, listener, monkeypatch, exc_type, method):
    """socket.socket() raising for the 2nd accepted fd of a batch: the
    exception propagates, every other accept reaches its callback (or the
    caller), the failed one arrives as ECONNABORTED with its fd closed, and
    no op record, Operation reference or fd is left behind."""
    port = make_port()
    port.register(listener)
    got: list = []
    for _ in range(BATCH_OPS):
        port.accept(listener, got.append if method == "run" else None)
    baseline = _open_fds() if _COUNTS_FDS else 0
    clients = [socket.create_connection(listener.getsockname(), timeout=5)
               for _ in range(BATCH_OPS)]
    real = socket.socket
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if kwargs.get("fileno") is not None and len(calls) == 2:
            raise exc_type()
        return real(*args, **kwargs)

    # Every connection is in the listen backlog now (create_connection
    # returned), so the accepts all complete in the first wait: one batch.
    monkeypatch.setattr(socket, "socket", flaky)
    try:
        _batched(port, got, BATCH_OPS, method, exc_type)
    finally:
        monkeypatch.setattr(socket, "socket", real)
    assert len(got) == BATCH_OPS, got
    ok = [c for c in got if c.ok]
    lost = [c for c in got if not c.ok]
    assert len(ok) == BATCH_OPS - 1 and len(lost) == 1, got
    assert lost[0].error.errno == errno.ECONNABORTED and lost[0].data is None
    assert all(c.operation.done for c in got)
    for c in ok:
        c.data[0].close()
    del got, ok, lost
    for s in clients:
        s.close()
    if _COUNTS_FDS:
        assert _open_fds() == baseline
    stats = port.stats()
    assert stats["live_ops"] == 0 and stats["inflight"] == 0, stats


@pytest.mark.parametrize("exc_type", [KeyboardInterrupt, MemoryError])
@pytest.mark.parametrize("method", ["run", "get_many"])
def test_recv_batch_interrupted_in_bytes_copy_loses_nothing(
        make_port, exc_type, method):
    """The 2nd received-bytes copy of a batch raising: port buffers and
    records of the whole batch go back, the others deliver their bytes,
    the failed one reports ENOMEM/EINTR with data None."""
    port = make_port()
    pairs = [tcp_pair() for _ in range(BATCH_OPS)]
    got: list = []
    for i, (client, server) in enumerate(pairs):
        port.register(server, key=i)
        client.sendall(b"%d" % i * 100)
    # Data is already in every socket, so each recv completes at once.
    for _client, server in pairs:
        port.recv(server, 4096, got.append if method == "run" else None)
    iocp._core._test_fail_conversion_after(1, exc_type)
    try:
        _batched(port, got, BATCH_OPS, method, exc_type)
    finally:
        iocp._core._test_fail_conversion_after(-1)
    assert len(got) == BATCH_OPS, got
    ok = [c for c in got if c.ok]
    lost = [c for c in got if not c.ok]
    assert len(lost) == 1, got
    want_errno = errno.ENOMEM if exc_type is MemoryError else errno.EINTR
    assert lost[0].error.errno == want_errno and lost[0].data is None
    assert sorted(c.data for c in ok) == sorted(b"%d" % c.key * 100 for c in ok)
    stats = port.stats()
    assert stats["live_ops"] == 0 and stats["inflight"] == 0, stats
    assert stats["live_buffers"] == 0, stats
    for client, server in pairs:
        close_all(port, client, server)


def test_close_drains_a_batch_whose_conversion_fails(make_port):
    """close() converting a batch that raises finishes closing (nothing in
    flight, port freed) and then raises."""
    port = make_port()
    client, server = tcp_pair()
    port.register(server)
    client.sendall(b"data")
    port.recv(server, 10)
    port.recv(server, 10)
    iocp._core._test_fail_conversion_after(0, KeyboardInterrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            port.close()
    finally:
        iocp._core._test_fail_conversion_after(-1)
    assert port.closed
    stats = port.stats()
    assert stats["live_ops"] == 0 and stats["inflight"] == 0, stats
    client.close()
    server.close()
