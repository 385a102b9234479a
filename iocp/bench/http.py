"""The HTTP scenario: hello-world apps under wrk, each server in its own process.

One measurement: start the server (``python -m iocp.bench.httpservers
APP-LOOP``) pinned to one CPU, wait until ``GET /`` answers "Hello,
World!", run wrk pinned to another CPU once for the warm-up and once for
the measured window, read the server's CPU time over the measured wrk run
and its peak RSS from /proc, stop it (SIGTERM, then SIGKILL).  Servers are
interleaved within each round, as in the echo runner; results are medians
over rounds.  wrk's durations are whole seconds, so windows are rounded up.
"""

from __future__ import annotations

import http.client
import math
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Tuple

from iocp.bench import httpservers as _hs
from iocp.bench import runner as _runner
from iocp.bench import servers as _servers

WRK = "wrk"


# ------------------------------------------------------------------ wrk output

_TIME_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_BYTES = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
_NUM = r"([0-9]+(?:\.[0-9]+)?)"


def _time_us(value: str, unit: str) -> float:
    return float(value) * _TIME_US[unit]


def parse_wrk(text: str) -> Dict[str, Any]:
    """wrk's report (with ``--latency``) as numbers.

    Returns requests_per_s, requests, duration_s, read_bytes, latency_us
    ({"avg", "stdev", "max", "p50", "p75", "p90", "p99"}; percentiles only
    with --latency), socket_errors ({"connect", "read", "write",
    "timeout"}, zeros when wrk printed no such line), non_2xx_3xx and
    errors (their sum).  ValueError when the text is not a wrk report."""
    m = re.search(r"^Requests/sec:\s+" + _NUM + r"\s*$", text, re.M)
    if not m:
        raise ValueError("not a wrk report (no Requests/sec line): "
                         + (text.strip().splitlines() or ["<empty>"])[-1][:200])
    out: Dict[str, Any] = {"requests_per_s": float(m.group(1))}
    m = re.search(r"^\s*([0-9]+) requests in " + _NUM + r"(us|ms|s|m|h), " + _NUM
                  + r"(B|KB|MB|GB|TB) read\s*$", text, re.M)
    if not m:
        raise ValueError("wrk report without its 'N requests in T' line")
    out["requests"] = int(m.group(1))
    out["duration_s"] = _time_us(m.group(2), m.group(3)) / 1e6
    out["read_bytes"] = int(float(m.group(4)) * _BYTES[m.group(5)])
    lat: Dict[str, float] = {}
    t = _NUM + r"(us|ms|s|m|h)"
    m = re.search(r"^\s*Latency\s+" + t + r"\s+" + t + r"\s+" + t, text, re.M)
    if m:
        lat["avg"] = _time_us(m.group(1), m.group(2))
        lat["stdev"] = _time_us(m.group(3), m.group(4))
        lat["max"] = _time_us(m.group(5), m.group(6))
    for pct, value, unit in re.findall(r"^\s*(50|75|90|99)%\s+" + t + r"\s*$", text, re.M):
        lat[f"p{pct}"] = _time_us(value, unit)
    out["latency_us"] = lat
    errs = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    m = re.search(r"^\s*Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), "
                  r"timeout ([0-9]+)\s*$", text, re.M)
    if m:
        errs = dict(zip(errs, (int(g) for g in m.groups())))
    out["socket_errors"] = errs
    m = re.search(r"^\s*Non-2xx or 3xx responses: ([0-9]+)\s*$", text, re.M)
    out["non_2xx_3xx"] = int(m.group(1)) if m else 0
    out["errors"] = sum(errs.values()) + out["non_2xx_3xx"]
    return out


# ------------------------------------------------------------------ config


@dataclass
class HttpConfig:
    servers: List[str]
    rounds: int = 1
    warmup: int = 1              # seconds of wrk before measuring (0: none)
    duration: int = 2            # measured seconds
    connections: int = 100
    threads: int = 1             # wrk threads
    host: str = "127.0.0.1"
    backend: str | None = None
    max_interference: float = 25.0
    retries: int = 2
    startup_timeout: float = 20.0

    def wrk_args(self, duration: int) -> List[str]:
        return [f"-t{self.threads}", f"-c{self.connections}", f"-d{duration}s",
                "--timeout", "2s", "--latency"]

    def command(self) -> str:
        """The measured wrk command, as a user would type it."""
        return " ".join([WRK, *self.wrk_args(self.duration), "http://HOST:PORT/"])


def whole_seconds(value: float, least: int) -> int:
    """wrk takes whole seconds: `value` rounded up, at least `least`."""
    return max(least, math.ceil(value - 1e-9))


def missing() -> str | None:
    """None when wrk is on PATH, else why the HTTP scenario cannot run."""
    if shutil.which(WRK) is None:
        return "wrk not found (apt-get install wrk)"
    return None


def available() -> Tuple[List[str], Dict[str, str]]:
    """(HTTP servers that can run here, {server: reason} for the others);
    all skipped, with the same reason, without wrk."""
    reason = missing()
    if reason:
        return [], {name: reason for name in _hs.HTTP_SERVERS}
    return _hs.available()


# ------------------------------------------------------------------ one run


@dataclass
class HttpMeasurement(_runner.Disturbed):
    server: str
    app: str
    loop: str
    round: int
    ok: bool = False
    requests_per_s: float = 0.0
    requests: int = 0
    p50_us: float = 0.0
    p90_us: float = 0.0
    p99_us: float = 0.0
    max_us: float = 0.0
    errors: int = 0
    error_detail: Dict[str, int] = field(default_factory=dict)
    server_cpu_s: float = 0.0
    cpu_us_per_req: float = 0.0
    peak_rss_kib: int = 0
    wall_s: float = 0.0
    wrk_cpu_s: float = 0.0
    other_cpu_s: float = 0.0
    steal_s: float = 0.0
    discarded: bool = False
    pinned: bool = False
    note: str = ""
    wrk_output: str = ""


def url(host: str, port: int, path: str = "/") -> str:
    return f"http://[{host}]:{port}{path}" if ":" in host else f"http://{host}:{port}{path}"


def http_probe(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when GET / on host:port answers 200 with the hello-world body."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        return resp.status == 200 and resp.read() == _hs.BODY
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _wrk(cfg: HttpConfig, port: int, duration: int, cpus: set | None) -> Tuple[int, str, bool]:
    """Runs wrk once: (exit status, stdout + stderr, pinned)."""
    cmd = [WRK, *cfg.wrk_args(duration), url(cfg.host, port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    pinned = _runner._pin(proc.pid, cpus)
    try:
        out, _ = proc.communicate(timeout=duration + 20.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return -1, "wrk timed out\n" + out.decode(errors="replace"), pinned
    return proc.returncode, out.decode(errors="replace"), pinned


def measure(cfg: HttpConfig, server: str, rnd: int) -> HttpMeasurement:
    """One run; a server that loses the race for its free port starts again."""
    for _ in range(3):
        m = _measure_once(cfg, server, rnd)
        if m.ok or "Address already in use" not in m.note:
            break
    return m


def _measure_once(cfg: HttpConfig, server: str, rnd: int) -> HttpMeasurement:
    app, _, loop = server.partition("-")
    m = HttpMeasurement(server=server, app=app, loop=loop, round=rnd)
    srv_cpus, load_cpus, _ = _runner.cpu_plan(0, "kit")
    proc, errfile, port, pinned, note = _runner.start_server(
        "iocp.bench.httpservers", server, cfg.host, cfg.backend, srv_cpus, http_probe,
        cfg.startup_timeout)
    try:
        if note:
            m.note = note
            return m
        if cfg.warmup > 0:
            code, out, _ = _wrk(cfg, port, cfg.warmup, load_cpus)
            if code != 0:
                m.note = "wrk (warm-up) failed: " + (out.strip().splitlines() or ["?"])[-1]
                return m
        window = _runner.CpuWindow(proc.pid)
        code, out, wrk_pinned = _wrk(cfg, port, cfg.duration, load_cpus)
        window.close()
        m.wall_s, m.wrk_cpu_s = window.wall_s, window.load_cpu_s
        m.other_cpu_s, m.steal_s = window.other_cpu_s, window.steal_s
        m.peak_rss_kib = _runner.proc_status_kib(proc.pid, "VmHWM")
        m.pinned = pinned and wrk_pinned
        m.wrk_output = out[-4000:]
        if code != 0:
            m.note = "wrk failed: " + (out.strip().splitlines() or ["?"])[-1]
            return m
        try:
            r = parse_wrk(out)
        except ValueError as exc:
            m.note = str(exc)
            return m
        lat = r["latency_us"]
        m.requests_per_s, m.requests = r["requests_per_s"], r["requests"]
        m.p50_us, m.p90_us = lat.get("p50", 0.0), lat.get("p90", 0.0)
        m.p99_us, m.max_us = lat.get("p99", 0.0), lat.get("max", 0.0)
        m.errors = r["errors"]
        m.error_detail = {k: v for k, v in r["socket_errors"].items() if v}
        if r["non_2xx_3xx"]:
            m.error_detail["non_2xx_3xx"] = r["non_2xx_3xx"]
        m.server_cpu_s = window.server_cpu_s
        if m.requests:
            m.cpu_us_per_req = m.server_cpu_s / m.requests * 1e6
        if proc.poll() is not None:
            m.note = f"server exited during the run (status {proc.returncode})"
            return m
        if not m.requests:
            m.note = "no request completed"
            return m
        m.ok = True
        return m
    finally:
        _runner._stop(proc)
        errfile.close()


# ------------------------------------------------------------------ all runs


def run_all(cfg: HttpConfig, progress: Callable[[str], None]) -> List[HttpMeasurement]:
    """Every server once per round, interleaved."""
    jobs = [(rnd, srv) for rnd in range(1, cfg.rounds + 1) for srv in cfg.servers]
    results: List[HttpMeasurement] = []
    t_start = time.monotonic()
    est_each = cfg.warmup + cfg.duration + 1.5
    for i, (rnd, srv) in enumerate(jobs):
        elapsed = time.monotonic() - t_start
        per = elapsed / i if i else est_each
        progress(f"[http round {rnd}/{cfg.rounds}] {srv:<20} run {i + 1}/{len(jobs)}, "
                 f"~{_runner._fmt_time(per * (len(jobs) - i))} left")
        m = measure(cfg, srv, rnd)
        for _ in range(cfg.retries):
            if not (m.ok and cfg.max_interference > 0
                    and m.interference_pct > cfg.max_interference):
                break
            progress(f"    other work used {m.interference_pct:.0f}% of a CPU during the "
                     "load; measuring again")
            m.discarded = True
            results.append(m)
            m = measure(cfg, srv, rnd)
        if not m.ok:
            progress(f"    {srv}: {m.note}")
        elif m.errors:
            progress(f"    {srv}: {m.errors} wrk errors {m.error_detail}")
        results.append(m)
    progress(f"http done in {_runner._fmt_time(time.monotonic() - t_start)}")
    return results


def summarize(results: List[HttpMeasurement]) -> List[Dict[str, Any]]:
    """Medians over the ok rounds of every server; ratios to the same app on
    uvloop (requests/s, p99, server CPU per request)."""
    groups: Dict[str, List[HttpMeasurement]] = {}
    for m in results:
        if not m.discarded:
            groups.setdefault(m.server, []).append(m)
    rows: List[Dict[str, Any]] = []
    for server, ms in groups.items():
        ok = [m for m in ms if m.ok]
        row: Dict[str, Any] = {"scenario": "http", "server": server, "app": ms[0].app,
                               "loop": ms[0].loop, "rounds": len(ok),
                               "failed_rounds": len(ms) - len(ok)}
        if ok:
            for attr in ("requests_per_s", "p50_us", "p90_us", "p99_us", "max_us",
                         "cpu_us_per_req", "peak_rss_kib"):
                row[attr] = statistics.median(getattr(m, attr) for m in ok)
            rates = [m.requests_per_s for m in ok]
            row["requests_per_s_min"], row["requests_per_s_max"] = min(rates), max(rates)
            row["errors"] = sum(m.errors for m in ok)
            row["pinned"] = all(m.pinned for m in ok)
            row["interference_pct"] = statistics.median(m.interference_pct for m in ok)
        else:
            row["note"] = ms[-1].note
        rows.append(row)
    for row in rows:
        ref = next((r for r in rows if r["app"] == row["app"]
                    and r["loop"] == _hs.REFERENCE_LOOP and "requests_per_s" in r), None)
        for key, attr in (("vs_uvloop", "requests_per_s"), ("p99_vs_uvloop", "p99_us"),
                          ("cpu_vs_uvloop", "cpu_us_per_req")):
            row[key] = (row[attr] / ref[attr] if ref and ref.get(attr) and attr in row
                        else None)
    return rows


def to_json(cfg: HttpConfig, results: List[HttpMeasurement], rows: List[Dict[str, Any]],
            skipped: Dict[str, str]) -> Dict[str, Any]:
    return {
        "config": dict(asdict(cfg), wrk=cfg.command(), wrk_version=wrk_version()),
        "skipped_servers": skipped,
        "summary": rows,
        "measurements": [dict(asdict(m), interference_pct=m.interference_pct)
                         for m in results],
    }


def wrk_version() -> str:
    try:
        out = subprocess.run([WRK, "--version"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "?"
    first = (out.stdout.strip().splitlines() or ["?"])[0]
    return first.split(" Copyright")[0]


def uvicorn_http() -> str:
    """The HTTP parser uvicorn's "auto" picks here (httptools, else h11)."""
    return "httptools" if _servers._has_module("httptools") else "h11"
