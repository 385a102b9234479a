"""A cancelled loop.sock_recv / sock_recv_into loses no byte that arrived.

The recv op may complete in the kernel after the future was cancelled (the
cancel raced with the arrival).  Those bytes are the stream's: the next
recv on the socket must get them, before anything that came later, and an
EOF or error that ended the stream behind them must still be reported.
Each round below sends from the peer and cancels in the same callback, so
both outcomes of the race happen; either way nothing may be missing.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

import iocp.aio

TIMEOUT = 10.0


@pytest.fixture
def loop(make_port):
    lp = iocp.aio.EventLoop(make_port())
    yield lp
    lp.close()


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def _recv_exactly(loop: Any, sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = await asyncio.wait_for(loop.sock_recv(sock, n - len(out)), TIMEOUT)
        assert data, f"EOF after {len(out)} of {n} bytes"
        out += data
    return bytes(out)


async def _started(loop: Any, coro: Any) -> asyncio.Task[Any]:
    """A task running ``coro``, after the loop has submitted its op."""
    task = loop.create_task(coro)
    for _ in range(3):  # task step, then a select() that submits
        await asyncio.sleep(0)
    assert not task.done()
    return task


@pytest.mark.parametrize("into", [False, True], ids=["recv", "recv_into"])
def test_cancelled_sock_recv_keeps_arrived_bytes(loop, into):
    a, b = _pair()
    rounds = 60

    async def main() -> bytes:
        got = bytearray()
        buf = bytearray(4096)
        for i in range(rounds):
            if into:
                task = await _started(loop, loop.sock_recv_into(a, buf))
            else:
                task = await _started(loop, loop.sock_recv(a, 4096))
            payload = b"%03d:" % i + bytes([65 + i % 26]) * (i % 7 + 1)
            b.send(payload)  # lands in the kernel (and may complete the recv)...
            task.cancel()  # ...before the loop sees the completion
            try:
                result = await task
            except asyncio.CancelledError:
                pass
            else:  # the completion came first after all: it counts
                got += buf[:result] if into else result
            need = len(
                b"".join(b"%03d:" % j + bytes([65 + j % 26]) * (j % 7 + 1) for j in range(i + 1))
            ) - len(got)
            if need:
                got += await _recv_exactly(loop, a, need)
        return bytes(got)

    try:
        got = loop.run_until_complete(main())
    finally:
        a.close()
        b.close()
    expected = b"".join(b"%03d:" % j + bytes([65 + j % 26]) * (j % 7 + 1) for j in range(rounds))
    assert got == expected


def test_cancelled_sock_recv_then_eof_in_order(loop):
    """Data then EOF behind a cancelled recv: the next recvs see the data,
    then b"" -- also for recvs issued before the orphan completed."""
    a, b = _pair()

    async def main() -> list[bytes]:
        out = []
        for _ in range(20):
            task = await _started(loop, loop.sock_recv(a, 3))
            b.send(b"abcdefg")
            task.cancel()
            # Issued at once, while the cancelled op may still be in flight.
            nxt = loop.create_task(loop.sock_recv(a, 3))
            try:
                first = await task
            except asyncio.CancelledError:
                first = b""
            second = await asyncio.wait_for(nxt, TIMEOUT)
            rest = first + second
            while len(rest) < 7:
                rest += await _recv_exactly(loop, a, 1)
            out.append(rest)
        task = await _started(loop, loop.sock_recv(a, 10))
        b.shutdown(socket.SHUT_WR)  # the EOF may complete the cancelled recv
        task.cancel()
        try:
            out.append(await task)
        except asyncio.CancelledError:
            out.append(await asyncio.wait_for(loop.sock_recv(a, 10), TIMEOUT))
        return out

    try:
        out = loop.run_until_complete(main())
    finally:
        a.close()
        b.close()
    assert out == [b"abcdefg"] * 20 + [b""]


def test_sock_recv_zero_bytes(loop):
    a, b = _pair()

    async def main() -> tuple[bytes, int]:
        return (
            await asyncio.wait_for(loop.sock_recv(a, 0), TIMEOUT),
            await asyncio.wait_for(loop.sock_recv_into(a, bytearray()), TIMEOUT),
        )

    try:
        assert loop.run_until_complete(main()) == (b"", 0)
    finally:
        a.close()
        b.close()
