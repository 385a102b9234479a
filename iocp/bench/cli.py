"""`iocp bench`: argument parsing and the top-level run.

    iocp bench --quick                      # ~30 s, the README default
    iocp bench --full --json r.json --plot r.png   # both methods
    iocp bench --kit                        # the private echo kit's way, short
    iocp bench --servers iocp-port,uvloop-protocol --scenarios 100x64B
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import List

from iocp._argtypes import float_option, int_option

DESCRIPTION = """\
Echo-server benchmark: iocp side by side with asyncio, uvloop, rloop, threads
and a plain C epoll server, on loopback.  Each server runs in its own
process; a native load generator verifies every echoed byte and measures
msgs/s, MB/s, latency, server CPU per message and peak memory.

Two methods: "suite" (server on the last CPU, load generator on the others
with up to 4 threads, CPU over the whole load) and "kit" (the private echo
kit's way: one load-generator thread, server on CPU 0 and load on CPU 1,
server CPU over exactly the measured window, the kit's three scenarios).

  iocp bench --quick                   about 30 s, suite method, two scenarios (default)
  iocp bench --kit                     about 1 min, kit method, short windows, 1 round
  iocp bench --full --json r.json      both methods: every scenario x 3 rounds (suite),
                                       then 3 scenarios x 5 rounds, 1 s + 3 s (kit)
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


def configure_parser(parser: argparse.ArgumentParser) -> None:
    from iocp.bench.runner import SCENARIOS
    from iocp.bench.servers import SERVERS

    parser.description = parser.description or DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("servers: " + ", ".join(SERVERS) + "\nscenarios: " +
                     ", ".join(f"{k} ({v.description})" for k, v in SCENARIOS.items()))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="about 30 s: 2 scenarios, short windows, 1 round (default)")
    mode.add_argument("--full", action="store_true",
                      help="every scenario, 3 interleaved rounds (several minutes)")
    parser.add_argument("--method", choices=["suite", "kit", "both"],
                        help="how to measure (default: suite; both with --full)")
    parser.add_argument("--kit", dest="method", action="store_const", const="kit",
                        help="the same as --method kit")
    parser.add_argument("--servers", metavar="A,B",
                        help="comma-separated servers to run (default: all available)")
    parser.add_argument("--scenarios", metavar="A,B",
                        help="comma-separated scenarios (default: by mode)")
    parser.add_argument("--rounds", type=int_option(1, 1000, "round count"),
                        help="override the number of rounds (1..1000)")
    parser.add_argument("--duration", type=float_option(0.0, 3600.0, lo_open=True),
                        help="measured seconds per run (> 0, at most 3600)")
    parser.add_argument("--warmup", type=float_option(0.0, 3600.0),
                        help="warm-up seconds per run (0..3600)")
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


def run(args: argparse.Namespace) -> int:
    from iocp.bench import report, runner, servers

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    ok, skipped = servers.available(args.backend)
    if getattr(args, "list", False):
        for name, (_, _, desc) in servers.SERVERS.items():
            state = "" if name in ok else f"  [skipped: {skipped[name]}]"
            print(f"{name:<18} {desc}{state}")
        print()
        for sc in runner.SCENARIOS.values():
            kit = "  [kit]" if sc.name in runner.KIT_SCENARIOS else ""
            print(f"{sc.name:<10} {sc.description}{kit}")
        return 0

    if "c-epoll" in skipped and not sys.platform.startswith("linux"):
        print("iocp bench needs Linux for now (the load generator is epoll-based)",
              file=sys.stderr)
        return 2
    try:
        from iocp import _benchtools  # noqa: F401
    except ImportError as exc:
        print(f"iocp bench: the native load generator iocp._benchtools is missing ({exc}); "
              "rebuild the package on Linux", file=sys.stderr)
        return 2

    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("iocp bench: --plot needs matplotlib: pip install matplotlib "
                  "(or pip install 'pyiocp[bench]')", file=sys.stderr)
            return 2
    if args.servers:
        wanted = _split(args.servers)
        unknown = [s for s in wanted if s not in servers.SERVERS]
        if unknown:
            print(f"unknown server(s): {', '.join(unknown)}; choose from "
                  f"{', '.join(servers.SERVERS)}", file=sys.stderr)
            return 2
        chosen = [s for s in wanted if s in ok]
        skipped = {s: r for s, r in skipped.items() if s in wanted}
    else:
        # The "before" servers only serve before/after figures: --full (or
        # --servers) runs them, the short runs leave them out.
        chosen = ok if args.full else [s for s in ok if s not in servers.FULL_ONLY]
    names = None
    if args.scenarios:
        names = _split(args.scenarios)
        unknown = [s for s in names if s not in runner.SCENARIOS]
        if unknown:
            print(f"unknown scenario(s): {', '.join(unknown)}; choose from "
                  f"{', '.join(runner.SCENARIOS)}", file=sys.stderr)
            return 2
    method = args.method or ("both" if args.full else "suite")
    methods = ["suite", "kit"] if method == "both" else [method]
    level = "full" if args.full else "quick"
    cfgs: List[runner.Config] = []
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
    for name, reason in skipped.items():
        progress(f"skipping {name}: {reason}")
    if not chosen:
        print("no server to run", file=sys.stderr)
        return 2
    machine = runner.machine_info(args.backend)
    results: List[runner.Measurement] = []
    skipped_sc: dict = {}
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
    rows = runner.summarize(results)
    try:
        with open("/proc/loadavg") as f:
            machine["loadavg_after"] = f.read().split()[:3]
    except OSError:
        pass

    commit = f" (commit {machine['git_commit']})" if machine.get("git_commit") else ""
    print(f"iocp bench ({level}, method {method}): {machine.get('cpu', '?')}, "
          f"{machine.get('cores')} cores, Linux {machine.get('kernel')}, Python "
          f"{machine.get('python')}, iocp {machine.get('iocp_version', '?')}{commit} "
          f"backend {machine.get('iocp_backend', '?')}, load average "
          f"{' '.join(machine.get('loadavg_before', ['?']))} before, "
          f"{' '.join(machine.get('loadavg_after', ['?']))} after")
    for cfg in cfgs:
        print(f"  {cfg.method}: {report.method_line(cfg, machine)}")
    print()
    print(report.table(rows, markdown=args.markdown))
    tgt = report.targets(rows)
    if tgt:
        print(tgt)
    for name, reason in skipped.items():
        print(f"skipped server {name}: {reason}")
    busy = runner.interference(results)
    if busy:
        print(f"other activity during the loads: {busy['other_cpu_pct_median']:.0f}% of a CPU "
              f"median, {busy['other_cpu_pct_max']:.0f}% max; hypervisor steal "
              f"{busy['steal_pct_median']:.0f}% median; {busy['remeasured']} disturbed run(s) "
              "measured again")

    argv = sys.argv[1:]
    if "bench" in argv:
        argv = argv[argv.index("bench") + 1:]
    command = " ".join(["iocp", "bench"] + [shlex.quote(a) for a in argv])
    if args.json:
        data = runner.to_json(cfgs, results, rows, skipped, skipped_sc, machine, command)
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
        progress(f"wrote {args.json}")
    if args.plot:
        try:
            report.plot(rows, args.plot)
        except RuntimeError as exc:
            print(f"iocp bench: {exc}", file=sys.stderr)
            return 2
        progress(f"wrote {args.plot}")
    failed = [r for r in rows if "msgs_per_s" not in r or r.get("errors")]
    return 1 if failed else 0
