"""Runs servers x scenarios x rounds; each server in its own process.

One measurement: start the server (pinned to one CPU), wait until it echoes,
run the native load generator in another process (pinned to the other
CPUs), read the server's CPU time and peak RSS from /proc, stop it
(SIGTERM, then SIGKILL).  Servers are interleaved within each round
(A B C A B C ...) so a slow drift of the machine hits all of them alike;
results are medians over rounds.

Two methods (``Config.method``):

- ``suite``: the server on the last CPU, the load generator on the others
  with up to 4 threads; server CPU per message over the whole load
  (connection setup, warm-up and drain included).
- ``kit``: the way the project machine's private echo kit measures: one
  load-generator thread, the server on the first CPU and the load
  generator on the second, server CPU per message over exactly the
  measured window (sampled by the load generator itself at the window's
  edges), 1 s warm-up + 3 s, 5 rounds in --full.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Tuple

from iocp.bench import servers as _servers


@dataclass(frozen=True)
class Scenario:
    name: str
    connections: int
    size: int
    inflight: int = 1
    active: int = -1          # -1: all connections busy
    description: str = ""

    @property
    def busy(self) -> int:
        return self.connections if self.active < 0 else self.active


SCENARIOS: Dict[str, Scenario] = {s.name: s for s in (
    Scenario("100x64B", 100, 64, description="100 connections, 64 B messages"),
    Scenario("100x1KiB", 100, 1024, description="100 connections, 1 KiB messages"),
    Scenario("1000x64B", 1000, 64, description="1,000 connections, 64 B messages"),
    Scenario("10x64KiB", 10, 65536, description="10 connections, 64 KiB messages"),
    Scenario("10x64Bx16", 10, 64, inflight=16,
             description="10 connections, 64 B, 16 messages in flight each"),
    Scenario("10k-idle", 10000, 64, active=100,
             description="10,000 connections, 100 active (memory per connection)"),
)}

QUICK_SCENARIOS = ["100x64B", "10x64Bx16"]
# The three scenarios of the private echo kit (issue 10's targets).
KIT_SCENARIOS = ["100x64B", "1000x64B", "10x64Bx16"]
METHODS = ("suite", "kit")


@dataclass
class Config:
    servers: List[str]
    scenarios: List[Scenario]
    rounds: int = 1
    warmup: float = 0.3
    duration: float = 1.2
    host: str = "127.0.0.1"
    backend: str | None = None
    loadgen_threads: int = 0          # 0: automatic
    max_interference: float = 25.0    # % of a CPU used by other processes; <= 0: ignore
    retries: int = 2                  # re-runs of a measurement disturbed beyond that
    startup_timeout: float = 20.0
    method: str = "suite"             # "suite" or "kit" (see the module docstring)
    loadgen_work_us: float = 0.0      # busy work per message in the load generator


class Disturbed:
    """What a measurement dataclass with wall_s, other_cpu_s and steal_s
    knows about how much else ran during its window."""

    wall_s: float
    other_cpu_s: float
    steal_s: float

    @property
    def interference_pct(self) -> float:
        """CPU used by other processes plus steal, as % of one CPU."""
        if not self.wall_s:
            return 0.0
        return 100.0 * (self.other_cpu_s + self.steal_s) / self.wall_s


@dataclass
class Measurement(Disturbed):
    server: str
    scenario: str
    round: int
    ok: bool
    method: str = "suite"
    msgs_per_s: float = 0.0
    mb_per_s: float = 0.0
    p50_us: float = 0.0
    p99_us: float = 0.0
    p999_us: float = 0.0
    errors: int = 0
    error_detail: Dict[str, int] = field(default_factory=dict)
    messages_total: int = 0
    server_cpu_s: float = 0.0
    cpu_s_per_100k: float = 0.0
    peak_rss_kib: int = 0
    base_rss_kib: int = 0
    kib_per_conn: float = 0.0
    connected: int = 0
    connect_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    wall_s: float = 0.0
    other_cpu_s: float = 0.0      # CPU busy time of everything else during the load
    steal_s: float = 0.0          # time the hypervisor took from this VM
    discarded: bool = False       # disturbed by other work, measured again
    # Over exactly the measured window (sampled by the load generator):
    cpu_us_per_msg: float = 0.0   # server CPU microseconds per echoed message
    runs_per_msg: float = 0.0     # times the server was scheduled in, per message
    loadgen_util: float = 0.0     # load generator thread's CPU / wall (1.0 = saturated)
    loadgen_syscalls_per_msg: float = 0.0
    loadgen_events_per_wait: float = 0.0
    pinned: bool = False
    server_report: str = ""       # the server's own summary line on exit, if any
    note: str = ""
    load: Dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ /proc


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of pid, in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def system_cpu_seconds() -> tuple[float, float]:
    """(user + nice + system, steal) of the whole machine from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return (0.0, 0.0)
    steal = v[7] if len(v) > 7 else 0
    return ((v[0] + v[1] + v[2]) / _CLK_TCK, steal / _CLK_TCK)


def children_cpu_seconds() -> float:
    try:
        import resource
    except ImportError:
        return 0.0
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def proc_status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------ helpers


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cpu_plan(loadgen_threads: int, method: str = "suite") -> Tuple[set | None, set | None, int]:
    """(server CPUs, load generator CPUs, load generator threads).

    suite: the server on the last usable CPU, the load generator on the
    others with up to 4 threads.  kit: one load-generator thread, the server
    on the first usable CPU and the load generator on the second.  With
    fewer than 2 usable CPUs nothing is pinned (None, None)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return None, None, max(1, loadgen_threads)
    if method == "kit":
        if len(cpus) < 2:
            return None, None, 1
        return {cpus[0]}, {cpus[1]}, 1
    if len(cpus) < 2:
        return None, None, max(1, loadgen_threads)
    server = {cpus[-1]}
    load = set(cpus[:-1])
    threads = loadgen_threads or max(1, min(4, len(load)))
    return server, load, threads


def _pin(pid: int, cpus: set | None) -> bool:
    """Pins pid (and the threads it starts later) to cpus; True if it did."""
    if cpus:
        try:
            os.sched_setaffinity(pid, cpus)
            return True
        except OSError:
            pass
    return False


def start_server(module: str, server: str, host: str, backend: str | None,
                 cpus: set | None, probe: Callable[[str, int], bool],
                 startup_timeout: float) -> Tuple[subprocess.Popen, Any, int, bool, str]:
    """Starts ``python -m module server --host H --port P`` pinned to cpus
    and waits until probe(host, port) answers.

    Returns (process, stderr file, port, pinned, note); note is empty once
    the server answers, else why it did not start.  The caller stops the
    process (_stop) and closes the file in every case."""
    port = free_port(host)
    sargs = [server, "--host", host, "--port", str(port)]
    if backend:
        sargs += ["--backend", backend]
    # stderr to a file, not a pipe: a chatty server must never block on it.
    errfile = tempfile.TemporaryFile()
    proc = subprocess.Popen(python_command(module, *sargs),
                            stdout=subprocess.DEVNULL, stderr=errfile)
    pinned = _pin(proc.pid, cpus)
    deadline = time.monotonic() + startup_timeout
    while not probe(host, port):
        if proc.poll() is not None or time.monotonic() > deadline:
            err = b""
            if proc.poll() is not None:
                errfile.seek(0)
                err = errfile.read()[-4000:]
            return proc, errfile, port, pinned, "server did not start: " + (
                err.decode(errors="replace").strip().splitlines() or ["timeout"])[-1]
        time.sleep(0.05)
    return proc, errfile, port, pinned, ""


class CpuWindow:
    """CPU accounting over one load window: the server's CPU seconds, the
    load's (this process's children that ended in the window), everything
    else busy on the machine, and hypervisor steal."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self._cpu0 = proc_cpu_seconds(server_pid)
        self._sys0, self._steal0 = system_cpu_seconds()
        self._kids0, self._t0 = children_cpu_seconds(), time.monotonic()
        self.server_cpu_s = self.load_cpu_s = self.other_cpu_s = 0.0
        self.steal_s = self.wall_s = 0.0

    def close(self) -> CpuWindow:
        """Ends the window (call once the load process has been reaped)."""
        cpu = proc_cpu_seconds(self.server_pid) - self._cpu0
        sys1, steal1 = system_cpu_seconds()
        self.wall_s = time.monotonic() - self._t0
        self.server_cpu_s = cpu
        self.load_cpu_s = children_cpu_seconds() - self._kids0
        self.other_cpu_s = max(0.0, (sys1 - self._sys0) - cpu - self.load_cpu_s)
        self.steal_s = steal1 - self._steal0
        return self


def echo_probe(host: str, port: int, timeout: float = 0.5) -> bool:
    """True when something on host:port echoes a short message back."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.sendall(b"probe")
            got = b""
            while len(got) < 5:
                chunk = s.recv(5 - len(got))
                if not chunk:
                    return False
                got += chunk
            return got == b"probe"
    except OSError:
        return False


def ensure_nofile(needed: int) -> str | None:
    """Raises RLIMIT_NOFILE (inherited by the children); None or a reason."""
    try:
        import resource
    except ImportError:
        return "no resource module on this platform"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    if soft == inf or soft >= needed:
        return None
    if hard != inf and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return None
        except (ValueError, OSError):
            return (f"RLIMIT_NOFILE hard limit is {hard}, {needed} needed "
                    "(raise it with `ulimit -Hn` as root)")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    except (ValueError, OSError) as exc:
        return f"cannot raise RLIMIT_NOFILE to {needed}: {exc}"
    return None


# The children run this instead of ``python -m MODULE``.  ``-m`` (and a
# script path) put the current directory first on sys.path, so a checkout
# of this repository in the cwd -- `pip install . && iocp bench` at the root
# of a clone -- would shadow the installed, built package with the unbuilt
# source tree.  ``-I``/``-P`` would drop the cwd but also PYTHONPATH and the
# user site (``-P`` is 3.11+ anyway).  So: drop the cwd entry, put the
# directory the parent imported iocp from first, and refuse to run unless
# the child's iocp is the parent's.
_BOOTSTRAP = """\
import os, sys
root, origin, module = sys.argv[1:4]
if sys.path and sys.path[0] in ("", os.curdir):
    del sys.path[0]
sys.path.insert(0, root)
import iocp
mine = os.path.normcase(os.path.abspath(iocp.__file__))
if mine != origin:
    sys.exit(f"iocp bench: the child imported iocp from {mine}, expected {origin}")
import importlib
sys.argv = [module, *sys.argv[4:]]
sys.exit(importlib.import_module(module).main(sys.argv[1:]))
"""


def python_command(module: str, *args: str) -> List[str]:
    """argv running ``module.main(args)`` in a new interpreter, with this
    process's ``iocp`` package and never one from the current directory."""
    import iocp

    origin = os.path.normcase(os.path.abspath(iocp.__file__))
    root = os.path.dirname(os.path.dirname(origin))
    return [sys.executable, "-c", _BOOTSTRAP, root, origin, module, *args]


def _stop(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=3.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5.0)


# ------------------------------------------------------------------ one run


def measure(cfg: Config, server: str, sc: Scenario, rnd: int) -> Measurement:
    """One run; a server that loses the race for its free port starts again."""
    for _ in range(3):
        m = _measure_once(cfg, server, sc, rnd)
        if m.ok or "Address already in use" not in m.note:
            break
    return m


def _measure_once(cfg: Config, server: str, sc: Scenario, rnd: int) -> Measurement:
    m = Measurement(server=server, scenario=sc.name, round=rnd, ok=False, method=cfg.method)
    srv_cpus, load_cpus, threads = cpu_plan(cfg.loadgen_threads, cfg.method)
    threads = min(threads, sc.connections)
    proc, errfile, port, pinned, note = start_server(
        "iocp.bench.servers", server, cfg.host, cfg.backend, srv_cpus, echo_probe,
        cfg.startup_timeout)
    try:
        if note:
            m.note = note
            return m
        m.base_rss_kib = proc_status_kib(proc.pid, "VmRSS")
        connect_timeout = 10.0 + sc.connections / 1000.0
        lcmd = python_command(
            "iocp.bench.loadgen", "--host", cfg.host,
            "--port", str(port), "--connections", str(sc.connections),
            "--size", str(sc.size), "--inflight", str(sc.inflight),
            "--warmup", str(cfg.warmup), "--duration", str(cfg.duration),
            "--active", str(sc.active), "--threads", str(threads),
            "--connect-timeout", str(connect_timeout), "--drain-timeout", "2.0",
            "--server-pid", str(proc.pid), "--work-us", str(cfg.loadgen_work_us))
        window = CpuWindow(proc.pid)
        lg = subprocess.Popen(lcmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        m.pinned = _pin(lg.pid, load_cpus) and pinned
        budget = cfg.warmup + cfg.duration + connect_timeout + 2.0 + 30.0
        try:
            out, err = lg.communicate(timeout=budget)
        except subprocess.TimeoutExpired:
            lg.kill()
            lg.communicate()
            m.note = "load generator timed out"
            return m
        window.close()
        m.wall_s, m.loadgen_cpu_s = window.wall_s, window.load_cpu_s
        m.other_cpu_s, m.steal_s = window.other_cpu_s, window.steal_s
        m.peak_rss_kib = proc_status_kib(proc.pid, "VmHWM")
        if lg.returncode != 0:
            m.note = "load generator failed: " + (
                err.decode(errors="replace").strip().splitlines() or ["?"])[-1]
            return m
        r = json.loads(out)
        m.load = r
        m.msgs_per_s = r["msgs_per_s"]
        m.mb_per_s = r["mb_per_s"]
        m.p50_us = r["latency_us"]["p50"]
        m.p99_us = r["latency_us"]["p99"]
        m.p999_us = r["latency_us"]["p999"]
        m.errors = r["error_total"]
        m.error_detail = {k: v for k, v in r["errors"].items() if v}
        m.messages_total = r["messages_total"]
        m.connected = r["connected"]
        m.connect_s = r["connect_s"]
        m.server_cpu_s = window.server_cpu_s
        if m.messages_total:
            m.cpu_s_per_100k = m.server_cpu_s / m.messages_total * 1e5
        if sc.active >= 0 and m.connected:
            m.kib_per_conn = max(0, m.peak_rss_kib - m.base_rss_kib) / m.connected
        win = r.get("window") or {}
        if win.get("messages"):
            m.cpu_us_per_msg = win["server_cpu_us_per_msg"]
            m.runs_per_msg = win.get("server_runs", 0) / win["messages"]
            if win.get("seconds"):
                m.loadgen_util = win.get("loadgen_cpu_s", 0.0) / win["seconds"]
            m.loadgen_syscalls_per_msg = win.get("loadgen_syscalls_per_msg", 0.0)
            m.loadgen_events_per_wait = win.get("loadgen_events_per_wait", 0.0)
        elif cfg.method == "kit":
            m.note = "the load generator could not sample the server's CPU time"
            return m
        if proc.poll() is not None:
            m.note = f"server exited during the run (status {proc.returncode})"
            return m
        m.ok = True
        return m
    finally:
        _stop(proc)
        # A server may print one summary line of its own when it stops
        # (iocp-port: completions per run_once() turn).
        try:
            errfile.seek(0)
            for line in errfile.read()[-4000:].decode(errors="replace").splitlines():
                if line.startswith(server + ":"):
                    m.server_report = line[len(server) + 1:].strip()
        except OSError:
            pass
        errfile.close()


# ------------------------------------------------------------------ all runs


def run_all(cfg: Config, progress: Callable[[str], None]) -> Tuple[List[Measurement],
                                                                  Dict[str, str]]:
    """Every (server, scenario) once per round, interleaved; returns
    (measurements, {scenario: skip reason})."""
    skipped: Dict[str, str] = {}
    scenarios: List[Scenario] = []
    for sc in cfg.scenarios:
        reason = ensure_nofile(sc.connections + 1024) if sc.connections > 500 else None
        if reason:
            skipped[sc.name] = reason
        else:
            scenarios.append(sc)
    jobs = [(rnd, sc, srv) for rnd in range(1, cfg.rounds + 1)
            for sc in scenarios for srv in cfg.servers]
    results: List[Measurement] = []
    t_start = time.monotonic()
    est_each = cfg.warmup + cfg.duration + 0.8
    for i, (rnd, sc, srv) in enumerate(jobs):
        done = i
        elapsed = time.monotonic() - t_start
        per = elapsed / done if done else est_each
        left = per * (len(jobs) - done)
        progress(f"[{cfg.method} round {rnd}/{cfg.rounds}] {sc.name:<10} {srv:<20} "
                 f"run {i + 1}/{len(jobs)}, ~{_fmt_time(left)} left")
        m = measure(cfg, srv, sc, rnd)
        for _ in range(cfg.retries):
            if not (m.ok and cfg.max_interference > 0
                    and m.interference_pct > cfg.max_interference):
                break
            progress(f"    other work used {m.interference_pct:.0f}% of a CPU during the "
                     "load; measuring again")
            m.discarded = True
            results.append(m)
            m = measure(cfg, srv, sc, rnd)
        if not m.ok:
            progress(f"    {srv} on {sc.name}: {m.note}")
        elif m.errors:
            progress(f"    {srv} on {sc.name}: {m.errors} load errors {m.error_detail}")
        results.append(m)
    progress(f"done in {_fmt_time(time.monotonic() - t_start)}")
    return results, skipped


def _fmt_time(s: float) -> str:
    s = max(0, int(round(s)))
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def summarize(results: List[Measurement]) -> List[Dict[str, Any]]:
    """Median of each metric over the ok rounds of every (scenario, server)."""
    groups: Dict[Tuple[str, str, str], List[Measurement]] = {}
    order: List[Tuple[str, str, str]] = []
    for m in results:
        if m.discarded:
            continue
        key = (m.method, m.scenario, m.server)
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(m)
    rows: List[Dict[str, Any]] = []
    for key in order:
        ms = groups[key]
        ok = [m for m in ms if m.ok]
        row: Dict[str, Any] = {"method": key[0], "scenario": key[1], "server": key[2],
                               "rounds": len(ok), "failed_rounds": len(ms) - len(ok)}
        if ok:
            for attr in ("msgs_per_s", "mb_per_s", "p50_us", "p99_us", "p999_us",
                         "cpu_s_per_100k", "peak_rss_kib", "kib_per_conn", "connect_s",
                         "cpu_us_per_msg", "runs_per_msg", "loadgen_util",
                         "loadgen_syscalls_per_msg", "loadgen_events_per_wait"):
                row[attr] = statistics.median(getattr(m, attr) for m in ok)
            row["pinned"] = all(m.pinned for m in ok)
            row["errors"] = sum(m.errors for m in ok)
            row["interference_pct"] = statistics.median(m.interference_pct for m in ok)
            rates = [m.msgs_per_s for m in ok]
            row["msgs_per_s_min"], row["msgs_per_s_max"] = min(rates), max(rates)
        else:
            row["note"] = ms[-1].note
        rows.append(row)
    # Ratios within the same method and scenario: msgs/s to the best
    # non-iocp Python peer of the same group (streams servers against
    # streams servers, the others against Protocol and thread servers),
    # CPU per message to the C ceiling's, p99 to uvloop's (uvloop-streams
    # for streams servers, uvloop-protocol for the others).
    for method, sc in {(r["method"], r["scenario"]) for r in rows}:
        same = [r for r in rows if r["method"] == method and r["scenario"] == sc
                and "msgs_per_s" in r]
        peers = [r for r in same if r["server"] not in _servers.IOCP_SERVERS
                 and r["server"] != _servers.CEILING]
        ceiling = next((r for r in same if r["server"] == _servers.CEILING), None)
        for r in same:
            streams = r["server"] in _servers.STREAMS_SERVERS
            group = [p for p in peers if (p["server"] in _servers.STREAMS_SERVERS) == streams]
            best = max(group, key=lambda p: p["msgs_per_s"]) if group else None
            uv_name = "uvloop-streams" if streams else "uvloop-protocol"
            uv = next((p for p in same if p["server"] == uv_name), None)
            r["best_peer"] = best["server"] if best else None
            r["vs_best_peer"] = (r["msgs_per_s"] / best["msgs_per_s"]
                                 if best and best["msgs_per_s"] else None)
            r["cpu_vs_ceiling"] = (r["cpu_us_per_msg"] / ceiling["cpu_us_per_msg"]
                                   if ceiling and ceiling.get("cpu_us_per_msg") else None)
            r["p99_vs_uvloop"] = (r["p99_us"] / uv["p99_us"]
                                  if uv and uv.get("p99_us") else None)
    return rows


# ------------------------------------------------------------------ machine


def interference(results: list[Measurement]) -> dict[str, float]:
    """How busy the rest of the machine was while loads ran: CPU time of
    processes other than the server and the load generator, and hypervisor
    steal, as % of one CPU (median and max over runs)."""
    ok = [m for m in results if m.ok and m.wall_s > 0 and not m.discarded]
    if not ok:
        return {}
    other = [100 * m.other_cpu_s / m.wall_s for m in ok]
    steal = [100 * m.steal_s / m.wall_s for m in ok]
    return {"other_cpu_pct_median": statistics.median(other), "other_cpu_pct_max": max(other),
            "steal_pct_median": statistics.median(steal), "steal_pct_max": max(steal),
            "remeasured": sum(1 for m in results if m.discarded)}


def machine_info(backend: str | None) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "kernel": platform.release(),
        "cores": os.cpu_count(),
    }
    try:
        with open("/proc/loadavg") as f:
            info["loadavg_before"] = f.read().split()[:3]
    except OSError:
        pass
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        info["cpu"] = platform.processor()
    info["pinning"] = {}
    for method in METHODS:
        srv, load, threads = cpu_plan(0, method)
        info["pinning"][method] = {"server_cpus": sorted(srv) if srv else None,
                                   "loadgen_cpus": sorted(load) if load else None,
                                   "loadgen_threads": threads}
    try:
        import subprocess as _sp

        rev = _sp.run(["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse",
                       "--short", "HEAD"], capture_output=True, text=True, timeout=5)
        if rev.returncode == 0:
            info["git_commit"] = rev.stdout.strip()
    except (OSError, _sp.SubprocessError):
        pass
    try:
        import iocp

        info["iocp_version"] = getattr(iocp, "__version__", "?")
        with iocp.CompletionPort(backend=backend) as port:
            info["iocp_backend"] = port.backend
        if hasattr(iocp, "backends"):
            try:
                info["iocp_backends"] = repr(iocp.backends())
            except Exception:
                pass
    except Exception as exc:
        info["iocp_error"] = str(exc)
    peers: Dict[str, str] = {"asyncio": info["python"]}
    for mod in ("uvloop", "rloop", "matplotlib"):
        try:
            peers[mod] = __import__(mod).__version__
        except Exception:
            pass
    info["peers"] = peers
    return info


def to_json(cfgs: List[Config], results: List[Measurement], rows: List[Dict[str, Any]],
            skipped_servers: Dict[str, str], skipped_scenarios: Dict[str, str],
            machine: Dict[str, Any], command: str) -> Dict[str, Any]:
    return {
        "command": command,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "config": [{"method": cfg.method, "rounds": cfg.rounds, "warmup_s": cfg.warmup,
                    "duration_s": cfg.duration, "max_interference_pct": cfg.max_interference,
                    "retries": cfg.retries, "servers": cfg.servers, "backend": cfg.backend,
                    "loadgen_work_us": cfg.loadgen_work_us,
                    "scenarios": [asdict(s) for s in cfg.scenarios]} for cfg in cfgs],
        "skipped_servers": skipped_servers,
        "skipped_scenarios": skipped_scenarios,
        "interference": interference(results),
        "summary": rows,
        "measurements": [dict(asdict(m), interference_pct=m.interference_pct)
                         for m in results],
    }
