"""iocp.aio: asyncio on the completion port, on every backend.

Where behaviour is observable (callback order, protocol events, results)
the same scenario also runs on the stdlib loop and the two must agree.
Every iocp loop is closed at teardown and its port must hold nothing:
no live op records, nothing in flight, no pinned or port buffers.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import iocp
import iocp.aio

TIMEOUT = 60.0


def _leak_free(loop: iocp.aio.EventLoop) -> None:
    stats = loop.port.stats()
    for k in ("live_ops", "inflight", "pinned_buffers", "live_buffers"):
        assert stats[k] == 0, stats


@pytest.fixture
def aloop(backend: str):
    """An iocp event loop on the current backend, closed and leak-checked."""
    loop = iocp.aio.EventLoop(backend=backend)
    assert loop.backend == backend
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    if not loop.is_closed():
        loop.close()
    _leak_free(loop)


def run(loop: asyncio.AbstractEventLoop, coro, timeout: float = TIMEOUT):
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


def on_stdlib(scenario):
    """Runs an async scenario on a fresh stdlib loop and returns its result."""
    loop = asyncio.new_event_loop()
    try:
        return run(loop, scenario())
    finally:
        loop.close()


def inflight_settles(loop, baseline: int) -> None:
    """Turns the loop until the port's in-flight count is back to baseline."""

    async def settle():
        for _ in range(200):
            if loop.port.stats()["inflight"] <= baseline:
                return
            await asyncio.sleep(0.01)

    run(loop, settle())
    assert loop.port.stats()["inflight"] <= baseline, loop.port.stats()


# ------------------------------------------------------------------ basics


def test_run_returns_and_closes(backend: str) -> None:
    seen = {}

    async def main():
        loop = asyncio.get_running_loop()
        seen["loop"] = loop
        await asyncio.sleep(0.01)
        return 42

    assert iocp.aio.run(main(), backend=backend) == 42
    loop = seen["loop"]
    assert isinstance(loop, iocp.aio.EventLoop)
    assert loop.is_closed()
    _leak_free(loop)


def test_policy_install() -> None:
    old = asyncio.get_event_loop_policy()
    try:
        iocp.aio.install()
        loop = asyncio.new_event_loop()
        try:
            assert isinstance(loop, iocp.aio.EventLoop)
        finally:
            loop.close()
        assert asyncio.run(asyncio.sleep(0, "ok")) == "ok"
    finally:
        asyncio.set_event_loop_policy(old)


def test_new_event_loop_backend(backend: str) -> None:
    loop = iocp.aio.new_event_loop(backend=backend)
    try:
        assert loop.port.backend == backend
    finally:
        loop.close()
    _leak_free(loop)


async def _timers():
    loop = asyncio.get_running_loop()
    order = []
    for d in (0.05, 0.01, 0.03, 0.0, 0.02):
        loop.call_later(d, order.append, f"later{d}")
    for i in range(3):
        loop.call_soon(order.append, f"soon{i}")
    h = loop.call_later(0.015, order.append, "cancelled")
    h.cancel()
    loop.call_at(loop.time() + 0.025, order.append, "at0.025")
    t0 = loop.time()
    await asyncio.sleep(0.08)
    return order, loop.time() - t0 >= 0.08 - 0.002


def test_timers_ordering_matches_stdlib(aloop) -> None:
    got = run(aloop, _timers())
    assert got == on_stdlib(_timers)
    assert got[0][:3] == ["soon0", "soon1", "soon2"]


async def _threadsafe():
    loop = asyncio.get_running_loop()
    n_threads, per = 8, 200
    done = loop.create_future()
    count = [0]

    def bump():
        count[0] += 1
        if count[0] == n_threads * per:
            done.set_result(None)

    def worker():
        for _ in range(per):
            loop.call_soon_threadsafe(bump)

    threads = [threading.Thread(target=worker) for _ in range(n_threads)]
    for t in threads:
        t.start()
    await done
    for t in threads:
        t.join(TIMEOUT)  # they have made every call already
    # A single wake-up from an idle loop, also from a thread.
    fut = loop.create_future()
    threading.Timer(0.05, loop.call_soon_threadsafe, (fut.set_result, "woken")).start()
    return count[0], await fut


def test_call_soon_threadsafe_from_threads(aloop) -> None:
    got = run(aloop, _threadsafe())
    assert got == on_stdlib(_threadsafe) == (1600, "woken")


def test_loop_in_a_thread(backend: str) -> None:
    out = {}

    def target():
        try:
            out["result"] = iocp.aio.run(_echo_streams(10, 2), backend=backend)
        except BaseException as exc:  # pragma: no cover - reported below
            out["result"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join(TIMEOUT)
    assert out.get("result") == 20


def test_run_in_executor(aloop) -> None:
    async def main():
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, sum, range(10))

    assert run(aloop, main()) == 45


# ------------------------------------------------------------------ streams


async def _echo_streams(n_conns: int, n_msgs: int, family=socket.AF_INET):
    host = "127.0.0.1" if family == socket.AF_INET else "::1"

    handlers_done = asyncio.Event()
    finished = [0]

    async def handle(reader, writer):
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                writer.write(line)
                await writer.drain()
        finally:
            writer.close()
            finished[0] += 1
            if finished[0] == n_conns:
                handlers_done.set()

    server = await asyncio.start_server(handle, host, 0, backlog=2048)
    port = server.sockets[0].getsockname()[1]

    async def client(i: int) -> int:
        reader, writer = await asyncio.open_connection(host, port)
        ok = 0
        for j in range(n_msgs):
            msg = f"conn {i} msg {j} {'x' * (j * 100)}\n".encode()
            writer.write(msg)
            await writer.drain()
            ok += (await reader.readline()) == msg
        writer.close()
        await writer.wait_closed()
        return ok

    results = await asyncio.gather(*(client(i) for i in range(n_conns)))
    await handlers_done.wait()  # Server.wait_closed() waits for them only on 3.12+
    server.close()
    await server.wait_closed()
    return sum(results)


def test_streams_echo_1000_connections(aloop, many_fds) -> None:
    t0 = time.monotonic()
    assert run(aloop, _echo_streams(1000, 3)) == 3000
    assert time.monotonic() - t0 < TIMEOUT


def test_streams_echo_ipv6(aloop) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback")
    assert run(aloop, _echo_streams(5, 3, socket.AF_INET6)) == 15


async def _big_transfer():
    payload = os.urandom(4 * 1024 * 1024)

    async def handle(reader, writer):
        data = await reader.readexactly(len(payload))
        writer.write(data[::-1])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    writer.write(payload)
    back = await reader.read()  # to EOF
    writer.close()
    server.close()
    await server.wait_closed()
    return back == payload[::-1]


def test_streams_large_transfer_backpressure(aloop) -> None:
    assert run(aloop, _big_transfer())


async def _protocol_events():
    events: list = []
    loop = asyncio.get_running_loop()
    closed = loop.create_future()

    class Server(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport
            events.append(("s", "made", transport.get_extra_info("peername") is not None))

        def data_received(self, data):
            events.append(("s", "data", data))
            self.t.write(data.upper())

        def eof_received(self):
            events.append(("s", "eof"))
            self.t.write(b"bye")
            return False  # closes the transport

        def connection_lost(self, exc):
            events.append(("s", "lost", exc))

    class Client(asyncio.Protocol):
        def __init__(self):
            self.buf = b""

        def data_received(self, data):
            self.buf += data

        def connection_lost(self, exc):
            closed.set_result(self.buf)

    server = await loop.create_server(Server, "127.0.0.1", 0)
    addr = server.sockets[0].getsockname()
    transport, proto = await loop.create_connection(Client, *addr)
    transport.write(b"hello")
    while proto.buf != b"HELLO":
        await asyncio.sleep(0.005)
    transport.write_eof()
    got = await closed
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.01)
    return events, got


def test_create_server_protocol_matches_stdlib(aloop) -> None:
    got = run(aloop, _protocol_events())
    assert got == on_stdlib(_protocol_events)
    assert got[1] == b"HELLObye"


@pytest.mark.skipif(not hasattr(asyncio, "start_unix_server"), reason="no Unix sockets")
def test_unix_streams(aloop, tmp_path) -> None:
    path = str(tmp_path / "s.sock")

    async def main():
        async def handle(reader, writer):
            writer.write(await reader.read(100))
            writer.close()

        server = await asyncio.start_unix_server(handle, path)
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"over unix")
        got = await reader.read()
        writer.close()
        server.close()
        await server.wait_closed()
        return got

    assert run(aloop, main()) == b"over unix"


# ------------------------------------------------------------------ sock_*


async def _sock_functions():
    loop = asyncio.get_running_loop()
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(8)
    ls.setblocking(False)
    cs = socket.socket()
    cs.setblocking(False)
    accept = asyncio.ensure_future(loop.sock_accept(ls))
    await loop.sock_connect(cs, ("localhost", ls.getsockname()[1]))  # resolved off-loop
    conn, addr = await accept
    assert addr == cs.getsockname()
    blocking = conn.getblocking()
    big = os.urandom(2 * 1024 * 1024)
    send = asyncio.ensure_future(loop.sock_sendall(cs, big))
    got = bytearray()
    buf = bytearray(65536)
    while len(got) < len(big):
        if len(got) % 2:
            got += await loop.sock_recv(conn, 65536)
        else:
            n = await loop.sock_recv_into(conn, buf)
            got += buf[:n]
    assert await send is None
    cs.shutdown(socket.SHUT_WR)
    eof = await loop.sock_recv(conn, 10)
    for s in (conn, cs, ls):
        s.close()
    return bytes(got) == big, eof, blocking


def test_sock_functions_match_stdlib(aloop) -> None:
    got = run(aloop, _sock_functions())
    assert got == (True, b"", False)
    if os.environ.get("IOCP_UNDER_WINE"):
        return  # the stdlib proactor's sock_connect fails under Wine (WinError 10022)
    assert on_stdlib(_sock_functions) == got


def test_sock_connect_refused(aloop) -> None:
    async def main():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        addr = s.getsockname()
        s.close()
        c = socket.socket()
        c.setblocking(False)
        try:
            with pytest.raises(ConnectionRefusedError):
                await asyncio.get_running_loop().sock_connect(c, addr)
        finally:
            c.close()

    run(aloop, main())


def test_sock_recv_on_a_socket_closed_meanwhile(aloop) -> None:
    # Ops are submitted when issued: a recv on a registered socket closed
    # behind the loop's back fails at once; the loop must not sleep on
    # waiting for a completion that will never come.
    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        await loop.sock_sendall(a, b"x")  # registers a
        a.close()  # the socket goes before the recv is issued
        b.close()
        fut = asyncio.ensure_future(loop.sock_recv(a, 10))
        loop.call_later(3, fut.cancel)  # the failure mode: nothing wakes the loop
        t0 = loop.time()
        try:
            await fut
        except (OSError, ValueError) as exc:
            return type(exc), loop.time() - t0 < 2
        return None

    exc_type, prompt = run(aloop, main())
    assert issubclass(exc_type, (OSError, ValueError)) and prompt


def test_sock_sendfile_falls_back(aloop, tmp_path) -> None:
    data = os.urandom(300_000)
    f = tmp_path / "f.bin"
    f.write_bytes(data)

    async def main():
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        with open(f, "rb") as fh:
            sent = asyncio.ensure_future(loop.sock_sendfile(a, fh))
            got = b""
            while len(got) < len(data):
                got += await loop.sock_recv(b, 65536)
            n = await sent
        a.close()
        b.close()
        return n, got == data

    assert run(aloop, main()) == (len(data), True)


def test_write_issued_during_a_run_starts_before_it_ends(aloop) -> None:
    # Ops are batched into the next wait; the end of a run submits the rest.
    a, b = socket.socketpair()

    async def main():
        loop = asyncio.get_running_loop()
        t, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        return t

    t = run(aloop, main())
    aloop.call_soon(t.write, b"sent before the loop stopped")  # the run's last iteration
    aloop.call_soon(aloop.stop)
    aloop.run_forever()
    b.settimeout(5)
    assert b.recv(100) == b"sent before the loop stopped"  # the loop is not running
    t.close()
    aloop.run_until_complete(asyncio.sleep(0.01))
    b.close()


def test_debug_mode_echo(aloop) -> None:
    aloop.set_debug(True)
    assert run(aloop, _echo_streams(20, 3)) == 60


# ------------------------------------------------------------------ cancellation


def test_cancel_pending_sock_recv_no_leak(aloop) -> None:
    a, b = socket.socketpair()
    base = None

    async def main():
        nonlocal base
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)
        base = loop.port.stats()["inflight"]
        for _ in range(20):
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(loop.sock_recv(a, 100), 0.01)
        # The socket still works after the cancelled reads.
        b.send(b"after")
        return await loop.sock_recv(a, 100)

    assert run(aloop, main()) == b"after"
    inflight_settles(aloop, base)
    a.close()
    b.close()


def test_cancel_stream_read_no_leak(aloop) -> None:
    async def main():
        async def handle(reader, writer):
            await asyncio.sleep(0.3)
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
        task = asyncio.ensure_future(reader.read(100))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()

    run(aloop, main())


def test_close_with_everything_pending_leaks_nothing(backend: str) -> None:
    loop = iocp.aio.EventLoop(backend=backend)
    a, b = socket.socketpair()

    async def main():
        held = []  # the server side stays open (a dropped StreamWriter closes on 3.12+)
        server = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()[:2]
        conns = [await asyncio.open_connection(*addr) for _ in range(5)]
        for r, _ in conns:
            asyncio.ensure_future(r.read(10))
        asyncio.ensure_future(loop.sock_recv(a, 10))
        asyncio.ensure_future(loop.sock_sendall(a, b"x" * (8 << 20)))
        await asyncio.sleep(0.05)
        assert loop.port.stats()["inflight"] >= 12  # 10 reads, accept, sock_recv
        return server, conns + [(None, w) for w in held]

    server, conns = run(loop, main())
    for _, w in conns:
        w.transport.abort()
    server.close()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    _leak_free(loop)
    a.close()
    b.close()


# ------------------------------------------------------------------ POSIX extras


needs_posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")


@needs_posix
def test_add_reader_writer(aloop) -> None:
    async def main():
        loop = asyncio.get_running_loop()
        r, w = os.pipe()
        os.set_blocking(r, False)
        got = loop.create_future()
        fired = []

        def on_read():
            fired.append(os.read(r, 100))
            if not got.done():
                got.set_result(fired[-1])

        loop.add_reader(r, on_read)
        await asyncio.sleep(0.02)
        assert fired == []  # not readable yet
        os.write(w, b"ping")
        assert await got == b"ping"
        assert loop.remove_reader(r) is True
        assert loop.remove_reader(r) is False
        writable = loop.create_future()
        loop.add_writer(w, lambda: writable.done() or writable.set_result(True))
        assert await writable
        assert loop.remove_writer(w)
        os.close(r)
        os.close(w)
        # Level-triggered: an unread socket fires again until drained.
        a, b = socket.socketpair()
        count = [0]
        enough = loop.create_future()

        def on_sock():
            count[0] += 1
            if count[0] == 3:
                a.recv(10)
                enough.set_result(None)

        loop.add_reader(a, on_sock)
        b.send(b"x")
        await enough
        await asyncio.sleep(0.02)
        loop.remove_reader(a)
        a.close()
        b.close()
        return count[0]

    assert run(aloop, main()) == 3


@needs_posix
def test_signal_handler(aloop) -> None:
    async def main():
        loop = asyncio.get_running_loop()
        got = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR1, got.set_result, "usr1")
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
        res = await got
        assert loop.remove_signal_handler(signal.SIGUSR1)
        return res

    assert run(aloop, main()) == "usr1"
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


@needs_posix
@pytest.mark.needs_sigint
def test_keyboard_interrupt_stops_run(aloop) -> None:
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    t0 = time.monotonic()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        aloop.run_until_complete(asyncio.sleep(30))
    assert time.monotonic() - t0 < 5
    timer.join(5)
    # The loop is still usable afterwards.
    assert aloop.run_until_complete(asyncio.sleep(0.01, "again")) == "again"


@needs_posix
@pytest.mark.needs_sigint
def test_keyboard_interrupt_stops_iocp_aio_run(backend: str) -> None:
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        iocp.aio.run(asyncio.sleep(30), backend=backend)
    assert time.monotonic() - t0 < 5
    timer.join(5)


@needs_posix
def test_subprocess(aloop) -> None:
    async def main():
        p = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys; sys.stdout.write(sys.stdin.read().upper())",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await p.communicate(b"hello subprocess")
        q = await asyncio.create_subprocess_shell("exit 3")
        return out, p.returncode, await q.wait()

    assert run(aloop, main()) == (b"HELLO SUBPROCESS", 0, 3)


async def _datagrams():
    loop = asyncio.get_running_loop()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.t = transport

        def datagram_received(self, data, addr):
            self.t.sendto(data.upper(), addr)

    class Client(asyncio.DatagramProtocol):
        def __init__(self):
            self.got = loop.create_future()
            self.n = []

        def datagram_received(self, data, addr):
            self.n.append(data)
            if len(self.n) == 3:
                self.got.set_result(self.n)

    st, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    addr = st.get_extra_info("sockname")
    ct, cp = await loop.create_datagram_endpoint(Client, remote_addr=addr)
    for m in (b"a", b"b", b"c"):
        ct.sendto(m)
    got = await cp.got
    ct.close()
    st.close()
    await asyncio.sleep(0.01)
    return sorted(got)


def test_datagram_endpoint_matches_stdlib(aloop) -> None:
    got = run(aloop, _datagrams())
    assert got == on_stdlib(_datagrams) == [b"A", b"B", b"C"]


# ------------------------------------------------------------------ SSL


def _self_signed(tmpdir: str) -> tuple[str, str]:
    cert, key = os.path.join(tmpdir, "cert.pem"), os.path.join(tmpdir, "key.pem")
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if shutil.which("openssl") is None:
            pytest.skip("neither cryptography nor the openssl CLI to make a certificate")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        return cert, key
    import ipaddress

    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(k.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(k, hashes.SHA256())
    )
    with open(cert, "wb") as fh:
        fh.write(c.public_bytes(serialization.Encoding.PEM))
    with open(key, "wb") as fh:
        fh.write(
            k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert, key


def test_ssl_echo(aloop, ssl_contexts) -> None:
    server_ctx, client_ctx = ssl_contexts

    async def main():
        async def handle(reader, writer):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
        port = server.sockets[0].getsockname()[1]
        results = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"
            )
            payload = os.urandom(300_000)
            writer.write(payload)
            got = await reader.readexactly(len(payload))
            results.append(got == payload)
            results.append(writer.get_extra_info("ssl_object").version())
            writer.close()
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return results

    res = run(aloop, main())
    assert res[0::2] == [True] * 3
    assert res[1].startswith("TLS")


async def _start_tls(server_ctx, client_ctx):
    loop = asyncio.get_running_loop()

    class Server(asyncio.Protocol):
        def connection_made(self, transport):
            self.t = transport
            self.q = asyncio.Queue()

        def data_received(self, data):
            if data == b"STARTTLS\n":
                self.t.pause_reading()  # nothing read in clear after this
                self.t.write(b"OK\n")
                asyncio.ensure_future(self.upgrade())
            else:  # decrypted; may come before start_tls() has returned
                self.q.put_nowait(data)

        async def upgrade(self):
            tls = await loop.start_tls(self.t, self, server_ctx, server_side=True)
            tls.write((await self.q.get()).upper())

    class Client(asyncio.Protocol):
        def __init__(self):
            self.q = asyncio.Queue()

        def data_received(self, data):
            self.q.put_nowait(data)

    server = await loop.create_server(Server, "127.0.0.1", 0)
    t, p = await loop.create_connection(Client, *server.sockets[0].getsockname()[:2])
    t.write(b"STARTTLS\n")
    assert await p.q.get() == b"OK\n"
    t = await loop.start_tls(t, p, client_ctx, server_hostname="localhost")
    t.write(b"secret")
    got = await p.q.get()
    tls = t.get_extra_info("ssl_object").version().startswith("TLS")
    t.close()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.01)
    return got, tls


def test_start_tls_matches_stdlib(aloop, ssl_contexts) -> None:
    got = run(aloop, _start_tls(*ssl_contexts))
    assert got == on_stdlib(lambda: _start_tls(*ssl_contexts)) == (b"SECRET", True)


# ------------------------------------------------------------------ aiohttp


def test_aiohttp_roundtrip(aloop) -> None:
    aiohttp = pytest.importorskip("aiohttp")
    from aiohttp import web

    async def main():
        async def hello(request):
            body = await request.read()
            return web.json_response({"len": len(body), "path": request.path})

        app = web.Application()
        app.router.add_post("/echo", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        out = []
        async with aiohttp.ClientSession() as session:
            for i in range(20):
                async with session.post(
                    f"http://127.0.0.1:{port}/echo", data=b"x" * (i * 1000)
                ) as resp:
                    out.append((resp.status, (await resp.json())["len"]))
        await runner.cleanup()
        return out

    assert run(aloop, main()) == [(200, i * 1000) for i in range(20)]


# ------------------------------------------------------------------ bench


def test_bench_runner_finds_the_aio_loop(backend: str) -> None:
    servers = pytest.importorskip("iocp.bench.servers")
    assert servers._need_aio() is None
    loop = servers._aio_loop(backend)
    try:
        assert isinstance(loop, iocp.aio.EventLoop)
        assert loop.backend == backend
    finally:
        loop.close()
    _leak_free(loop)
