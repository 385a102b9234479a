"""`iocp bench`: argument parsing and the top-level run.

    iocp bench --quick                      # ~30 s, the README default
    iocp bench --full --json r.json --plot r.png   # both methods
    iocp bench --kit                        # the private echo kit's way, short
    iocp bench --http                       # HTTP hello-world under wrk, alone
    iocp bench --servers iocp-port,uvloop-protocol --scenarios 100x64B
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import dataclass
from typing import Any, Dict, List

from iocp._argtypes import float_option, int_option

DESCRIPTION = """\
Echo-server benchmark: iocp side by side with asyncio, uvloop, rloop, threads
and a plain C epoll server, on loopback.  Each server runs in its own
process; a native load generator verifies every echoed byte and measures
msgs/s, MB/s, latency, server CPU per message and peak memory.  The HTTP
scenario runs aiohttp and uvicorn hello-world apps on iocp.aio, uvloop,
rloop and asyncio under wrk (requests/s, p99, server CPU per request).

Two methods: "suite" (server on the last CPU, load generator on the others
with up to 4 threads, CPU over the whole load) and "kit" (the private echo
kit's way: one load-generator thread, server on CPU 0 and load on CPU 1,
server CPU over exactly the measured window, the kit's three scenarios).

  iocp bench --quick                   about 30 s, suite method, two scenarios (default)
  iocp bench --kit                     about 1 min, kit method, short windows, 1 round
  iocp bench --full --json r.json      both methods: every scenario x 3 rounds (suite),
                                       then 3 scenarios x 5 rounds, 1 s + 3 s (kit),
                                       then the HTTP scenario (5 rounds, 1 s + 3 s)
  iocp bench --http                    about 40 s: HTTP hello-world on aiohttp and uvicorn,
                                       each on iocp.aio, uvloop, rloop and asyncio, under
                                       wrk -t1 -c100 --latency, 1 s + 2 s, 1 round
  iocp bench --servers iocp-port,uvloop-protocol --scenarios 100x64B"""

# (method, preset) -> rounds and windows.
PRESETS = {
    ("suite", "quick"): {"rounds": 1, "warmup": 0.3, "duration": 1.2},
    ("suite", "full"): {"rounds": 3, "warmup": 0.5, "duration": 2.0},
    ("kit", "quick"): {"rounds": 1, "warmup": 0.5, "duration": 1.5},
    ("kit", "full"): {"rounds": 5, "warmup": 1.0, "duration": 3.0},
}
QUICK = PRESETS[("suite", "quick")]
FULL = PRESETS[("suite", "full")]
# The HTTP scenario (wrk counts whole seconds).
HTTP_PRESETS = {
    "quick": {"rounds": 1, "warmup": 1, "duration": 2},
    "full": {"rounds": 5, "warmup": 1, "duration": 3},
}
HTTP_SCENARIO = "http"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from iocp.bench.httpservers import HTTP_SERVERS
    from iocp.bench.runner import SCENARIOS
    from iocp.bench.servers import SERVERS

    parser.description = parser.description or DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("servers: " + ", ".join(SERVERS) + "\nHTTP servers: " +
                     ", ".join(HTTP_SERVERS) + "\nscenarios: " +
                     ", ".join(f"{k} ({v.description})" for k, v in SCENARIOS.items()) +
                     f", {HTTP_SCENARIO} (HTTP hello-world under wrk)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="about 30 s: 2 scenarios, short windows, 1 round (default)")
    mode.add_argument("--full", action="store_true",
                      help="every scenario, 3 interleaved rounds (several minutes)")
    parser.add_argument("--http", action="store_true",
                        help="only the HTTP scenario: aiohttp and uvicorn hello-world apps on "
                             "iocp.aio, uvloop, rloop and asyncio under wrk (needs wrk, "
                             "aiohttp, uvicorn); with --full, 5 rounds of 1 s + 3 s")
    parser.add_argument("--method", choices=["suite", "kit", "both"],
                        help="how to measure (default: suite; both with --full)")
    parser.add_argument("--kit", dest="method", action="store_const", const="kit",
                        help="the same as --method kit")
    parser.add_argument("--servers", metavar="A,B",
                        help="comma-separated servers to run, echo or HTTP ones "
                             "(default: all available)")
    parser.add_argument("--scenarios", metavar="A,B",
                        help="comma-separated scenarios, 'http' among them (default: by mode)")
    parser.add_argument("--rounds", type=int_option(1, 1000, "round count"),
                        help="override the number of rounds (1..1000)")
    parser.add_argument("--duration", type=float_option(0.0, 3600.0, lo_open=True),
                        help="measured seconds per run (> 0, at most 3600; HTTP: rounded "
                             "up to whole seconds)")
    parser.add_argument("--warmup", type=float_option(0.0, 3600.0),
                        help="warm-up seconds per run (0..3600; HTTP: rounded up)")
    parser.add_argument("--backend", choices=["io_uring", "epoll", "iocp"],
                        help="iocp backend for the iocp servers (default: the best available)")
    parser.add_argument("--loadgen-threads", type=int_option(0, 256, "thread count"), default=0,
                        help="load generator threads (at most 256; default 0: automatic)")
    parser.add_argument("--loadgen-work-us", type=float_option(0.0, 1e6), default=0.0,
                        metavar="US",
                        help="busy microseconds per message in the load generator: emulates "
                             "a heavier client (default 0)")
    parser.add_argument("--max-interference", type=float_option(0.0, 100000.0, what="percentage"),
                        default=25.0, metavar="PCT",
                        help="measure a run again (up to twice) when other processes used "
                             "more than PCT%% of a CPU during it (default 25; 0: never)")
    parser.add_argument("--json", metavar="FILE", help="write every measurement as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="bar chart (needs matplotlib)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--list", action="store_true", help="list servers and scenarios")


def _split(value: str) -> List[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@dataclass
class Plan:
    """What a command line asks for."""

    echo: bool                      # run the echo scenarios
    http: bool                      # run the HTTP scenario
    echo_servers: List[str] | None  # named on --servers (None: by mode)
    http_servers: List[str] | None
    scenarios: List[str] | None     # echo scenarios named on --scenarios


def plan(args: argparse.Namespace) -> Plan | str:
    """Splits --servers and --scenarios into echo and HTTP parts; a str is
    the error to print."""
    from iocp.bench import httpservers, runner, servers

    echo_servers = http_servers = scenarios = None
    if args.servers:
        wanted = _split(args.servers)
        unknown = [s for s in wanted if s not in servers.SERVERS
                   and s not in httpservers.HTTP_SERVERS]
        if unknown:
            return (f"unknown server(s): {', '.join(unknown)}; choose from "
                    f"{', '.join(servers.SERVERS)} or {', '.join(httpservers.HTTP_SERVERS)}")
        echo_servers = [s for s in wanted if s in servers.SERVERS]
        http_servers = [s for s in wanted if s in httpservers.HTTP_SERVERS]
    http_named = False
    if args.scenarios:
        names = _split(args.scenarios)
        unknown = [s for s in names if s not in runner.SCENARIOS and s != HTTP_SCENARIO]
        if unknown:
            return (f"unknown scenario(s): {', '.join(unknown)}; choose from "
                    f"{', '.join(runner.SCENARIOS)}, {HTTP_SCENARIO}")
        http_named = HTTP_SCENARIO in names
        scenarios = [s for s in names if s != HTTP_SCENARIO]
    if args.http:
        if echo_servers:
            return (f"--http runs HTTP servers only; {', '.join(echo_servers)} "
                    "echo (drop --http to run them)")
        if scenarios:
            return (f"--http runs the HTTP scenario only; {', '.join(scenarios)} are echo "
                    "scenarios (drop --http, or use --scenarios ...,http)")
    if args.http:
        echo, http = False, True
    else:
        # A kind runs when the servers named (if any) include one of its
        # servers and the scenarios named (if any) include one of its
        # scenarios; with neither named, HTTP runs in --full only.
        echo = echo_servers is None or bool(echo_servers)
        echo = echo and (scenarios is None or bool(scenarios))
        http = http_servers is None or bool(http_servers)
        http = http and (http_named if scenarios is not None
                         else bool(args.full) or bool(http_servers))
    if not echo and not http:
        return "nothing to run: the servers named have no scenario named"
    return Plan(echo=echo, http=http, echo_servers=echo_servers, http_servers=http_servers,
                scenarios=scenarios)


def run(args: argparse.Namespace) -> int:
    from iocp.bench import http, httpservers, report, runner, servers

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if getattr(args, "list", False):
        ok, skipped = servers.available(args.backend)
        for name, (_, _, desc) in servers.SERVERS.items():
            state = "" if name in ok else f"  [skipped: {skipped[name]}]"
            print(f"{name:<18} {desc}{state}")
        print()
        hok, hskipped = http.available()
        for name in httpservers.HTTP_SERVERS:
            state = "" if name in hok else f"  [skipped: {hskipped[name]}]"
            print(f"{name:<18} HTTP: {httpservers.describe(name)}{state}")
        print()
        for sc in runner.SCENARIOS.values():
            kit = "  [kit]" if sc.name in runner.KIT_SCENARIOS else ""
            print(f"{sc.name:<10} {sc.description}{kit}")
        print(f"{HTTP_SCENARIO:<10} HTTP hello-world under wrk (--http; in --full)")
        return 0

    what = plan(args)
    if isinstance(what, str):
        print(what, file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("iocp bench: --plot needs matplotlib: pip install matplotlib "
                  "(or pip install 'pyiocp[bench]')", file=sys.stderr)
            return 2
    level = "full" if args.full else "quick"

    chosen: List[str] = []
    skipped: Dict[str, str] = {}
    cfgs: List[runner.Config] = []
    method = args.method or ("both" if args.full else "suite")
    if what.echo:
        err = _echo_prerequisites()
        if err:
            print(err, file=sys.stderr)
            return 2
        ok, skipped = servers.available(args.backend)
        if what.echo_servers is not None:
            chosen = [s for s in what.echo_servers if s in ok]
            skipped = {s: r for s, r in skipped.items() if s in what.echo_servers}
        else:
            # The "before" server and the streams peer group: --full (or
            # --servers) runs them, the short runs leave them out.
            chosen = ok if args.full else [s for s in ok if s not in servers.FULL_ONLY]
        cfgs = _echo_configs(args, chosen, what.scenarios, method, level)
        for name, reason in skipped.items():
            progress(f"skipping {name}: {reason}")

    hcfg: http.HttpConfig | None = None
    hskipped: Dict[str, str] = {}
    http_missing = ""
    if what.http:
        hok, hskipped = http.available()
        if what.http_servers is not None:
            hok = [s for s in what.http_servers if s in hok]
            hskipped = {s: r for s, r in hskipped.items() if s in what.http_servers}
        http_missing = http.missing() or ""
        if hok:
            preset = HTTP_PRESETS[level]
            hcfg = http.HttpConfig(
                servers=hok, rounds=args.rounds or preset["rounds"],
                warmup=(http.whole_seconds(args.warmup, 0) if args.warmup is not None
                        else preset["warmup"]),
                duration=(http.whole_seconds(args.duration, 1) if args.duration
                          else preset["duration"]),
                backend=args.backend, max_interference=args.max_interference)
        for name, reason in hskipped.items():
            if not http_missing:
                progress(f"skipping {name}: {reason}")
        if http_missing or not hok:
            progress(f"skipping the HTTP scenario: {http_missing or 'no HTTP server can run'}")
    if not chosen and hcfg is None:
        print("no server to run", file=sys.stderr)
        return 2

    machine = runner.machine_info(args.backend)
    results: List[runner.Measurement] = []
    skipped_sc: Dict[str, str] = {}
    if chosen:
        for cfg in cfgs:
            pin = machine["pinning"][cfg.method]
            where = (f"server on CPU {pin['server_cpus']}, load on {pin['loadgen_cpus']}"
                     if pin["server_cpus"] else
                     "NOT pinned (fewer than 2 usable CPUs: server and load share them)")
            progress(f"method {cfg.method}: {len(cfg.servers)} servers x {len(cfg.scenarios)} "
                     f"scenarios x {cfg.rounds} round(s), {cfg.warmup:g} s warm-up + "
                     f"{cfg.duration:g} s measured each; iocp backend "
                     f"{machine.get('iocp_backend', '?')}; {where}, "
                     f"{cfg.loadgen_threads or pin['loadgen_threads']} load thread(s)")
            res, sk = runner.run_all(cfg, progress)
            results += res
            skipped_sc.update(sk)
        for name, reason in skipped_sc.items():
            progress(f"skipped scenario {name}: {reason}")
    hresults: List[http.HttpMeasurement] = []
    if hcfg is not None:
        progress(f"http: {len(hcfg.servers)} servers x {hcfg.rounds} round(s), "
                 f"{hcfg.warmup} s warm-up + {hcfg.duration} s measured each: "
                 f"{hcfg.command()}")
        hresults = http.run_all(hcfg, progress)
    rows = runner.summarize(results)
    hrows = http.summarize(hresults)
    try:
        with open("/proc/loadavg") as f:
            machine["loadavg_after"] = f.read().split()[:3]
    except OSError:
        pass

    commit = f" (commit {machine['git_commit']})" if machine.get("git_commit") else ""
    kind = f"{level}, method {method}" if chosen else f"{level}, HTTP only"
    print(f"iocp bench ({kind}): {machine.get('cpu', '?')}, "
          f"{machine.get('cores')} cores, Linux {machine.get('kernel')}, Python "
          f"{machine.get('python')}, iocp {machine.get('iocp_version', '?')}{commit} "
          f"backend {machine.get('iocp_backend', '?')}, load average "
          f"{' '.join(machine.get('loadavg_before', ['?']))} before, "
          f"{' '.join(machine.get('loadavg_after', ['?']))} after")
    if chosen:
        for cfg in cfgs:
            print(f"  {cfg.method}: {report.method_line(cfg, machine)}")
    if hcfg is not None:
        print(f"  http: {report.http_line(hcfg, machine, _http_versions())}")
    print()
    if chosen:
        print(report.table(rows, markdown=args.markdown))
        tgt = report.targets(rows)
        if tgt:
            print(tgt)
        for name, reason in skipped.items():
            print(f"skipped server {name}: {reason}")
        busy = runner.interference(results)
        if busy:
            print(f"other activity during the loads: {busy['other_cpu_pct_median']:.0f}% of "
                  f"a CPU median, {busy['other_cpu_pct_max']:.0f}% max; hypervisor steal "
                  f"{busy['steal_pct_median']:.0f}% median; {busy['remeasured']} disturbed "
                  "run(s) measured again")
    if what.http:
        if chosen:
            print()
        if hcfg is not None:
            print(report.http_table(hrows, markdown=args.markdown))
            tgt = report.http_targets(hrows)
            if tgt:
                print(tgt)
        if http_missing or hcfg is None:
            print(f"skipped the HTTP scenario: {http_missing or 'no HTTP server can run'}")
        if not http_missing:
            for name, reason in hskipped.items():
                print(f"skipped HTTP server {name}: {reason}")

    argv = sys.argv[1:]
    if "bench" in argv:
        argv = argv[argv.index("bench") + 1:]
    command = " ".join(["iocp", "bench"] + [shlex.quote(a) for a in argv])
    if args.json:
        data = runner.to_json(cfgs if chosen else [], results, rows, skipped, skipped_sc,
                              machine, command)
        if what.http:
            data["http"] = (http.to_json(hcfg, hresults, hrows, hskipped) if hcfg else
                            {"skipped": http_missing or "no HTTP server can run",
                             "skipped_servers": hskipped})
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        progress(f"wrote {args.json}")
    if args.plot and chosen:
        try:
            report.plot(rows, args.plot)
        except RuntimeError as exc:
            print(f"iocp bench: {exc}", file=sys.stderr)
            return 2
        progress(f"wrote {args.plot}")
    elif args.plot:
        progress("--plot draws the echo scenarios only: no echo scenario ran, no plot written")
    failed = [r for r in rows if "msgs_per_s" not in r or r.get("errors")]
    failed += [r for r in hrows if "requests_per_s" not in r or r.get("errors")]
    return 1 if failed else 0


def _echo_prerequisites() -> str | None:
    """None when the echo scenarios can run here, else why not."""
    if not sys.platform.startswith("linux"):
        return "iocp bench needs Linux for now (the load generator is epoll-based)"
    try:
        from iocp import _benchtools  # noqa: F401
    except ImportError as exc:
        return (f"iocp bench: the native load generator iocp._benchtools is missing ({exc}); "
                "rebuild the package on Linux")
    return None


def _echo_configs(args: argparse.Namespace, chosen: List[str], names: List[str] | None,
                  method: str, level: str) -> List[Any]:
    from iocp.bench import runner

    methods = ["suite", "kit"] if method == "both" else [method]
    cfgs = []
    for meth in methods:
        preset = PRESETS[(meth, level)]
        if names is not None:
            sc_names = names
        elif meth == "kit":
            sc_names = runner.KIT_SCENARIOS
        else:
            sc_names = list(runner.SCENARIOS) if args.full else runner.QUICK_SCENARIOS
        cfgs.append(runner.Config(
            servers=chosen,
            scenarios=[runner.SCENARIOS[n] for n in sc_names],
            rounds=args.rounds or preset["rounds"],
            warmup=args.warmup if args.warmup is not None else preset["warmup"],
            duration=args.duration or preset["duration"],
            backend=args.backend,
            loadgen_threads=args.loadgen_threads,
            max_interference=args.max_interference,
            method=meth,
            loadgen_work_us=args.loadgen_work_us,
        ))
    return cfgs


def _http_versions() -> str:
    """"; aiohttp X, uvicorn Y (http: P), wrk Z" for the HTTP method line."""
    from iocp.bench import http

    parts = []
    for mod in ("aiohttp", "uvicorn"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except Exception:
            pass
    if any(p.startswith("uvicorn") for p in parts):
        parts[-1] += f" (HTTP parser {http.uvicorn_http()})"
    return "; " + ", ".join(parts + [http.wrk_version()])
