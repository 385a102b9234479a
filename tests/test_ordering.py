"""Per-socket ordering, on every backend.

Several sends in flight on one stream socket are written in submission
order, and several receives in flight get the socket's bytes in submission
order (a later receive never holds bytes that precede an earlier one's).
These are the guarantees of WSASend/WSARecv on one socket; the Linux
backends keep them with per-socket, per-direction FIFOs.

Also here: submissions made while another thread is inside a callback start
at once (they are not held until that thread polls again), and so do
submissions made by a callback whose loop then stops.

Every wait is bounded; nothing here depends on timing.  The peer side of
each connection is a plain blocking socket with a timeout, so a test that
goes wrong fails with ``socket.timeout`` instead of hanging.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

import iocp

from .helpers import close_all, tcp_pair

WAIT = 60.0  # seconds: a bound, never expected to be reached


def _small_buffers(sender: socket.socket, receiver: socket.socket | None = None) -> None:
    """A small send buffer, so big sends are written in many short pieces;
    a bounded receive buffer if `receiver` is given, so a peer that does
    not read stops the sender soon.  (Not tiny: windows of a few KB make
    loopback TCP crawl through delayed ACKs.)"""
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    if receiver is not None:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)


class _Reader(threading.Thread):
    """Reads a blocking socket until `want` bytes (or EOF, or an error)."""

    def __init__(self, sock: socket.socket, want: int) -> None:
        super().__init__(daemon=True)
        self.sock = sock
        self.want = want
        self.data = bytearray()
        self.error: BaseException | None = None

    def run(self) -> None:
        self.sock.settimeout(WAIT)
        try:
            while len(self.data) < self.want:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    break
                self.data += chunk
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self) -> bytes:
        self.join(WAIT + 5)
        assert not self.is_alive(), "reader thread did not finish"
        if self.error is not None:
            raise self.error
        return bytes(self.data)


def _collect(port: iocp.CompletionPort, ops: list[iocp.Operation]) -> dict:
    """Takes completions until every op in `ops` has its final one."""
    want = {id(op) for op in ops}
    got: dict[int, iocp.Completion] = {}
    deadline = time.monotonic() + WAIT
    while want - got.keys():
        left = deadline - time.monotonic()
        assert left > 0, f"{len(want - got.keys())} of {len(ops)} ops never completed"
        for c in port.get_many(256, min(left, 1.0)):
            if not c.more:
                got[id(c.operation)] = c
    return got


def _first_diff(a: bytes, b: bytes) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at offset {i}: {x} != {y}"
    return f"lengths {len(a)} != {len(b)}"


def _check_stream(got: bytes, want: bytes) -> None:
    # Not `assert got == want`: pytest's diff of megabytes takes minutes.
    if got != want:
        pytest.fail(_first_diff(got, want))


def test_many_large_sends_arrive_in_submission_order(make_port):
    port = make_port()
    client, server = tcp_pair()
    _small_buffers(client)
    port.register(client)
    chunks = [bytes([i % 251 + 1]) * 200_000 for i in range(40)]
    want = b"".join(chunks)
    reader = _Reader(server, len(want))
    ops = [port.send(client, c) for c in chunks]
    reader.start()
    done = _collect(port, ops)
    _check_stream(reader.finish(), want)
    for op, c in zip(ops, chunks):
        assert done[id(op)].ok and done[id(op)].nbytes == len(c)
    close_all(port, client, server)


def test_gathered_and_plain_sends_keep_their_order(make_port):
    port = make_port()
    client, server = tcp_pair()
    _small_buffers(client)
    port.register(client)
    ops, pieces = [], []
    for i in range(30):
        b = i % 250 + 1
        if i % 2:
            parts = [bytes([b]) * 30_000, bytearray([b]) * 50_000, memoryview(bytes([b]) * 20_000)]
            ops.append(port.sendmsg(client, parts))
            pieces.extend(bytes(p) for p in parts)
        else:
            data = bytes([b]) * 100_000
            ops.append(port.send(client, data))
            pieces.append(data)
    want = b"".join(pieces)
    reader = _Reader(server, len(want))
    reader.start()
    done = _collect(port, ops)
    _check_stream(reader.finish(), want)
    assert all(done[id(op)].ok and done[id(op)].nbytes == 100_000 for op in ops)
    close_all(port, client, server)


def test_several_recvs_in_flight_get_bytes_in_submission_order(make_port):
    port = make_port()
    client, server = tcp_pair()
    port.register(server)
    stream = bytes(i * 7 % 256 for i in range(600_000))
    ops: list[iocp.Operation] = []
    sizes = [1000, 4096, 1, 70_000, 333, 65536, 8192, 17]

    def post(i: int) -> None:
        n = sizes[i % len(sizes)]
        if i % 2:
            ops.append(port.recv_into(server, bytearray(n)))
        else:
            ops.append(port.recv(server, n))

    for i in range(8):  # all posted before any byte is written
        post(i)

    def write() -> None:
        client.sendall(stream)
        client.shutdown(socket.SHUT_WR)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    results: dict[int, bytes] = {}
    received = eof = 0
    deadline = time.monotonic() + WAIT
    while len(results) < len(ops):
        left = deadline - time.monotonic()
        assert left > 0, "receives never completed"
        for c in port.get_many(64, min(left, 1.0)):
            assert c.ok, c.error
            if c.kind == "recv":
                data = bytes(c.data)
            else:
                data = bytes(c.data[: c.nbytes])
            results[id(c.operation)] = data
            received += len(data)
            eof += not data
            # Keep eight in flight until the stream is in; after that the
            # ones left see the peer's EOF.
            if received < len(stream) and not eof:
                post(len(ops))
    writer.join(WAIT)
    assert not writer.is_alive()
    joined = b"".join(results[id(op)] for op in ops)
    _check_stream(joined, stream)
    # The EOFs come last: no receive after an empty one got data.
    lengths = [len(results[id(op)]) for op in ops]
    first_eof = lengths.index(0)
    assert not any(lengths[first_eof:])
    close_all(port, client, server)


def test_cancel_a_queued_send_in_the_middle_then_continue(make_port, backend):
    port = make_port()
    client, server = tcp_pair()
    _small_buffers(client, server)
    port.register(client)
    # The first send cannot finish while nobody reads: the ones behind it
    # are queued, so cancelling the middle one has nothing to race with on
    # the Linux backends.  (On Windows it may already be buffered; then it
    # completes with what it wrote, which the check below accepts.)
    chunks = [b"\x01" * 4_000_000, b"\x02" * 100_000, b"\x03" * 100_000]
    ops = [port.send(client, c) for c in chunks]
    assert ops[1].cancel()
    later = [b"\x04" * 50_000, b"\x05" * 50_000]
    ops += [port.send(client, c) for c in later]
    chunks += later
    assert ops[3].cancel()
    reader = _Reader(server, sum(map(len, chunks)))
    reader.start()
    done = _collect(port, ops)
    close_all(port, client)
    got = reader.finish()
    results = [done[id(op)] for op in ops]
    if backend in ("io_uring", "epoll"):
        for i in (1, 3):
            assert results[i].cancelled and results[i].nbytes == 0, results[i]
        for i in (0, 2, 4):
            assert results[i].ok and results[i].nbytes == len(chunks[i]), results[i]
    for c in results:
        assert c.ok or c.cancelled, c
    # Whatever each send wrote, the stream holds it in submission order.
    _check_stream(got, b"".join(ch[: c.nbytes] for ch, c in zip(chunks, results)))
    server.close()


@pytest.mark.parametrize("how", ["unregister", "close"])
def test_full_fifos_cancel_without_leaks(make_port, backend, how):
    port = make_port()
    client, server = tcp_pair()
    _small_buffers(client, server)
    port.register(client)
    sends = [port.send(client, bytes([i + 1]) * 500_000) for i in range(10)]
    recvs = [port.recv(client, 1000) if i % 2 else port.recv_into(client, bytearray(1000))
             for i in range(10)]
    ops = sends + recvs
    if how == "close":
        port.close()  # cancels everything and drains; the fixture checks leaks
        assert all(op.done for op in ops)
        client.close()
        server.close()
        return
    port.unregister(client)
    done = _collect(port, ops)
    for op in recvs:
        assert done[id(op)].cancelled, done[id(op)]
    for op in sends:
        assert done[id(op)].ok or done[id(op)].cancelled, done[id(op)]
    if backend in ("io_uring", "epoll"):
        # Queued behind a send that cannot finish: never started.
        for op in sends[1:]:
            assert done[id(op)].cancelled and done[id(op)].nbytes == 0, done[id(op)]
    client.close()
    server.close()


# ---- submissions are not held back while another thread dispatches ----------


def test_send_from_another_thread_starts_while_a_callback_runs(make_port):
    port = make_port()
    client, server = tcp_pair()
    port.register(client)
    inside, release, sent = threading.Event(), threading.Event(), threading.Event()

    def blocker(c: iocp.Completion) -> None:
        inside.set()
        release.wait(WAIT)

    loop = threading.Thread(target=port.run, kwargs={"timeout": WAIT}, daemon=True)
    port.post(callback=blocker)
    loop.start()
    try:
        assert inside.wait(WAIT), "the loop never ran the callback"
        port.send(client, b"not held back", callback=lambda c: sent.set())
        server.settimeout(5.0)  # the loop thread is parked in blocker()
        got = b""
        while len(got) < 13:
            chunk = server.recv(64)
            assert chunk
            got += chunk
        assert got == b"not held back"
        assert not release.is_set()
    finally:
        release.set()
    assert sent.wait(WAIT)
    port.stop()
    loop.join(WAIT)
    assert not loop.is_alive()
    close_all(port, client, server)


def test_send_from_a_callback_starts_when_the_loop_stops(make_port):
    port = make_port()
    client, server = tcp_pair()
    port.register(client)
    ops: list[iocp.Operation] = []

    def submit_and_stop(c: iocp.Completion) -> None:
        ops.append(port.send(client, b"after stop"))
        port.stop()

    port.post(callback=submit_and_stop)
    port.run(timeout=WAIT)
    assert ops
    # Nobody waits on the port now: the send must be in the kernel anyway.
    server.settimeout(5.0)
    got = b""
    while len(got) < 10:
        chunk = server.recv(64)
        assert chunk
        got += chunk
    assert got == b"after stop"
    done = _collect(port, ops)
    assert done[id(ops[0])].ok
    close_all(port, client, server)
