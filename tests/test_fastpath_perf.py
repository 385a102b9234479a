"""The per-message shortcuts of the fast path, on every backend: how an op
finds its socket's descriptor (a direct call of the C ``fileno`` for an
exact, unmodified ``socket.socket``) and how a ``bytes`` send is pinned (a
strong reference, no buffer export).  They must behave exactly like the
general paths they short-cut."""

from __future__ import annotations

import socket

import pytest

import iocp
from tests.helpers import close_all, pump, tcp_pair


def recv_exactly(port: iocp.CompletionPort, sock: socket.socket, n: int) -> bytes:
    """Reads `n` bytes from `sock` while running the port (which may hand
    queued sends to the kernel only when it waits)."""
    sock.setblocking(False)
    out = bytearray()

    def ready() -> bool:
        try:
            while len(out) < n:
                chunk = sock.recv(n - len(out))
                if not chunk:
                    raise AssertionError("peer closed early")
                out.extend(chunk)
        except BlockingIOError:
            pass
        return len(out) >= n

    pump(port, ready)
    return bytes(out)


def settled(port: iocp.CompletionPort) -> bool:
    st = port.stats()
    return st["live_ops"] == 0 and st["inflight"] == 0 and st["pinned_buffers"] == 0


# ---------------------------------------------------------- descriptor lookup


def test_closed_socket_whose_fd_was_reused_is_not_confused(port):
    """A socket closed without unregister, its descriptor then reused by a
    newly registered socket: ops on the stale object must fail, never reach
    the new socket."""
    client1, server1 = tcp_pair()
    port.register(server1)
    port.send(server1, b"warm")                 # the fast path has seen it
    pump(port, lambda: settled(port))
    assert recv_exactly(port, client1, 4) == b"warm"
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    old_fd = server1.fileno()
    server1.close()                             # no unregister: a stale entry
    server2 = socket.socket()                   # the lowest free fd: old_fd
    if server2.fileno() != old_fd:
        server2.close()
        lsock.close()
        pytest.skip("the descriptor was not reused")
    server2.connect(lsock.getsockname())
    client2, _ = lsock.accept()
    lsock.close()
    with pytest.raises(ValueError, match="not registered"):
        port.send(server1, b"stale")
    port.register(server2, key="new")
    with pytest.raises(ValueError, match="not registered"):
        port.send(server1, b"stale")
    got: list[iocp.Completion] = []
    op = port.send(server2, b"fresh", got.append)
    pump(port, lambda: got)
    assert got[0].operation is op and got[0].key == "new" and got[0].ok
    assert op.socket is server2
    assert recv_exactly(port, client2, 5) == b"fresh"
    client1.settimeout(0.2)
    assert client1.recv(16) == b""             # nothing went to the old peer
    close_all(port, client1, client2, server2)


def test_socket_subclass_fileno_override_is_honoured(port):
    calls = []

    class Counting(socket.socket):
        def fileno(self) -> int:
            calls.append(1)
            return super().fileno()

    a, b = socket.socketpair()
    sub = Counting(a.family, a.type, a.proto, fileno=a.detach())
    port.register(sub)
    calls.clear()
    got: list[iocp.Completion] = []
    port.send(sub, b"sub", got.append)
    assert calls, "the subclass's fileno() was bypassed"
    pump(port, lambda: got)
    assert got[0].ok and recv_exactly(port, b, 3) == b"sub"
    close_all(port, sub, b)


def test_patched_socket_fileno_is_honoured_then_fast_again(port, monkeypatch):
    """Changing socket.socket itself invalidates the shortcut at once."""
    client, server = tcp_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    port.send(server, b"1", got.append)
    monkeypatch.setattr(socket.socket, "fileno", lambda self: -1)
    with pytest.raises(ValueError, match="not registered"):
        port.send(server, b"2", got.append)
    monkeypatch.undo()
    port.send(server, b"3", got.append)
    pump(port, lambda: len(got) == 2)
    assert all(c.ok for c in got)
    assert recv_exactly(port, client, 2) == b"13"
    close_all(port, client, server)


@pytest.mark.parametrize("bad", [None, 3, "sock", object()])
def test_non_socket_is_a_type_error(port, bad):
    with pytest.raises(TypeError, match="expected a socket.socket"):
        port.send(bad, b"x")
    with pytest.raises(TypeError, match="expected a socket.socket"):
        port.recv(bad, 10)
    assert settled(port)


def test_closed_registered_socket_is_not_registered(port):
    client, server = tcp_pair()
    port.register(server)
    server.close()
    with pytest.raises(ValueError, match="not registered"):
        port.send(server, b"x", silent=True)
    port.unregister(server)                     # still works once closed
    assert settled(port)
    client.close()


# ---------------------------------------------------------------- bytes pins


def test_bytes_send_is_pinned_until_its_completion(port):
    """A large bytes send stays pinned (counted) while the kernel holds it,
    and is released by its cancel; the Completion carries the Operation."""
    client, server = tcp_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    big = b"x" * (16 << 20)                     # the peer never reads
    first = port.send(server, big, got.append, silent=True)
    tail = port.send(server, b"tail", got.append, silent=True)
    assert port.stats()["pinned_buffers"] == 2
    del big
    assert tail.cancel() is True
    pump(port, lambda: tail.done)
    mine = [c for c in got if c.operation is tail]
    assert len(mine) == 1 and mine[0].cancelled
    assert isinstance(mine[0].operation, iocp.Operation) and mine[0].operation.kind == "send"
    port.unregister(server)
    pump(port, lambda: first.done)
    pump(port, lambda: settled(port))
    close_all(port, client, server)


@pytest.mark.parametrize("silent", [False, True])
def test_bytes_send_failure_reports_a_real_operation(port, silent):
    client, server = tcp_pair()
    port.register(server)
    server.shutdown(socket.SHUT_WR)
    got: list[iocp.Completion] = []
    op = port.send(server, b"too late", got.append, silent=silent)
    pump(port, lambda: got)
    assert len(got) == 1 and got[0].operation is op and isinstance(got[0].error, OSError)
    assert op.done and op.socket is server
    pump(port, lambda: settled(port))
    close_all(port, client, server)


@pytest.mark.parametrize("kind", ["bytes", "subclass", "bytearray", "memoryview"])
def test_every_bytes_like_sends_the_same(port, kind):
    class Sub(bytes):
        pass

    payload = bytes(range(256)) * 64
    data: object = {"bytes": payload, "subclass": Sub(payload),
                    "bytearray": bytearray(payload), "memoryview": memoryview(payload)}[kind]
    client, server = tcp_pair()
    port.register(server)
    for silent in (False, True):
        got: list[iocp.Completion] = []
        op = port.send(server, data, got.append, silent=silent)
        assert recv_exactly(port, client, len(payload)) == payload
        pump(port, lambda op=op: op.done)
        assert got == [] if silent else (len(got) == 1 and got[0].nbytes == len(payload))
    pump(port, lambda: settled(port))
    close_all(port, client, server)


def test_bytes_send_leaks_nothing_over_many_messages(port):
    client, server = tcp_pair()
    port.register(server)
    got: list[iocp.Completion] = []
    want = b""
    for i in range(500):
        msg = b"%05d" % i
        want += msg
        port.send(server, msg, got.append, silent=i % 2 == 0)
    assert recv_exactly(port, client, len(want)) == want
    pump(port, lambda: len(got) == 250 and settled(port))
    assert all(c.ok and c.nbytes == 5 for c in got)
    close_all(port, client, server)


# ------------------------------------------------------- attribute members


def test_completion_and_operation_attributes_are_read_only_members(port):
    client, server = tcp_pair()
    port.register(server, key="k")
    got: list[iocp.Completion] = []
    op = port.recv(server, 0, got.append, multishot=True)
    client.sendall(b"hello")
    pump(port, lambda: got)
    c = got[0]
    assert c.data == b"hello" and c.more is True and c.error is None
    assert c.key == "k" and c.operation is op and not c.cancelled
    assert op.socket is server and op.key == "k" and op.callback == got.append
    for obj, names in ((c, ("data", "more", "error", "key", "operation")),
                       (op, ("socket", "key", "callback"))):
        for name in names:
            assert type(obj).__dict__[name].__doc__, name
            with pytest.raises(AttributeError):
                setattr(obj, name, None)
    assert c.data == b"hello" and op.socket is server
    client.close()
    pump(port, lambda: op.done)
    last = got[-1]
    assert last.more is False and last.operation is op
    close_all(port, server)
