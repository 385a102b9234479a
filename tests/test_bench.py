"""The benchmark's load generator catches bad echo servers; the runner works.

Bad servers are tiny thread-per-connection echo servers in this process.
Everything is on loopback and bounded: a few seconds in all.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
from typing import Callable, Iterator

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the benchmark tools are Linux-only (epoll)", allow_module_level=True)

bt = pytest.importorskip("iocp._benchtools")

# Short windows: enough for thousands of round trips on loopback.
FAST = dict(warmup=0.05, duration=0.3, drain_timeout=0.5, connect_timeout=5.0)


class EchoServer:
    """Thread per connection; `transform(conn, data, total)` returns what to
    send back (or None to reset the connection)."""

    def __init__(self, transform: Callable[[bytes, int], bytes | None]) -> None:
        self.transform = transform
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.threads: list[threading.Thread] = []
        self.acceptor = threading.Thread(target=self._accept, daemon=True)
        self.acceptor.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        total = 0
        with conn:
            while not self.stopping.is_set():
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    continue
                except OSError:
                    return
                if not data:
                    return
                out = self.transform(data, total)
                total += len(data)
                if out is None:   # reset: RST instead of FIN
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                    return
                try:
                    conn.sendall(out)
                except OSError:
                    return

    def close(self) -> None:
        self.stopping.set()
        self.acceptor.join(2)
        for t in self.threads:
            t.join(2)
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[bytes, int], bytes | None]], EchoServer]]:
    servers: list[EchoServer] = []

    def start(transform: Callable[[bytes, int], bytes | None]) -> EchoServer:
        s = EchoServer(transform)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


def load(port: int, connections: int = 4, size: int = 64, inflight: int = 1) -> dict:
    return bt.run_load("127.0.0.1", port, connections, size, inflight, **FAST)


def test_correct_python_server_has_no_errors(serve) -> None:
    srv = serve(lambda data, total: data)
    r = load(srv.port, connections=4, size=1000, inflight=4)
    assert r["error_total"] == 0, r["errors"]
    assert r["connected"] == 4
    assert r["messages"] > 50
    assert r["latency_us"]["p50"] > 0
    assert r["latency_us"]["p50"] <= r["latency_us"]["p99"] <= r["latency_us"]["max"]
    assert r["mb_per_s"] == pytest.approx(r["msgs_per_s"] * 1000 / 1e6)


def test_c_echo_server_has_no_errors() -> None:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    port = lsock.getsockname()[1]
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(bt.echo_server(fd=lsock.fileno(),
                                                                  max_seconds=0.8)))
    t.start()
    try:
        r = load(port, connections=8, size=3000, inflight=3)   # odd size: partial writes
    finally:
        t.join(5)
        lsock.close()
    assert r["error_total"] == 0, r["errors"]
    assert r["messages"] > 50
    assert out["accepted"] == 8
    assert out["bytes"] >= r["messages_total"] * 3000


def test_dropped_bytes_are_caught(serve) -> None:
    # Loses the last byte of every 10th chunk: the echo stalls (short) or
    # the following bytes arrive shifted (mismatch).
    calls = {"n": 0}

    def drop(data: bytes, total: int) -> bytes:
        calls["n"] += 1
        return data[:-1] if calls["n"] % 10 == 0 else data

    srv = serve(drop)
    r = load(srv.port)
    assert r["errors"]["short"] + r["errors"]["mismatch"] > 0, r["errors"]


def test_corrupted_bytes_are_caught(serve) -> None:
    def corrupt(data: bytes, total: int) -> bytes:
        if total >= 640:      # after ten good 64-byte messages
            b = bytearray(data)
            b[len(b) // 2] ^= 0x01
            return bytes(b)
        return data

    srv = serve(corrupt)
    r = load(srv.port)
    assert r["errors"]["mismatch"] == 4, r["errors"]
    assert r["error_total"] == 4


def test_resets_are_caught(serve) -> None:
    srv = serve(lambda data, total: None if total >= 640 else data)
    r = load(srv.port)
    assert r["errors"]["reset"] == 4, r["errors"]


def test_unprompted_bytes_and_refused_connections() -> None:
    # Nothing listens: every connection fails to connect.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = bt.run_load("127.0.0.1", port, 3, 64, 1, 0.0, 0.1, connect_timeout=2.0)
    assert r["errors"]["connect"] == 3
    assert r["connected"] == 0


def test_pattern_is_per_connection() -> None:
    a, b = bt.pattern(0, 0, 64), bt.pattern(1, 0, 64)
    assert len(a) == 64 and a != b
    assert bt.pattern(0, 10, 20) == a[10:30]


def test_runner_smoke(tmp_path, capsys) -> None:
    import argparse

    from iocp.bench import cli

    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    out = tmp_path / "r.json"
    args = parser.parse_args(["--servers", "c-epoll,asyncio-protocol", "--scenarios",
                              "10x64Bx16", "--warmup", "0.2", "--duration", "1.0",
                              "--max-interference", "0", "--json", str(out)])
    assert cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "c-epoll" in printed and "asyncio-protocol" in printed
    data = json.loads(out.read_text())
    assert {r["server"] for r in data["summary"]} == {"c-epoll", "asyncio-protocol"}
    for row in data["summary"]:
        assert row["errors"] == 0
        # Echoes happened and were verified; how many is the benchmark's
        # business, not a test's (a loaded machine or ASan can starve a
        # server for a large part of a short window).
        assert row["msgs_per_s"] > 0
        assert row["peak_rss_kib"] > 0
    assert data["machine"]["python"]
    assert len(data["measurements"]) == 2


def _quick_args(tmp_path, *extra: str):
    import argparse

    from iocp.bench import cli

    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    return parser.parse_args(["--servers", "iocp-port", "--scenarios", "10x64Bx16",
                              "--warmup", "0.05", "--duration", "0.2",
                              "--max-interference", "0", "--json", str(tmp_path / "r.json"),
                              *extra])


def test_runner_ignores_an_unbuilt_checkout_in_the_cwd(tmp_path, monkeypatch, capsys) -> None:
    # `pip install . && iocp bench` at the root of a clone: the cwd holds the
    # unbuilt source package.  The servers and the load generator must import
    # the iocp this process imported, never the one in the cwd.
    from iocp.bench import cli

    fake = tmp_path / "checkout" / "iocp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('the unbuilt checkout was imported')\n")
    for name in ("bench", "aio"):
        (fake / name).mkdir()
        (fake / name / "__init__.py").write_text("raise ImportError('unbuilt checkout')\n")
    monkeypatch.chdir(fake.parent)
    args = _quick_args(tmp_path)
    code = cli.run(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    data = json.loads((tmp_path / "r.json").read_text())
    [row] = data["summary"]
    assert row["errors"] == 0 and row["msgs_per_s"] > 0, row


def test_child_refuses_another_iocp(tmp_path) -> None:
    # The children check that they imported the parent's iocp, not merely one.
    import subprocess

    from iocp.bench import runner

    cmd = runner.python_command("iocp.bench.servers", "--help")
    ok = subprocess.run(cmd, capture_output=True, timeout=30, cwd=str(tmp_path))
    assert ok.returncode == 0 and b"usage:" in ok.stdout, ok.stderr
    origin = cmd.index("iocp.bench.servers") - 1
    cmd[origin] = str(tmp_path / "elsewhere" / "iocp" / "__init__.py")
    bad = subprocess.run(cmd, capture_output=True, timeout=30, cwd=str(tmp_path))
    assert bad.returncode == 1, bad
    assert b"expected" in bad.stderr and b"Traceback" not in bad.stderr


@pytest.mark.parametrize("module,argv", [
    ("loadgen", ["--port", "1", "--size", "0"]),
    ("loadgen", ["--port", "1", "--connections", "-3"]),
    ("loadgen", ["--port", "0"]),
    ("loadgen", ["--port", "1", "--duration", "0"]),
    ("loadgen", ["--port", "1", "--threads", "1000"]),
    ("loadgen", ["--port", "1", "--inflight", "0"]),
    ("servers", ["iocp-port", "--port", "99999"]),
])
def test_helper_programs_refuse_out_of_range_numbers(module, argv, capsys) -> None:
    import importlib

    mod = importlib.import_module(f"iocp.bench.{module}")
    with pytest.raises(SystemExit) as exc:
        mod.main(argv)
    assert exc.value.code == 2
    assert "invalid" in capsys.readouterr().err


# ---------------------------------------------------------------- kit method


def test_window_samples_the_given_process_not_the_load_generator(serve) -> None:
    # The window's CPU time is the server process's, sampled at the edges of
    # the measured window: an idle child spends (almost) none of it while
    # the load generator itself is busy all the time.
    import subprocess

    srv = serve(lambda data, total: data)
    # The child says when its start-up (tens of ms of CPU, more on a loaded
    # machine) is over, so none of it falls inside the measured window.
    idle = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; print('idle', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert idle.stdout is not None and idle.stdout.readline() == b"idle\n"
        r = bt.run_load("127.0.0.1", srv.port, 4, 64, 1, **FAST, server_pid=idle.pid)
    finally:
        idle.kill()
        idle.wait(10)
    win = r["window"]
    assert r["error_total"] == 0, r["errors"]
    assert win["source"] in ("schedstat", "stat")
    assert 0 <= win["server_cpu_s"] < 0.05 * win["seconds"] + 0.02, win
    assert 0 < win["messages"] <= r["messages_total"]
    # Every message costs the load generator a send and a recv at least.
    assert win["loadgen_syscalls_per_msg"] >= 2.0
    assert win["loadgen_epoll_waits"] > 0


def test_window_counts_the_servers_cpu(serve) -> None:
    # This process serves (threads): its CPU over the window is > 0 and the
    # per-message figure is that CPU over the window's messages.
    import os

    srv = serve(lambda data, total: data)
    r = bt.run_load("127.0.0.1", srv.port, 4, 64, 2, **FAST, server_pid=os.getpid())
    win = r["window"]
    assert win["server_cpu_s"] > 0 and win["messages"] > 0, win
    assert win["server_cpu_us_per_msg"] == pytest.approx(
        win["server_cpu_s"] * 1e6 / win["messages"])
    assert "window" not in bt.run_load("127.0.0.1", srv.port, 1, 64, 1, **FAST)


def test_window_with_a_corrupting_server_still_counts_the_mismatch(serve) -> None:
    import os

    def corrupt(data: bytes, total: int) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 0xFF]) if total >= 640 else data

    srv = serve(corrupt)
    r = bt.run_load("127.0.0.1", srv.port, 4, 64, 1, **FAST, server_pid=os.getpid())
    assert r["errors"]["mismatch"] == 4, r["errors"]


def test_heavier_load_generator_still_verifies(serve) -> None:
    srv = serve(lambda data, total: data)
    r = bt.run_load("127.0.0.1", srv.port, 2, 64, 1, **FAST, work_us=20.0)
    assert r["error_total"] == 0 and r["messages"] > 0, r
    for bad in (-1.0, float("nan"), 2e6):
        with pytest.raises(ValueError):
            bt.run_load("127.0.0.1", srv.port, 1, 64, 1, **FAST, work_us=bad)


def test_kit_cpu_plan(monkeypatch) -> None:
    import os

    from iocp.bench import runner

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5, 7})
    assert runner.cpu_plan(0, "kit") == ({3}, {5}, 1)
    assert runner.cpu_plan(4, "kit") == ({3}, {5}, 1)       # always one load thread
    assert runner.cpu_plan(0, "suite") == ({7}, {3, 5}, 2)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2})
    assert runner.cpu_plan(0, "kit") == (None, None, 1)     # degrade: nothing pinned


def _kit_args(tmp_path, servers: str, *extra: str):
    import argparse

    from iocp.bench import cli

    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    return parser.parse_args(["--kit", "--servers", servers, "--scenarios", "100x64B",
                              "--warmup", "0.1", "--duration", "0.4", "--rounds", "2",
                              "--max-interference", "0", "--json", str(tmp_path / "r.json"),
                              *extra])


def test_kit_method_short_run(tmp_path, capsys) -> None:
    import os

    from iocp.bench import cli

    assert cli.run(_kit_args(tmp_path, "c-epoll,asyncio-protocol")) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "[kit method]" in printed and "CPU us/msg" in printed and "p99 us" in printed
    data = json.loads((tmp_path / "r.json").read_text())
    assert [c["method"] for c in data["config"]] == ["kit"]
    two = len(os.sched_getaffinity(0)) >= 2
    if two:
        assert "server pinned to CPU" in printed
    else:
        assert "not pinned" in printed
    ms = data["measurements"]
    assert len(ms) == 4 and {m["round"] for m in ms} == {1, 2}
    # Interleaved: each round runs every server before the next round starts.
    assert [m["round"] for m in ms] == [1, 1, 2, 2]
    for m in ms:
        assert m["method"] == "kit" and m["ok"], m
        assert m["pinned"] is two
        assert m["load"]["threads"] == 1
        assert m["load"]["window"]["source"] in ("schedstat", "stat")
    rows = {r["server"]: r for r in data["summary"]}
    assert set(rows) == {"c-epoll", "asyncio-protocol"}
    for row in rows.values():
        assert row["method"] == "kit" and row["rounds"] == 2
        assert row["errors"] == 0            # every echoed byte verified
        assert row["msgs_per_s"] > 0 and row["p99_us"] > 0
        assert row["cpu_us_per_msg"] > 0
    assert rows["asyncio-protocol"]["cpu_vs_ceiling"] == pytest.approx(
        rows["asyncio-protocol"]["cpu_us_per_msg"] / rows["c-epoll"]["cpu_us_per_msg"])
    assert rows["c-epoll"]["best_peer"] == "asyncio-protocol"


def test_full_runs_both_methods_and_says_which_is_which(tmp_path, capsys, monkeypatch) -> None:
    # --full defaults to both methods; tiny windows keep it short.
    from iocp.bench import cli, runner

    monkeypatch.setattr(runner, "SCENARIOS", {k: v for k, v in runner.SCENARIOS.items()})
    args = _kit_args(tmp_path, "c-epoll", "--full", "--rounds", "1", "--method", "both")
    assert cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "[suite method]" in printed and "[kit method]" in printed
    data = json.loads((tmp_path / "r.json").read_text())
    assert [c["method"] for c in data["config"]] == ["suite", "kit"]
    assert {(r["method"], r["scenario"]) for r in data["summary"]} == {
        ("suite", "100x64B"), ("kit", "100x64B")}


def test_method_defaults() -> None:
    import argparse

    from iocp.bench import cli

    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    assert parser.parse_args(["--kit"]).method == "kit"
    assert parser.parse_args(["--quick"]).method is None       # suite, as the README types it
    assert cli.PRESETS[("kit", "full")] == {"rounds": 5, "warmup": 1.0, "duration": 3.0}
    from iocp.bench import runner

    assert runner.KIT_SCENARIOS == ["100x64B", "1000x64B", "10x64Bx16"]


# ---------------------------------------------------------------- servers


def _server_cases() -> list:
    import iocp

    cases = []
    for name in ("iocp-port", "iocp-port-oneshot", "iocp-aio-streams"):
        cases += [pytest.param(name, b, id=f"{name}-{b}") for b in iocp.backends()]
    cases += [pytest.param(n, None, id=n) for n in (
        "rloop-protocol", "uvloop-protocol", "asyncio-streams", "uvloop-streams",
        "rloop-streams")]
    return cases


@pytest.mark.parametrize("name,backend", _server_cases())
def test_server_echoes_every_byte_and_stops_on_sigterm(name: str, backend: str | None) -> None:
    import signal

    from iocp.bench import runner, servers

    reason = servers.check_server(name, backend)
    if reason:
        pytest.skip(reason)
    proc, err, port, _, note = runner.start_server(
        "iocp.bench.servers", name, "127.0.0.1", backend, None, runner.echo_probe, 30.0)
    try:
        assert not note, note
        # Many connections, several messages in flight and an odd size, so
        # echoes arrive split and coalesced; then large ones (partial sends).
        for conns, size, inflight in ((50, 333, 4), (4, 200_000, 2)):
            r = bt.run_load("127.0.0.1", port, conns, size, inflight, **FAST)
            assert r["error_total"] == 0, r["errors"]
            assert r["connected"] == conns and r["messages_total"] > conns
        # Connections the load generator closed are gone; the server serves on.
        assert runner.echo_probe("127.0.0.1", port)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        err.seek(0)
        tail = err.read()[-2000:].decode(errors="replace")
        err.close()
    assert "Traceback" not in tail, tail


def test_method_and_server_selection(monkeypatch, capsys) -> None:
    # Which configurations --quick, --kit and --full hand to the runner
    # (the runner itself is replaced: nothing is measured here).
    import argparse

    from iocp.bench import cli, runner, servers
    from iocp.bench import http as hb

    seen: list = []
    monkeypatch.setattr(runner, "run_all", lambda cfg, progress: (seen.append(cfg) or ([], {})))
    # --full runs the HTTP scenario too (tests/test_bench_http.py covers it).
    monkeypatch.setattr(hb, "run_all", lambda cfg, progress: [])

    def configs(*argv: str) -> list:
        seen.clear()
        parser = argparse.ArgumentParser()
        cli.configure_parser(parser)
        assert cli.run(parser.parse_args(list(argv))) == 0
        return list(seen)

    [quick] = configs("--quick")
    assert quick.method == "suite" and quick.rounds == 1
    assert [s.name for s in quick.scenarios] == runner.QUICK_SCENARIOS
    assert "iocp-port-oneshot" not in quick.servers          # before/after only in --full
    assert "iocp-aio-streams" not in quick.servers and "asyncio-streams" in quick.servers
    [kit] = configs("--kit")
    assert kit.method == "kit" and [s.name for s in kit.scenarios] == runner.KIT_SCENARIOS
    suite, kit = configs("--full")
    assert (suite.method, kit.method) == ("suite", "kit")
    assert (suite.rounds, kit.rounds, kit.warmup, kit.duration) == (3, 5, 1.0, 3.0)
    ok, _ = servers.available()
    assert suite.servers == ok == kit.servers
    [named] = configs("--kit", "--servers", "iocp-port-oneshot,c-epoll", "--full")
    assert named.servers == ["iocp-port-oneshot", "c-epoll"] and named.rounds == 5
    capsys.readouterr()


# ---------------------------------------------------------------- report


def _row(server: str, scenario: str, msgs: float, p99: float, cpu: float,
         method: str = "kit", kib: float = 0.0):
    from iocp.bench import runner

    return runner.Measurement(server=server, scenario=scenario, round=1, ok=True, method=method,
                              msgs_per_s=msgs, p99_us=p99, cpu_us_per_msg=cpu,
                              kib_per_conn=kib)


def test_streams_servers_have_their_own_peer_group() -> None:
    from iocp.bench import runner

    rows = {r["server"]: r for r in runner.summarize([
        _row("iocp-aio-streams", "100x64B", 33_000, 900, 20),
        _row("uvloop-streams", "100x64B", 30_000, 1000, 15),
        _row("rloop-streams", "100x64B", 20_000, 800, 18),
        _row("asyncio-streams", "100x64B", 25_000, 800, 18),
        _row("iocp-aio", "100x64B", 60_000, 500, 10),
        _row("uvloop-protocol", "100x64B", 80_000, 400, 9),
        _row("threads", "100x64B", 40_000, 600, 30),
    ])}
    assert rows["iocp-aio-streams"]["best_peer"] == "uvloop-streams"
    assert rows["iocp-aio-streams"]["vs_best_peer"] == pytest.approx(1.1)
    assert rows["iocp-aio-streams"]["p99_vs_uvloop"] == pytest.approx(0.9)   # uvloop-streams'
    assert rows["rloop-streams"]["best_peer"] == "uvloop-streams"
    assert rows["iocp-aio"]["best_peer"] == "uvloop-protocol"
    assert rows["iocp-aio"]["vs_best_peer"] == pytest.approx(0.75)
    assert rows["iocp-aio"]["p99_vs_uvloop"] == pytest.approx(1.25)          # uvloop-protocol's
    assert rows["threads"]["best_peer"] == "uvloop-protocol"


def test_issue_11_echo_targets() -> None:
    from iocp.bench import report, runner

    rows = runner.summarize([
        _row("iocp-server", "100x64B", 95_000, 900, 8),
        _row("iocp-aio", "100x64B", 91_000, 1100, 9),
        _row("iocp-aio-streams", "100x64B", 40_000, 900, 20),
        _row("uvloop-protocol", "100x64B", 80_000, 1000, 10),
        _row("rloop-protocol", "100x64B", 82_000, 1000, 11),
        _row("asyncio-protocol", "100x64B", 60_000, 1200, 14),
        _row("uvloop-streams", "100x64B", 30_000, 1000, 15),
        _row("rloop-streams", "100x64B", 36_000, 950, 18),
        # Server's throughput target is for the kit's three scenarios only.
        _row("iocp-server", "10x64KiB", 1_000, 900, 8, method="suite"),
        _row("uvloop-protocol", "10x64KiB", 2_000, 900, 8, method="suite"),
        _row("iocp-server", "10k-idle", 1_000, 900, 8, method="suite", kib=2.0),
        _row("iocp-aio", "10k-idle", 1_000, 900, 8, method="suite", kib=5.0),
        _row("uvloop-protocol", "10k-idle", 1_000, 900, 8, method="suite", kib=2.5),
    ])
    text = report.targets(rows)
    assert "targets (issue 11), echo:" in text
    lines = {tuple(ln.split()[:3]): ln for ln in text.splitlines()
             if ln.startswith("  ") and "issue" not in ln}
    server = lines[("kit", "100x64B", "iocp-server")]
    assert "1.16x rloop-protocol ok (>= 1.15)" in server
    assert "CPU/msg 0.73x rloop-protocol ok (<= 0.85)" in server
    assert "p99 0.90x uvloop-protocol ok" in server
    aio = lines[("kit", "100x64B", "iocp-aio")]
    assert "1.11x rloop-protocol ok (>= 1.1)" in aio and "p99 1.10x uvloop-protocol MISSED" in aio
    assert "CPU/msg" not in aio
    streams = lines[("kit", "100x64B", "iocp-aio-streams")]
    assert "1.11x rloop-streams ok (>= 1.1)" in streams and "p99 0.90x uvloop-streams ok" in streams
    assert ("suite", "10x64KiB", "iocp-server") not in lines
    assert "KiB/conn 2.0 = 0.80x uvloop-protocol ok" in lines[("suite", "10k-idle", "iocp-server")]
    assert "KiB/conn 5.0 = 2.00x uvloop-protocol MISSED" in lines[("suite", "10k-idle", "iocp-aio")]
    assert report.targets(runner.summarize([_row("uvloop-protocol", "100x64B", 1, 1, 1)])) == ""
