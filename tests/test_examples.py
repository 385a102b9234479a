"""Every program in examples/ runs and does what it says."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from tests.test_cli import Proc, env, free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def start(script: str, *args: str) -> Proc:
    return Proc(str(EXAMPLES / script), *args, module=False)


def recv_line(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    out = b""
    while not out.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        out += chunk
    return out


def stop_clean(proc: Proc) -> None:
    code = proc.stop(signal.SIGTERM)
    assert code == 0, (proc.out, proc.err)
    assert not any("Traceback" in line for line in proc.err), proc.err


def wait_listening(port: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")


def test_echo_server() -> None:
    port = free_port()
    proc = start("echo_server.py", "--port", str(port), "--threads", "2")
    try:
        proc.wait_for("listening on")
        proc.wait_for("serving until")  # signal handlers are in place
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"echo me\n")
            assert recv_line(s) == b"echo me\n"
        stop_clean(proc)
        proc.wait_for("final stats")
    finally:
        proc.kill()


def test_chat_server_broadcasts() -> None:
    port = free_port()
    proc = start("chat_server.py", "--port", str(port))
    socks: List[socket.socket] = []
    try:
        proc.wait_for("listening on")
        proc.wait_for("serving until")  # signal handlers are in place
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            assert recv_line(s).startswith(b"* welcome")
            socks.append(s)
        # wait until everyone has seen the later joins
        assert recv_line(socks[0]).endswith(b"joined\n")
        assert recv_line(socks[0]).endswith(b"joined\n")
        assert recv_line(socks[1]).endswith(b"joined\n")
        socks[0].sendall(b"hi all\n")
        for s in socks[1:]:
            assert recv_line(s).endswith(b": hi all\n")
        socks[2].close()
        assert recv_line(socks[0]).endswith(b"left\n")
        stop_clean(proc)
    finally:
        for s in socks:
            s.close()
        proc.kill()


def test_demo_pair() -> None:
    port = free_port()
    server = start("demo_server.py", "--port", str(port))
    try:
        server.wait_for("listening on")
        server.wait_for("serving until")  # signal handlers are in place
        r = subprocess.run(
            [sys.executable, str(EXAMPLES / "demo_client.py"), "--port", str(port)],
            input=b"first line\nsecond \x00 line\n",
            capture_output=True,
            timeout=20,
            env=env(),
        )
        assert r.returncode == 0, r.stderr
        server.wait_for("connected")
        server.wait_for(": first line")
        server.wait_for(": second \\x00 line")
        server.wait_for("disconnected")
        stop_clean(server)
    finally:
        server.kill()


def test_demo_client_without_server() -> None:
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / "demo_client.py"), "--port", str(free_port())],
        input=b"x\n",
        capture_output=True,
        timeout=20,
        env=env(),
    )
    assert r.returncode == 1
    assert b"cannot connect" in r.stderr and b"Traceback" not in r.stderr


def test_demo_client_against_echo_server() -> None:
    port = free_port()
    server = start("echo_server.py", "--port", str(port))
    try:
        server.wait_for("listening on")
        server.wait_for("serving until")  # signal handlers are in place
        r = subprocess.run(
            [sys.executable, str(EXAMPLES / "demo_client.py"), "--port", str(port)],
            input=b"a\nb\n",
            capture_output=True,
            timeout=20,
            env=env(),
        )
        # the client writes its replies as text: "\r\n" line ends on Windows
        assert r.returncode == 0, r.stderr
        assert r.stdout.replace(b"\r\n", b"\n") == b"a\nb\n", r.stdout
        stop_clean(server)
    finally:
        server.kill()


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_has_help(script: str) -> None:
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--help"],
        capture_output=True,
        timeout=20,
        env=env(),
    )
    assert r.returncode == 0, r.stderr
    assert b"usage:" in r.stdout



SERVERS = ["chat_server.py", "demo_server.py", "echo_server.py"]


@pytest.mark.parametrize("script", SERVERS)
def test_busy_port_is_one_line(script: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = subprocess.run(
            [sys.executable, str(EXAMPLES / script), "--port", str(port)],
            capture_output=True,
            timeout=20,
            env=env(),
        )
    assert b"Traceback" not in r.stderr, r.stderr.decode()
    assert r.returncode == 1, r.stderr
    err = r.stderr.decode().strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0], err


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_out_of_range_port_is_refused(script: str) -> None:
    r = subprocess.run(
        [sys.executable, str(EXAMPLES / script), "--port", "70000"],
        input=b"",
        capture_output=True,
        timeout=20,
        env=env(),
    )
    assert b"Traceback" not in r.stderr, r.stderr.decode()
    assert r.returncode == 2, r.stderr
    assert b"--port 70000" in r.stderr
