"""TLS over the iocp.aio transports: what is written is sent.

- ``start_tls()`` right after a write large enough to pause the plain
  protocol: the SSL protocol swapped in was never paused, so it must not
  get a ``resume_writing()`` (sslproto asserts on it) and the upgrade and
  the data that follow must go through.
- Data written before the connection closes is flushed, the TLS
  ``close_notify`` too: here the peer's ``close_notify`` arrives while a
  large write is still in flight, so the protocol closes the transport
  while it drains, and answers with its own ``close_notify`` from
  ``resume_writing()`` -- which must still be sent.

The peer is a plain blocking-socket thread, with every socket call bounded.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from typing import Any

import pytest

import iocp.aio

TIMEOUT = 30.0
BIG = 4 << 20


@pytest.fixture
def loop(make_port):
    lp = iocp.aio.EventLoop(make_port())
    errors: list[dict[str, Any]] = []
    lp.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    lp.errors = errors  # type: ignore[attr-defined]
    yield lp
    lp.close()


def _recv_exactly(sock: Any, n: int) -> int:
    got = 0
    while got < n:
        data = sock.recv(min(n - got, 1 << 16))
        if not data:
            raise ConnectionError(f"EOF after {got} of {n} bytes")
        got += len(data)
    return got


class _Peer(threading.Thread):
    """Accepts one connection and runs ``prog(conn)``; its outcome is kept."""

    def __init__(self, prog: Any) -> None:
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(TIMEOUT)
        self.prog = prog
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(TIMEOUT)
                self.result = self.prog(conn)
        except BaseException as exc:
            self.error = exc
        finally:
            self.listener.close()

    def outcome(self) -> Any:
        self.join(TIMEOUT)
        assert not self.is_alive(), "the peer thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def test_start_tls_right_after_a_large_write(loop, ssl_contexts) -> None:
    server_ctx, client_ctx = ssl_contexts

    def serve(conn: socket.socket) -> int:
        _recv_exactly(conn, BIG)  # the plain bytes
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"O")
            n = _recv_exactly(tls, BIG)
            tls.sendall(b"done")
            return n

    peer = _Peer(serve)
    peer.start()

    class Client(asyncio.Protocol):
        def __init__(self) -> None:
            self.paused = 0
            self.data = bytearray()
            self.got = loop.create_future()

        def pause_writing(self) -> None:
            self.paused += 1

        def data_received(self, data: bytes) -> None:
            self.data += data
            if self.data in (b"O", b"Odone") and not self.got.done():
                self.got.set_result(bytes(self.data))

    async def main() -> tuple[bytes, int]:
        tr, proto = await loop.create_connection(Client, *peer.listener.getsockname())
        tr.write(b"p" * BIG)  # more than the high-water mark: pauses Client
        paused = proto.paused
        tls = await loop.start_tls(tr, proto, client_ctx, server_hostname="localhost")
        assert await proto.got == b"O"
        proto.got = loop.create_future()
        tls.write(b"s" * BIG)
        assert await proto.got == b"Odone"
        tls.close()
        return bytes(proto.data), paused

    data, paused = loop.run_until_complete(asyncio.wait_for(main(), TIMEOUT))
    assert data == b"Odone"
    assert peer.outcome() == BIG
    assert loop.errors == []
    assert paused == 1  # the case under test did happen


def test_tls_close_notify_after_a_write_in_flight_is_sent(loop, ssl_contexts) -> None:
    server_ctx, client_ctx = ssl_contexts

    def serve(conn: socket.socket) -> tuple[int, bool]:
        # TLS by hand over memory BIOs, so close_notify can be sent without
        # waiting for the answer.
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = server_ctx.wrap_bio(inc, out, server_side=True)

        def take(n: int) -> bytes:
            buf = bytearray()
            while len(buf) < n:
                data = conn.recv(n - len(buf))
                if not data:
                    raise ConnectionError("EOF before the client's close_notify")
                buf += data
            return bytes(buf)

        def pump_in() -> None:
            # One TLS record at a time, so that when close_notify is sent
            # no application data is waiting unread in the BIO (OpenSSL's
            # shutdown would fail on it).
            header = take(5)
            inc.write(header + take(int.from_bytes(header[3:5], "big")))

        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                conn.sendall(out.read())
                pump_in()
        conn.sendall(out.read())
        got = 0
        while not got:  # the first record of the large write
            try:
                got += len(tls.read(1 << 16))
            except ssl.SSLWantReadError:
                pump_in()
        try:
            tls.unwrap()  # sends close_notify; the client's comes later
        except ssl.SSLWantReadError:
            pass
        conn.sendall(out.read())
        while True:
            try:
                chunk = tls.read(1 << 16)
            except ssl.SSLWantReadError:
                pump_in()
                continue
            except ssl.SSLZeroReturnError:
                return got, True  # the client's close_notify
            got += len(chunk)

    peer = _Peer(serve)
    peer.start()

    async def main() -> tuple[bytes, Any]:
        reader, writer = await asyncio.open_connection(
            *peer.listener.getsockname(), ssl=client_ctx, server_hostname="localhost"
        )
        writer.write(b"x" * BIG)
        try:
            data = await reader.read()  # b"" on the peer's close_notify
        except (BrokenPipeError, ConnectionResetError):
            data = b""
        writer.close()
        # The loop keeps running (some backends send only from it) until
        # the peer has seen everything.
        return data, await loop.run_in_executor(None, peer.outcome)

    data, (got, notified) = loop.run_until_complete(asyncio.wait_for(main(), 2 * TIMEOUT))
    assert data == b""
    assert notified
    assert got == BIG
