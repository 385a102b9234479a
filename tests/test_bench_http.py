"""The HTTP scenario: wrk's report parsed, the hello-world servers answer, and
`iocp bench --http` runs end to end and reports the expected rows.

wrk's reports below are real ones, captured from wrk 4.1.0 on this project's
machine.  Everything is bounded in time; nothing asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import urllib.request
from http.client import HTTPConnection

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the benchmark tools are Linux-only", allow_module_level=True)

import iocp  # noqa: E402
from iocp.bench import cli, httpservers, report, runner  # noqa: E402
from iocp.bench import http as hb  # noqa: E402

# --------------------------------------------------------------- wrk's report

WRK_AIOHTTP = """\
Running 2s test @ http://127.0.0.1:18084/
  1 threads and 100 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    16.72ms    9.57ms 113.18ms   71.40%
    Req/Sec     6.04k     2.14k   11.53k    80.00%
  Latency Distribution
     50%   15.63ms
     75%   21.46ms
     90%   29.85ms
     99%   39.71ms
  12204 requests in 2.02s, 1.76MB read
Requests/sec:   6029.93
Transfer/sec:      0.87MB
"""

# -c1: latencies in microseconds and milliseconds.
WRK_ONE_CONN = """\
Running 1s test @ http://127.0.0.1:18086/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   738.46us    1.43ms  12.74ms   87.61%
    Req/Sec     7.12k     2.97k   11.77k    70.00%
  Latency Distribution
     50%   82.00us
     75%  710.00us
     90%    2.54ms
     99%    6.83ms
  7073 requests in 1.00s, 1.02MB read
Requests/sec:   7067.08
Transfer/sec:      1.02MB
"""

# GET /nope on aiohttp: every response a 404.
WRK_NON_2XX = """\
Running 1s test @ http://127.0.0.1:18081/nope
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.65ms    1.83ms  21.83ms   95.32%
    Req/Sec     7.05k     1.56k   10.58k    80.00%
  Latency Distribution
     50%    1.32ms
     75%    1.59ms
     90%    2.09ms
     99%   11.79ms
  7048 requests in 1.01s, 1.17MB read
  Non-2xx or 3xx responses: 7048
Requests/sec:   7003.70
Transfer/sec:      1.16MB
"""

# A server that closes each connection after half a response.
WRK_READ_ERRORS = """\
Running 1s test @ http://127.0.0.1:18083/
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 1.10s, 0.92MB read
  Socket errors: connect 0, read 21839, write 0, timeout 0
Requests/sec:      0.00
Transfer/sec:    853.35KB
"""

# A server that accepts and never answers.
WRK_SILENT = """\
Running 2s test @ http://127.0.0.1:18082/
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 2.00s, 0.00B read
Requests/sec:      0.00
Transfer/sec:       0.00B
"""

# Nothing listening: wrk exits 1 with one line.
WRK_REFUSED = """\
unable to connect to 127.0.0.1:18099 Connection refused
"""


def test_parse_wrk_report() -> None:
    r = hb.parse_wrk(WRK_AIOHTTP)
    assert r["requests_per_s"] == 6029.93
    assert r["requests"] == 12204 and r["duration_s"] == pytest.approx(2.02)
    assert r["read_bytes"] == int(1.76 * 2**20)
    assert r["latency_us"] == pytest.approx({
        "avg": 16720.0, "stdev": 9570.0, "max": 113180.0,
        "p50": 15630.0, "p75": 21460.0, "p90": 29850.0, "p99": 39710.0})
    assert r["socket_errors"] == {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    assert r["non_2xx_3xx"] == 0 and r["errors"] == 0


def test_parse_wrk_units() -> None:
    r = hb.parse_wrk(WRK_ONE_CONN)
    assert r["latency_us"]["avg"] == pytest.approx(738.46)
    assert r["latency_us"]["p50"] == pytest.approx(82.0)
    assert r["latency_us"]["p75"] == pytest.approx(710.0)
    assert r["latency_us"]["p90"] == pytest.approx(2540.0)
    assert r["latency_us"]["max"] == pytest.approx(12740.0)
    assert r["requests"] == 7073 and r["duration_s"] == pytest.approx(1.0)


def test_parse_wrk_counts_errors() -> None:
    r = hb.parse_wrk(WRK_NON_2XX)
    assert r["non_2xx_3xx"] == 7048 and r["errors"] == 7048
    r = hb.parse_wrk(WRK_READ_ERRORS)
    assert r["requests"] == 0 and r["requests_per_s"] == 0.0
    assert r["socket_errors"] == {"connect": 0, "read": 21839, "write": 0, "timeout": 0}
    assert r["errors"] == 21839
    r = hb.parse_wrk(WRK_SILENT)
    assert r["requests"] == 0 and r["errors"] == 0 and r["read_bytes"] == 0


@pytest.mark.parametrize("text", [WRK_REFUSED, "", "Requests/sec: 12\n"])
def test_parse_wrk_refuses_what_is_not_a_report(text: str) -> None:
    with pytest.raises(ValueError):
        hb.parse_wrk(text)


def test_whole_seconds() -> None:
    assert hb.whole_seconds(0.2, 1) == 1
    assert hb.whole_seconds(2.0, 1) == 2
    assert hb.whole_seconds(2.5, 1) == 3
    assert hb.whole_seconds(0.0, 0) == 0


# --------------------------------------------------------------- summary, report


def _m(server: str, rnd: int, rps: float, p99: float, cpu: float, **kw) -> hb.HttpMeasurement:
    app, _, loop = server.partition("-")
    return hb.HttpMeasurement(server=server, app=app, loop=loop, round=rnd, ok=True,
                                requests_per_s=rps, requests=int(rps * 3), p50_us=p99 / 4,
                                p99_us=p99, cpu_us_per_req=cpu, peak_rss_kib=40_000, **kw)


def test_summary_and_report() -> None:
    results = [
        _m("aiohttp-iocp-aio", 1, 900.0, 3000.0, 80.0),
        _m("aiohttp-uvloop", 1, 1000.0, 2000.0, 50.0),
        _m("aiohttp-iocp-aio", 2, 1300.0, 1000.0, 60.0),
        _m("aiohttp-uvloop", 2, 1100.0, 2000.0, 50.0),
        _m("aiohttp-iocp-aio", 3, 1200.0, 1500.0, 70.0),
        _m("aiohttp-uvloop", 3, 1050.0, 2000.0, 50.0),
        _m("aiohttp-uvloop", 3, 1.0, 2000.0, 50.0, discarded=True),   # measured again
        _m("uvicorn-iocp-aio", 1, 500.0, 9000.0, 90.0),
        _m("uvicorn-uvloop", 1, 1000.0, 3000.0, 30.0),
        hb.HttpMeasurement(server="uvicorn-asyncio", app="uvicorn", loop="asyncio", round=1,
                             note="server did not start: boom"),
    ]
    rows = {r["server"]: r for r in hb.summarize(results)}
    assert list(rows) == ["aiohttp-iocp-aio", "aiohttp-uvloop", "uvicorn-iocp-aio",
                          "uvicorn-uvloop", "uvicorn-asyncio"]
    a = rows["aiohttp-iocp-aio"]
    assert a["rounds"] == 3 and a["requests_per_s"] == 1200.0          # medians
    assert (a["requests_per_s_min"], a["requests_per_s_max"]) == (900.0, 1300.0)
    assert a["vs_uvloop"] == pytest.approx(1200.0 / 1050.0)
    assert a["p99_vs_uvloop"] == pytest.approx(1500.0 / 2000.0)
    assert a["cpu_vs_uvloop"] == pytest.approx(70.0 / 50.0)
    assert rows["aiohttp-uvloop"]["rounds"] == 3 and rows["aiohttp-uvloop"]["vs_uvloop"] == 1.0
    assert rows["uvicorn-iocp-aio"]["vs_uvloop"] == pytest.approx(0.5)
    failed = rows["uvicorn-asyncio"]
    assert failed["rounds"] == 0 and failed["note"] == "server did not start: boom"

    text = report.http_table(list(rows.values()))
    assert "http-aiohttp" in text and "http-uvicorn" in text
    assert "uvicorn-asyncio   failed: server did not start: boom" in text
    line = next(ln for ln in text.splitlines() if ln.strip().startswith("aiohttp-iocp-aio"))
    assert line.split()[1:5] == ["1,200", "±17%", "0.38", "1.50"]
    md = report.http_table(list(rows.values()), markdown=True)
    assert "| aiohttp-iocp-aio | 1,200 |" in md

    tgt = report.http_targets(list(rows.values())).splitlines()
    assert tgt[1] == "targets (issue 11), HTTP:"
    assert tgt[2].split()[:4] == ["aiohttp-iocp-aio", "1.14x", "aiohttp-uvloop", "ok"]
    assert "p99 0.75x aiohttp-uvloop ok" in tgt[2]
    assert tgt[3].split()[:4] == ["uvicorn-iocp-aio", "0.50x", "uvicorn-uvloop", "MISSED"]
    assert "p99 3.00x uvicorn-uvloop MISSED" in tgt[3]
    assert report.http_targets([rows["uvicorn-asyncio"]]) == ""


# --------------------------------------------------------------- the servers


def _cases() -> list:
    cases = [pytest.param(f"{app}-iocp-aio", b, id=f"{app}-iocp-aio-{b}")
             for app in httpservers.APPS for b in iocp.backends()]
    cases += [pytest.param(f"{app}-{loop}", None, id=f"{app}-{loop}")
              for app in httpservers.APPS for loop in httpservers.LOOPS if loop != "iocp-aio"]
    return cases


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name,backend", _cases())
def test_server_answers_and_stops_on_sigterm(name: str, backend: str | None) -> None:
    reason = httpservers.check(name)
    if reason:
        pytest.skip(reason)
    proc, err, port, _, note = runner.start_server(
        "iocp.bench.httpservers", name, "127.0.0.1", backend, None, hb.http_probe, 30.0)
    try:
        assert not note, note
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert resp.status == 200
            assert resp.headers.get_content_type() == "text/plain"
            assert resp.read() == b"Hello, World!"
        # Keep-alive: several requests on one connection, as wrk sends them.
        conn = HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            for _ in range(5):
                conn.request("GET", "/")
                resp = conn.getresponse()
                assert (resp.status, resp.read()) == (200, b"Hello, World!")
                assert not resp.will_close
        finally:
            conn.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        err.seek(0)
        tail = err.read()[-2000:].decode(errors="replace")
        err.close()
    if name == "aiohttp-rloop":
        tail = _without_rloop_aiohttp_race(tail)
    assert "Traceback" not in tail, tail


def _without_rloop_aiohttp_race(log: str) -> str:
    """`log` less the one known peer defect.  When a client sends a request
    and closes, rloop 0.5 calls data_received(), eof_received() and
    connection_lost() in one loop turn, before a callback that
    data_received() scheduled with call_soon() runs (asyncio and uvloop run
    that callback first: checked on a plain Protocol).  aiohttp's request
    handler task, woken by data_received(), then resumes on a torn-down
    protocol and aiohttp logs "Task exception was never retrieved ...
    self._request_factory(... TypeError: 'NoneType' object is not
    callable".  Every request was answered all the same."""
    marker = "Task exception was never retrieved"
    parts = log.split(marker)
    kept = [parts[0]] + [p for p in parts[1:] if not (
        "self._request_factory(" in p and "'NoneType' object is not callable" in p)]
    return marker.join(kept)


def test_unknown_or_missing_server_is_refused(capsys) -> None:
    assert httpservers.check("nginx-uvloop") == "unknown HTTP server 'nginx-uvloop'"
    with pytest.raises(SystemExit):
        httpservers.main(["nginx-uvloop", "--port", "1"])
    capsys.readouterr()


# --------------------------------------------------------------- the command line


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    return parser.parse_args(list(argv))


def test_tiny_http_run_reports_the_expected_rows(tmp_path, capsys) -> None:
    names = ["aiohttp-iocp-aio", "aiohttp-uvloop", "uvicorn-iocp-aio", "uvicorn-uvloop"]
    for name in names:
        reason = hb.missing() or httpservers.check(name)
        if reason:
            pytest.skip(reason)
    out = tmp_path / "r.json"
    args = _parse("--http", "--servers", ",".join(names), "--duration", "1", "--warmup", "0",
                  "--max-interference", "0", "--json", str(out))
    code = cli.run(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = captured.out
    assert "HTTP only" in printed and "wrk -t1 -c100 -d1s" in printed
    for block in ("http-aiohttp", "http-uvicorn", "targets (issue 11), HTTP:"):
        assert block in printed
    lines = printed.splitlines()
    for name in names:
        # One table row and, for iocp.aio, one targets line per server.
        assert sum(ln.strip().startswith(name + " ") for ln in lines) == (
            2 if name.endswith("iocp-aio") else 1), printed
    data = json.loads(out.read_text())
    assert data["summary"] == [] and data["config"] == []
    h = data["http"]
    assert h["config"]["duration"] == 1 and h["config"]["warmup"] == 0
    assert h["config"]["wrk"].startswith("wrk -t1 -c100 -d1s")
    rows = {r["server"]: r for r in h["summary"]}
    assert list(rows) == names
    for row in rows.values():
        assert row["rounds"] == 1 and row["errors"] == 0
        # Requests were answered and counted; how many is the benchmark's
        # business, not a test's.
        assert row["requests_per_s"] > 0 and row["p99_us"] > 0
        assert row["cpu_us_per_req"] > 0 and row["peak_rss_kib"] > 0
    assert rows["aiohttp-uvloop"]["vs_uvloop"] == 1.0
    assert rows["uvicorn-iocp-aio"]["vs_uvloop"] == pytest.approx(
        rows["uvicorn-iocp-aio"]["requests_per_s"] / rows["uvicorn-uvloop"]["requests_per_s"])
    [m] = [m for m in h["measurements"] if m["server"] == "aiohttp-iocp-aio"]
    assert m["ok"] and "Requests/sec:" in m["wrk_output"]


@pytest.fixture
def recorded(monkeypatch):
    """Replaces both runners: records the configurations a command line
    hands them, measures nothing."""
    seen: dict = {"echo": [], "http": []}
    monkeypatch.setattr(runner, "run_all",
                        lambda cfg, progress: (seen["echo"].append(cfg) or ([], {})))
    monkeypatch.setattr(hb, "run_all", lambda cfg, progress: (seen["http"].append(cfg) or []))
    monkeypatch.setattr(hb, "missing", lambda: None)
    monkeypatch.setattr(httpservers, "check", lambda name: None)
    return seen


def _configs(seen: dict, *argv: str) -> tuple:
    seen["echo"].clear()
    seen["http"].clear()
    assert cli.run(_parse(*argv)) == 0
    return [c.method for c in seen["echo"]], list(seen["http"])


def test_which_scenarios_a_command_line_runs(recorded, capsys) -> None:
    assert _configs(recorded, "--quick") == (["suite"], [])
    methods, [h] = _configs(recorded, "--full")
    assert methods == ["suite", "kit"]
    assert (h.rounds, h.warmup, h.duration) == (5, 1, 3)
    assert h.servers == httpservers.HTTP_SERVERS
    assert h.command() == "wrk -t1 -c100 -d3s --timeout 2s --latency http://HOST:PORT/"
    methods, [h] = _configs(recorded, "--http")
    assert methods == [] and (h.rounds, h.warmup, h.duration) == (1, 1, 2)
    _, [h] = _configs(recorded, "--http", "--full", "--duration", "0.3", "--warmup", "0")
    assert (h.rounds, h.warmup, h.duration) == (5, 0, 1)       # whole seconds for wrk
    _, [h] = _configs(recorded, "--servers", "uvicorn-rloop")
    assert h.servers == ["uvicorn-rloop"]
    assert _configs(recorded, "--full", "--servers", "c-epoll") == (["suite", "kit"], [])
    assert _configs(recorded, "--full", "--scenarios", "100x64B") == (["suite", "kit"], [])
    methods, [h] = _configs(recorded, "--scenarios", "100x64B,http", "--servers",
                            "c-epoll,aiohttp-asyncio")
    assert methods == ["suite"] and h.servers == ["aiohttp-asyncio"]
    methods, [h] = _configs(recorded, "--scenarios", "http")
    assert methods == [] and h.servers == httpservers.HTTP_SERVERS
    capsys.readouterr()


@pytest.mark.parametrize("argv,error", [
    (["--http", "--servers", "c-epoll"], "--http runs HTTP servers only"),
    (["--http", "--scenarios", "100x64B"], "--http runs the HTTP scenario only"),
    (["--servers", "aiohttp-nope"], "unknown server(s): aiohttp-nope"),
    (["--scenarios", "https"], "unknown scenario(s): https"),
    (["--servers", "c-epoll", "--scenarios", "http"], "nothing to run"),
])
def test_contradictions_are_refused(recorded, capsys, argv, error) -> None:
    assert cli.run(_parse(*argv)) == 2
    assert error in capsys.readouterr().err
    assert recorded == {"echo": [], "http": []}


def test_full_without_wrk_says_it_skipped_http(recorded, monkeypatch, capsys) -> None:
    monkeypatch.setattr(hb, "missing", lambda: "wrk not found (apt-get install wrk)")
    assert _configs(recorded, "--full") == (["suite", "kit"], [])
    captured = capsys.readouterr()
    assert "skipped the HTTP scenario: wrk not found (apt-get install wrk)" in captured.out
    # One reason for the scenario, not one per server.
    assert "skipped HTTP server" not in captured.out
    assert cli.run(_parse("--http")) == 2
    assert "wrk not found" in capsys.readouterr().err
