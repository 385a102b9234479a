"""iocp.aio behaves as asyncio's own loops where issue 11 says it must, on
every backend, and its private stdlib names come from one gated module.

Where asyncio has a selector loop to compare with, the same call runs on
``asyncio.SelectorEventLoop`` in the same test and the two must agree:
the same exception type and the same message.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

import iocp.aio
from iocp.aio import _compat
from tests import test_aio

# test_aio's per-backend loop fixture (closed and leak-checked) and helpers.
aloop = test_aio.aloop
_leak_free = test_aio._leak_free
run = test_aio.run

needs_posix = pytest.mark.skipif(sys.platform == "win32", reason="POSIX only")
ROOT = Path(__file__).resolve().parent.parent


def outcome(loop: asyncio.AbstractEventLoop, make_coro) -> tuple[str, str]:
    """('ok', repr(result)) or (exception type name, message) of a call."""
    try:
        result = run(loop, make_coro(), timeout=10)
    except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
        return type(exc).__name__, str(exc)
    if isinstance(result, tuple) and len(result) == 2:  # (transport, protocol)
        result[0].close()
    elif isinstance(result, asyncio.AbstractServer):
        result.close()
    return "ok", type(result).__name__


def on_selector(make_coro) -> tuple[str, str]:
    loop = asyncio.SelectorEventLoop()
    try:
        return outcome(loop, make_coro)
    finally:
        loop.close()


def current_wakeup_fd() -> int:
    fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(fd)
    return fd


# ------------------------------------------------------------ the compat module


def test_private_stdlib_names_come_from_compat() -> None:
    """No module of iocp.aio but _compat imports a private asyncio name or
    reaches into an asyncio module for one."""
    import re

    pattern = re.compile(
        r"\b(base_events|proactor_events|sslproto|unix_events|events|coroutines|runners|"
        r"selector_events|base_subprocess|windows_events)\._[a-zA-Z]"
    )
    offenders = []
    for path in sorted((ROOT / "iocp" / "aio").glob("*.py")):
        if path.name == "_compat.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) or re.search(r"from asyncio\.\w+ import _", line):
                offenders.append(f"{path.name}:{n}: {line.strip()}")
    assert offenders == []


def test_compat_gates_match_this_python() -> None:
    from asyncio import base_events, events

    assert _compat.HAS_RUN_FOREVER_SETUP == hasattr(base_events.BaseEventLoop, "_run_forever_setup")
    if sys.version_info >= (3, 14):
        assert _compat.BaseDefaultEventLoopPolicy is events._BaseDefaultEventLoopPolicy
    else:
        assert _compat.BaseDefaultEventLoopPolicy is events.BaseDefaultEventLoopPolicy
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 3.14's deprecated public one would raise
        assert _compat.iscoroutinefunction(test_compat_gates_match_this_python) is False

        async def coro() -> None:
            pass

        assert _compat.iscoroutinefunction(coro) is True


def test_install_warns_from_312_and_still_works() -> None:
    old = _compat.get_event_loop_policy()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            iocp.aio.install()
        deprecations = [w for w in caught if issubclass(w.category, DeprecationWarning)]
        if sys.version_info >= (3, 12):
            assert len(deprecations) == 1, [str(w.message) for w in caught]
            assert "loop_factory=iocp.aio.new_event_loop" in str(deprecations[0].message)
            assert deprecations[0].filename == __file__  # points at the caller
        else:
            assert deprecations == []
        loop = asyncio.new_event_loop()
        try:
            assert isinstance(loop, iocp.aio.EventLoop)
        finally:
            loop.close()
    finally:
        _compat.set_event_loop_policy(old)


@pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.run(loop_factory=) is 3.12+")
def test_asyncio_run_with_loop_factory() -> None:
    seen = {}

    async def main() -> str:
        seen["loop"] = asyncio.get_running_loop()
        await asyncio.sleep(0)
        return "ok"

    assert asyncio.run(main(), loop_factory=iocp.aio.new_event_loop) == "ok"
    assert isinstance(seen["loop"], iocp.aio.EventLoop) and seen["loop"].is_closed()
    _leak_free(seen["loop"])


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.Runner is 3.11+")
def test_asyncio_runner_with_loop_factory(backend: str) -> None:
    with asyncio.Runner(loop_factory=lambda: iocp.aio.new_event_loop(backend=backend)) as r:
        loop = r.get_loop()
        assert isinstance(loop, iocp.aio.EventLoop) and loop.backend == backend
        assert r.run(asyncio.sleep(0, "a")) == "a"
        assert r.run(asyncio.sleep(0, "b")) == "b"
    assert loop.is_closed()
    _leak_free(loop)


def test_import_warns_nothing() -> None:
    """`import iocp.aio` raises no DeprecationWarning (3.14 deprecates the
    policy names it used to touch at import)."""
    code = "import warnings; warnings.simplefilter('error'); import iocp.aio; print('ok')"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------ signal.set_wakeup_fd


@needs_posix
def test_wakeup_fd_untouched_until_a_signal_handler(backend: str) -> None:
    """Creating (and running) a loop leaves the process's wakeup fd as it
    was; add_signal_handler installs the loop's; removing the last handler
    and close() put the previous one back."""
    mine_r, mine_w = socket.socketpair()
    mine_w.setblocking(False)
    previous = signal.set_wakeup_fd(mine_w.fileno())
    try:
        # asyncio's selector loop leaves it alone at creation too.
        sel = asyncio.SelectorEventLoop()
        assert current_wakeup_fd() == mine_w.fileno()
        sel.close()
        signal.set_wakeup_fd(mine_w.fileno())

        loop = iocp.aio.EventLoop(backend=backend)
        try:
            assert current_wakeup_fd() == mine_w.fileno()
            assert run(loop, asyncio.sleep(0, "ran")) == "ran"
            assert current_wakeup_fd() == mine_w.fileno()

            got = loop.create_future()
            loop.add_signal_handler(signal.SIGUSR1, got.set_result, "usr1")
            installed = current_wakeup_fd()
            assert installed not in (-1, mine_w.fileno())
            loop.add_signal_handler(signal.SIGUSR2, lambda: None)
            assert current_wakeup_fd() == installed
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1)).start()
            assert run(loop, asyncio.wait_for(got, 10)) == "usr1"

            assert loop.remove_signal_handler(signal.SIGUSR1)
            assert current_wakeup_fd() == installed  # SIGUSR2 still handled
            assert loop.remove_signal_handler(signal.SIGUSR2)
            assert current_wakeup_fd() == mine_w.fileno()

            loop.add_signal_handler(signal.SIGUSR1, lambda: None)
            assert current_wakeup_fd() == installed
        finally:
            loop.close()
        assert current_wakeup_fd() == mine_w.fileno()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL
        _leak_free(loop)
    finally:
        signal.set_wakeup_fd(previous)
        mine_r.close()
        mine_w.close()


@needs_posix
def test_signal_handler_off_the_main_thread_is_refused_as_asyncio_does(backend: str) -> None:
    results: dict[str, tuple[str, str]] = {}
    before = current_wakeup_fd()

    def attempt(name: str, make_loop) -> None:
        loop = make_loop()
        try:
            loop.add_signal_handler(signal.SIGUSR1, lambda: None)
            results[name] = ("ok", "")
        except Exception as exc:  # noqa: BLE001
            results[name] = (type(exc).__name__, str(exc))
        finally:
            loop.close()

    for name, factory in (
        ("selector", asyncio.SelectorEventLoop),
        ("iocp", lambda: iocp.aio.EventLoop(backend=backend)),
    ):
        t = threading.Thread(target=attempt, args=(name, factory))
        t.start()
        t.join(30)
        assert not t.is_alive()
    assert results["iocp"][0] == "RuntimeError", results
    assert results["iocp"] == results["selector"]
    assert current_wakeup_fd() == before
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


# ------------------------------------------------------------ debug checks


def _blocking_sockets():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    a, b = socket.socketpair()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    fresh = socket.socket()
    # Something to read, and a connection to accept, so that a loop that
    # skipped the check would return rather than block in the call.
    pending = socket.create_connection(listener.getsockname())
    b.sendall(b"xx")
    udp.sendto(b"d", udp.getsockname())
    udp.sendto(b"d", udp.getsockname())
    for s in (listener, a, b, udp, fresh):
        s.setblocking(True)
    return listener, a, b, udp, fresh, pending


def _debug_calls(loop, listener, a, udp, fresh):
    calls = {
        "sock_recv": lambda: loop.sock_recv(a, 1),
        "sock_recv_into": lambda: loop.sock_recv_into(a, bytearray(1)),
        "sock_sendall": lambda: loop.sock_sendall(a, b"x"),
        "sock_connect": lambda: loop.sock_connect(fresh, listener.getsockname()),
        "sock_accept": lambda: loop.sock_accept(listener),
    }
    if sys.version_info >= (3, 11):  # the selector loop has these from 3.11
        calls["sock_recvfrom"] = lambda: loop.sock_recvfrom(udp, 1)
        calls["sock_recvfrom_into"] = lambda: loop.sock_recvfrom_into(udp, bytearray(1))
        calls["sock_sendto"] = lambda: loop.sock_sendto(udp, b"x", udp.getsockname())
    return calls


def test_debug_mode_refuses_blocking_sockets_as_asyncio_does(aloop) -> None:
    socks = _blocking_sockets()
    listener, a, b, udp, fresh, _pending = socks
    sel = asyncio.SelectorEventLoop()
    try:
        sel.set_debug(True)
        aloop.set_debug(True)
        calls = _debug_calls(aloop, listener, a, udp, fresh)
        ours = {k: outcome(aloop, f) for k, f in calls.items()}
        calls = _debug_calls(sel, listener, a, udp, fresh)
        theirs = {k: outcome(sel, f) for k, f in calls.items()}
    finally:
        sel.close()
        for s in socks:
            s.close()
    for name, got in ours.items():
        assert got == ("ValueError", "the socket must be non-blocking"), (name, got)
    assert ours == theirs


def test_debug_mode_passes_non_blocking_sockets(aloop) -> None:
    async def main() -> bytes:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        try:
            await aloop.sock_sendall(a, b"ping")
            return await aloop.sock_recv(b, 4)
        finally:
            a.close()
            b.close()

    aloop.set_debug(True)
    assert run(aloop, main()) == b"ping"


# ------------------------------------------------------------ zero-length reads


def _zero_length_reads(loop):
    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        try:
            empty_first = await asyncio.wait_for(loop.sock_recv(b, 0), 5)
            empty_into = await asyncio.wait_for(loop.sock_recv_into(b, bytearray(0)), 5)
            empty_view = await asyncio.wait_for(loop.sock_recv_into(b, memoryview(bytearray(0))), 5)
            await loop.sock_sendall(a, b"hello")
            await asyncio.sleep(0.01)
            empty_with_data = await asyncio.wait_for(loop.sock_recv(b, 0), 5)
            data = await asyncio.wait_for(loop.sock_recv(b, 5), 5)  # nothing was eaten
            return empty_first, empty_into, empty_view, empty_with_data, data
        finally:
            a.close()
            b.close()

    return main


def test_sock_recv_zero_returns_empty_at_once(aloop) -> None:
    ours = run(aloop, _zero_length_reads(aloop)())
    assert ours == (b"", 0, 0, b"", b"hello")
    sel = asyncio.SelectorEventLoop()
    try:
        assert run(sel, _zero_length_reads(sel)()) == ours
    finally:
        sel.close()


# ------------------------------------------------------------ Unix socket arguments


def _unix_connection_cases(loop, tmp: Path, socks: dict):
    P = asyncio.Protocol
    path = str(tmp / "nobody-listens.sock")
    client_ctx = ssl.create_default_context()
    cases = {
        "path and sock": lambda: loop.create_unix_connection(P, path, sock=socks["unix"]),
        "neither": lambda: loop.create_unix_connection(P),
        "handshake timeout without ssl": lambda: loop.create_unix_connection(
            P, path, ssl_handshake_timeout=1.0
        ),
        "server_hostname without ssl": lambda: loop.create_unix_connection(
            P, path, server_hostname="example.org"
        ),
        "ssl without server_hostname": lambda: loop.create_unix_connection(
            P, path, ssl=client_ctx
        ),
        "inet sock": lambda: loop.create_unix_connection(P, sock=socks["inet"]),
        "datagram sock": lambda: loop.create_unix_connection(P, sock=socks["unix_dgram"]),
        "no listener": lambda: loop.create_unix_connection(P, path),
    }
    if sys.version_info >= (3, 11):
        cases["shutdown timeout without ssl"] = lambda: loop.create_unix_connection(
            P, path, ssl_shutdown_timeout=1.0
        )
    return cases


def _unix_server_cases(loop, tmp: Path, socks: dict):
    P = asyncio.Protocol
    path = str(tmp / "srv.sock")
    not_a_socket = tmp / "regular-file"
    not_a_socket.write_text("x")
    cases = {
        "path and sock": lambda: loop.create_unix_server(P, path, sock=socks["unix"]),
        "neither": lambda: loop.create_unix_server(P),
        "handshake timeout without ssl": lambda: loop.create_unix_server(
            P, path, ssl_handshake_timeout=1.0
        ),
        "ssl=True": lambda: loop.create_unix_server(P, path, ssl=True),
        "inet sock": lambda: loop.create_unix_server(P, sock=socks["inet"]),
        "datagram sock": lambda: loop.create_unix_server(P, sock=socks["unix_dgram"]),
        "path is a regular file": lambda: loop.create_unix_server(P, str(not_a_socket)),
    }
    if sys.version_info >= (3, 11):
        cases["shutdown timeout without ssl"] = lambda: loop.create_unix_server(
            P, path, ssl_shutdown_timeout=1.0
        )
    return cases


def _compare_unix(aloop, tmp_path: Path, make_cases) -> dict:
    socks = {
        "unix": socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
        "inet": socket.socket(socket.AF_INET, socket.SOCK_STREAM),
        "unix_dgram": socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM),
    }
    sel = asyncio.SelectorEventLoop()
    try:
        ours = {k: outcome(aloop, f) for k, f in make_cases(aloop, tmp_path, socks).items()}
        theirs = {k: outcome(sel, f) for k, f in make_cases(sel, tmp_path, socks).items()}
    finally:
        sel.close()
        for s in socks.values():
            s.close()
    for name, got in ours.items():
        assert got[0] != "ok", (name, got)  # every case is an error
    assert ours == theirs
    return ours


@needs_posix
def test_create_unix_connection_checks_arguments_as_asyncio_does(aloop, tmp_path) -> None:
    ours = _compare_unix(aloop, tmp_path, _unix_connection_cases)
    assert ours["path and sock"] == (
        "ValueError",
        "path and sock can not be specified at the same time",
    )
    assert ours["neither"] == ("ValueError", "no path and sock were specified")
    assert ours["inet sock"][1].startswith("A UNIX Domain Stream Socket was expected")
    assert ours["no listener"][0] in ("FileNotFoundError", "ConnectionRefusedError")


@needs_posix
def test_create_unix_server_checks_arguments_as_asyncio_does(aloop, tmp_path) -> None:
    ours = _compare_unix(aloop, tmp_path, _unix_server_cases)
    assert ours["neither"] == ("ValueError", "path was not specified, and no sock specified")
    assert ours["ssl=True"][0] == "TypeError"
    assert ours["datagram sock"][1].startswith("A UNIX Domain Stream Socket was expected")


def _unix_server_round_trip(loop, path: str):
    async def main():
        async def handle(reader, writer):
            writer.write((await reader.readline()).upper())
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(handle, path)
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"ping\n")
        reply = await reader.readline()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return reply, os.path.exists(path)

    return main


@needs_posix
def test_unix_server_serves_and_cleans_up_as_asyncio_does(aloop, tmp_path) -> None:
    """A stale socket file is replaced, and on 3.13+ the file is removed
    when the server closes (cleanup_socket), as on the selector loop."""
    path = str(tmp_path / "rt.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()  # leaves the file behind
    ours = run(aloop, _unix_server_round_trip(aloop, path)())
    sel = asyncio.SelectorEventLoop()
    try:
        stale = socket.socket(socket.AF_UNIX)
        if not os.path.exists(path):
            stale.bind(path)
        stale.close()
        theirs = run(sel, _unix_server_round_trip(sel, path)())
    finally:
        sel.close()
    assert ours[0] == b"PING\n"
    assert ours == theirs
    assert ours[1] is (sys.version_info < (3, 13))


def _pipe_reprs():
    async def main():
        p = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys; sys.stdin.read(); print('done')",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        transport = p._transport  # what a debug log line or a traceback formats
        seen = [repr(transport.get_pipe_transport(n)) for n in (0, 1)]
        out, _ = await p.communicate(b"")
        import re

        return [re.sub(r"(fd|pid)=\d+", r"\1=N", r) for r in seen], out

    return main


@needs_posix
def test_pipe_transport_repr_as_on_the_selector_loop(aloop) -> None:
    """The stdlib Unix pipe transports' repr() asks the loop's selector
    for the fd's registration (a private stdlib helper); on the port loop
    that is the proactor, which answers from the readiness thread."""
    ours = run(aloop, _pipe_reprs()())
    sel = asyncio.SelectorEventLoop()
    try:
        theirs = run(sel, _pipe_reprs()())
    finally:
        sel.close()
    assert ours[1] == b"done\n"
    assert "polling" in ours[0][1]  # stdout is being read
    assert ours == theirs
