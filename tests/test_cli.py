"""The ``iocp`` command: serve and client as subprocesses, over loopback."""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, List

import pytest

ROOT = Path(__file__).resolve().parent.parent
POSIX = sys.platform != "win32"


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_iocp(
    *args: str, input: bytes | None = None, timeout: float = 20, extra_env: dict | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "iocp", *args],
        input=input,
        capture_output=True,
        timeout=timeout,
        env=dict(env(), **(extra_env or {})),
        cwd=str(ROOT),
    )


# How a test stops a background server gracefully.  POSIX: a signal.  On
# Windows, send_signal(SIGTERM) is TerminateProcess (exit status 1, no
# clean-up) and console control events need a console that the test's
# children may not have (none at all under Wine), so the child runs under
# this shim: the end of its stdin raises SIGINT from another thread, which
# is how Windows delivers a Ctrl-C, and stop() closes the stdin pipe.
WIN_STOP_SHIM = """\
import os, runpy, signal, sys, threading
def watch():
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    signal.raise_signal(signal.SIGINT)
threading.Thread(target=watch, daemon=True).start()
kind, target = sys.argv[1:3]
sys.argv = [target, *sys.argv[3:]]
if kind == "-m":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
"""


class Proc:
    """A background ``iocp`` process (or a script, ``module=False``) whose output
    lines are collected by threads."""

    def __init__(self, *args: str, module: bool = True) -> None:
        if POSIX:
            cmd = [sys.executable, "-m", "iocp", *args] if module else [sys.executable, *args]
        else:
            target = ["-m", "iocp"] if module else ["--script"]
            cmd = [sys.executable, "-c", WIN_STOP_SHIM, *target, *args]
        self.p = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL if POSIX else subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env(),
            cwd=str(ROOT),
        )
        self.out: List[str] = []
        self.err: List[str] = []
        self._lines: queue.Queue = queue.Queue()
        for stream, sink in ((self.p.stdout, self.out), (self.p.stderr, self.err)):
            threading.Thread(target=self._pump, args=(stream, sink), daemon=True).start()

    def _pump(self, stream: Any, sink: List[str]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\n")
            sink.append(line)
            self._lines.put(line)

    def wait_for(self, text: str, timeout: float = 10.0) -> str:
        """Waits for an output line (stdout or stderr) containing ``text``."""
        end = time.monotonic() + timeout
        for line in self.out + self.err:
            if text in line:
                return line
        while time.monotonic() < end:
            try:
                line = self._lines.get(timeout=0.1)
            except queue.Empty:
                if self.p.poll() is not None and self._lines.empty():
                    break
                continue
            if text in line:
                return line
        raise AssertionError(f"{text!r} not seen; stdout={self.out} stderr={self.err}")

    def count(self, text: str) -> int:
        return sum(text in line for line in self.out + self.err)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Asks for a graceful stop (on Windows: Ctrl-C, whatever ``sig``)."""
        if self.p.poll() is None:
            if POSIX:
                self.p.send_signal(sig)
            else:
                assert self.p.stdin is not None
                self.p.stdin.close()  # the shim raises SIGINT
        try:
            return self.p.wait(timeout)
        finally:
            time.sleep(0.1)  # let the pump threads take the last lines

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(5)
        if self.p.stdin is not None and not self.p.stdin.closed:
            self.p.stdin.close()


@pytest.fixture
def serve(backend: str):
    """Starts ``iocp serve`` on a free port with the current backend."""
    procs: List[Proc] = []

    def start(*extra: str) -> tuple:
        port = free_port()
        proc = Proc("serve", "--port", str(port), "--backend", backend, *extra)
        procs.append(proc)
        proc.wait_for("serving on")
        return proc, port

    yield start
    for proc in procs:
        proc.kill()


def assert_clean_exit(proc: Proc, code: int) -> None:
    assert code == 0, (proc.out, proc.err)
    assert not any("Traceback" in line for line in proc.err), proc.err
    final = proc.wait_for("final stats")
    for key in ("live_ops=0", "inflight=0", "pinned_buffers=0", "live_buffers=0", "connections=0"):
        assert key in final, final


def test_help() -> None:
    for args in ([], ["serve"], ["client"]):
        r = run_iocp(*args, "--help")
        assert r.returncode == 0
        assert b"usage:" in r.stdout
    assert b"--workers" in run_iocp("serve", "--help").stdout


def test_serve_prints_what_the_client_sends(serve: Any, backend: str) -> None:
    server, port = serve()
    assert "backend" in server.wait_for("serving on")
    data = "hello\nworld, \u00e9t\u00e9\n".encode() + b"bin\x00ary\xff\n"
    r = run_iocp("client", "--port", str(port), "--backend", backend, input=data)
    assert r.returncode == 0, r.stderr
    server.wait_for("[+] connection from 127.0.0.1:")
    server.wait_for("] hello")
    server.wait_for("] world, \u00e9t\u00e9")
    server.wait_for("] bin\\x00ary\\xff")  # escaped, not cut at the NUL
    server.wait_for("disconnected")
    assert_clean_exit(server, server.stop())


def test_echo_client_prints_replies(serve: Any, backend: str) -> None:
    _, port = serve("--echo")
    lines = b"".join(b"line %d\n" % i for i in range(200))
    t0 = time.monotonic()
    r = run_iocp("client", "--port", str(port), "--backend", backend, input=lines)
    assert r.returncode == 0, r.stderr
    assert r.stdout == lines
    assert time.monotonic() - t0 < 15


def test_client_without_server() -> None:
    r = run_iocp("client", "--port", str(free_port()), input=b"x\n")
    assert r.returncode == 1
    err = r.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "cannot connect" in err[0] and "refused" in err[0], err
    assert b"Traceback" not in r.stderr


def test_port_in_use() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = run_iocp("serve", "--port", str(port))
    assert r.returncode == 1
    err = r.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "in use" in err[0], err


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--port", "abc"],
        ["serve", "--port", "70000"],
        ["serve", "--threads", "0"],
        ["client", "--bogus"],
        ["nonsense"],
        [],
    ],
)
def test_bad_arguments(args: List[str]) -> None:
    r = run_iocp(*args)
    assert r.returncode == 2
    err = r.stderr.decode().strip().splitlines()
    assert len(err) == 1, err
    assert b"Traceback" not in r.stderr


def test_bench_module_missing() -> None:
    code = (
        "import sys; sys.modules['iocp.bench.cli'] = None\n"
        "from iocp.__main__ import main\n"
        "sys.exit(main(['bench', '--quick']))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=20, env=env(), cwd=str(ROOT)
    )
    assert r.returncode == 2
    assert b"not available" in r.stderr
    assert b"Traceback" not in r.stderr


def test_bench_is_wired() -> None:
    try:
        import iocp.bench.cli  # noqa: F401
    except ImportError:
        pytest.skip("iocp.bench.cli is not there")
    r = run_iocp("bench", "--help")
    assert r.returncode == 0, r.stderr
    assert b"usage:" in r.stdout


@pytest.mark.skipif(not POSIX, reason="signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown_with_connections_open(serve: Any, sig: int) -> None:
    server, port = serve("--echo", "--threads", "2")
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(10)]
    try:
        for s in socks:
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
        t0 = time.monotonic()
        code = server.stop(sig)
        assert time.monotonic() - t0 < 10
        assert_clean_exit(server, code)
        for s in socks:
            s.settimeout(5)
            assert s.recv(10) == b""  # closed gracefully, not reset
    finally:
        for s in socks:
            s.close()


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT") or not POSIX, reason="SO_REUSEPORT")
def test_workers_share_the_port(serve: Any) -> None:
    server, port = serve("--workers", "2", "--quiet")
    seen = set()
    deadline = time.monotonic() + 20
    n = 0
    while len(seen) < 2 and time.monotonic() < deadline and n < 400:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        n += 20
        for s in socks:
            s.close()
        time.sleep(0.2)
        seen = {line.split("]")[0] for line in server.out if line.startswith("[worker ")}
    assert len(seen) == 2, server.out[-20:]
    code = server.stop()
    assert code == 0, server.err
    assert not any("Traceback" in line for line in server.err)
    assert server.count("final stats") == 2


def test_ipv6_serve(backend: str) -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
            port = probe.getsockname()[1]
    except OSError:
        pytest.skip("::1 is not available")
    server = Proc("serve", "--host", "::1", "--port", str(port), "--echo", "--backend", backend)
    try:
        server.wait_for("serving on [::1]:")
        r = run_iocp("client", "--host", "::1", "--port", str(port), input=b"six\n")
        assert r.returncode == 0 and r.stdout == b"six\n", r.stderr
        assert_clean_exit(server, server.stop())
    finally:
        server.kill()


@pytest.mark.skipif(not POSIX, reason="Unix sockets")
def test_unix_socket_serve(tmp_path: Path, backend: str) -> None:
    path = str(tmp_path / "demo.sock")
    server = Proc("serve", "--unix", path, "--echo", "--backend", backend)
    try:
        server.wait_for("serving on")
        r = run_iocp("client", "--unix", path, input=b"over unix\n")
        assert r.returncode == 0 and r.stdout == b"over unix\n", r.stderr
        assert_clean_exit(server, server.stop())
        assert not os.path.exists(path)
    finally:
        server.kill()


@pytest.mark.parametrize("command", ["serve", "client"])
def test_unknown_host_is_one_line(command: str) -> None:
    r = run_iocp(command, "--host", "no-such-host.invalid", "--port", "1", input=b"")
    assert r.returncode == 1
    err = r.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "no-such-host.invalid" in err[0], err


def _have_bench() -> bool:
    try:
        import iocp.bench.cli  # noqa: F401
    except ImportError:
        return False
    return True


def assert_one_line_error(r: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The command failed with ``code`` and said why in one line, no traceback."""
    assert b"Traceback" not in r.stderr, r.stderr.decode()
    assert r.returncode == code, (r.returncode, r.stderr.decode())
    err = r.stderr.decode().strip().splitlines()
    assert len(err) == 1, err
    for word in words:
        assert word in err[0], err
    return err[0]


# A backend name of another platform: this build has no such backend.
FOREIGN_BACKEND = "epoll" if sys.platform == "win32" else "iocp"
BACKEND_COMMANDS = {
    "serve": ["serve", "--port", "0"],
    "client": ["client", "--port", "1"],
    "bench": ["bench", "--list"],
}


@pytest.mark.parametrize("command", sorted(BACKEND_COMMANDS))
@pytest.mark.parametrize("how", ["flag-foreign", "env-foreign", "env-unknown", "refused"])
def test_bad_backend_is_one_line(command: str, how: str) -> None:
    # Unknown names raise ValueError, a backend that cannot run here OSError:
    # every command reports both before starting anything (serve would
    # otherwise listen forever: the timeout bounds that failure).
    if command == "bench" and not _have_bench():
        pytest.skip("iocp.bench.cli is not there")
    args = list(BACKEND_COMMANDS[command])
    extra: dict = {}
    name = FOREIGN_BACKEND
    if how == "flag-foreign":
        args += ["--backend", FOREIGN_BACKEND]
    elif how == "env-foreign":
        extra["IOCP_BACKEND"] = FOREIGN_BACKEND
    elif how == "env-unknown":
        name = "no-such-backend"
        extra["IOCP_BACKEND"] = name
    else:
        if not sys.platform.startswith("linux"):
            pytest.skip("IOCP_URING_FAIL_SETUP is the Linux io_uring backend's switch")
        name = "io_uring"
        args += ["--backend", "io_uring"]
        extra["IOCP_URING_FAIL_SETUP"] = "1"
    r = run_iocp(*args, input=b"", extra_env=extra)
    line = assert_one_line_error(r, 2, f"{command}:", name)
    if how.startswith("env"):
        assert "IOCP_BACKEND" in line


BAD_NUMBERS = [
    ["serve", "--threads", "5000"],
    ["serve", "--workers", "0"],
    ["serve", "--max-connections", "-5"],
    ["serve", "--idle-timeout", "-1"],
    ["serve", "--drain-timeout", "inf"],
    ["serve", "--port", "-1"],
    ["client", "--wait", "nan"],
    ["client", "--timeout", "1e300"],
    ["client", "--port", "65536"],
    ["bench", "--rounds", "-1"],
    ["bench", "--rounds", "0"],
    ["bench", "--duration", "0"],
    ["bench", "--duration", "-2"],
    ["bench", "--warmup", "inf"],
    ["bench", "--loadgen-threads", "-1"],
    ["bench", "--max-interference", "nan"],
]


@pytest.mark.parametrize("args", BAD_NUMBERS, ids=" ".join)
def test_out_of_range_numbers_are_refused(args: List[str]) -> None:
    if args[0] == "bench" and not _have_bench():
        pytest.skip("iocp.bench.cli is not there")
    r = run_iocp(*args, input=b"")
    assert_one_line_error(r, 2, args[1], args[2])


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT") or not POSIX, reason="workers")
def test_workers_with_a_unix_socket_is_one_line(tmp_path: Path) -> None:
    r = run_iocp("serve", "--workers", "2", "--unix", str(tmp_path / "s.sock"))
    assert_one_line_error(r, 2, "serve:", "Unix")


def _description(help_text: str) -> str:
    """The paragraph(s) between the usage lines and the option list."""
    after_usage = help_text.split("\n\n", 1)[1]
    for heading in ("\noptions:", "\noptional arguments:", "\npositional arguments:"):
        after_usage = after_usage.split(heading, 1)[0]
    return after_usage.strip()


@pytest.mark.parametrize("command", ["serve", "client", "bench"])
def test_every_command_help_opens_with_a_description(command: str) -> None:
    if command == "bench" and not _have_bench():
        pytest.skip("iocp.bench.cli is not there")
    r = run_iocp(command, "--help")
    assert r.returncode == 0, r.stderr
    text = _description(r.stdout.decode())
    assert len(text) > 40, text
    # written for users: not a module docstring (reST quotes, internals)
    for internal in ("``", "`iocp", "argument parsing", "top-level run"):
        assert internal not in text, text
