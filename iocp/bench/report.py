"""Text table and bar chart of a benchmark summary."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

from iocp.bench.httpservers import IOCP_LOOP, REFERENCE_LOOP
from iocp.bench.runner import SCENARIOS
from iocp.bench.servers import CEILING, IOCP_SERVERS

RATIO_NOTE = ("vs peer = msgs/s / the best peer in the same scenario and method: of "
              "asyncio-protocol, uvloop-protocol, rloop-protocol and threads; for the "
              "streams servers, of asyncio-streams, uvloop-streams and rloop-streams")
KIT_NOTE = ("kit method: CPU us/msg = server CPU microseconds per message over exactly "
            "the measured window; runs/msg = times the server's threads were scheduled "
            "in per message (~ wake-ups); CPU vs C = CPU us/msg / c-epoll's; "
            "p99 vs uv = p99 / uvloop-protocol's (uvloop-streams' for streams servers)")

# Issue 10's targets for the port loop, checked in every run that has the rows.
TARGET_SERVER = "iocp-port"
TARGET_RATIO, TARGET_CPU, TARGET_P99 = 1.15, 1.25, 1.0


@dataclass(frozen=True)
class Target:
    """One of issue 11's echo targets: `server` at least `ratio` x the best
    of `peers` in msgs/s (and, if `cpu`, server CPU per message at most
    `cpu` x that peer's), p99 at most `p99_peer`'s, in `scenarios` (None:
    every scenario but 10k-idle, whose target is memory per connection)."""

    server: str
    peers: Tuple[str, ...]
    ratio: float
    cpu: float | None
    p99_peer: str
    scenarios: Tuple[str, ...] | None = None


ISSUE11_TARGETS = (
    Target("iocp-server", ("uvloop-protocol", "rloop-protocol", "asyncio-protocol"), 1.15,
           0.85, "uvloop-protocol", ("100x64B", "1000x64B", "10x64Bx16")),
    Target("iocp-aio", ("uvloop-protocol", "rloop-protocol"), 1.10, None, "uvloop-protocol"),
    Target("iocp-aio-streams", ("uvloop-streams", "rloop-streams"), 1.10, None,
           "uvloop-streams"),
)
IDLE_SCENARIO, IDLE_SERVERS, IDLE_PEER = "10k-idle", ("iocp-server", "iocp-aio"), "uvloop-protocol"
# Issue 11's HTTP target: iocp.aio's requests/s at least uvloop's, per app.
HTTP_TARGET = 1.0


def method_line(cfg: Any, machine: Dict[str, Any]) -> str:
    """One line saying how a method measured."""
    pin = machine.get("pinning", {}).get(cfg.method, {})
    where = (f"server pinned to CPU {pin.get('server_cpus')}, load generator to "
             f"{pin.get('loadgen_cpus')}" if pin.get("server_cpus") else
             "not pinned (fewer than 2 usable CPUs)")
    threads = cfg.loadgen_threads or pin.get("loadgen_threads", 1)
    cpu = ("server CPU over the measured window only" if cfg.method == "kit" else
           "server CPU over the whole load (setup, warm-up and drain included)")
    return (f"{where}, {threads} load-generator thread(s), a fresh server per run, "
            f"{cfg.warmup:g} s warm-up + {cfg.duration:g} s measured, {cfg.rounds} "
            f"interleaved round(s), medians; {cpu}")


def _num(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def _rss(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def table(rows: List[Dict[str, Any]], markdown: bool = False) -> str:
    """One block per scenario, one row per server."""
    out: List[str] = []
    blocks: List[tuple] = []
    for r in rows:
        key = (r.get("method", "suite"), r["scenario"])
        if key not in blocks:
            blocks.append(key)
    methods = {m for m, _ in blocks}
    for method, sc in blocks:
        spec = SCENARIOS.get(sc)
        idle = spec is not None and spec.active >= 0
        mine = [r for r in rows if r.get("method", "suite") == method and r["scenario"] == sc]
        spread = any(r.get("rounds", 0) > 1 for r in mine)
        kit = method == "kit"
        if kit:
            head = ["server", "msgs/s"] + (["spread"] if spread else []) + [
                "p50 us", "p99 us", "CPU us/msg", "runs/msg", "vs peer", "CPU vs C",
                "p99 vs uv", "errors"]
        else:
            head = ["server", "msgs/s"] + (["spread"] if spread else []) + [
                "MB/s", "p50 us", "p99 us", "CPU s/100k", "peak RSS"]
            if idle:
                head.append("KiB/conn")
            head += ["vs peer", "errors"]
        body: List[List[str]] = []
        for r in mine:
            name = r["server"] + (" (ceiling)" if r["server"] == CEILING else "")
            if "msgs_per_s" not in r:
                body.append([name, "failed: " + r.get("note", "?")] + [""] * (len(head) - 2))
                continue
            ratio = r.get("vs_best_peer")
            line = [name, _num(r["msgs_per_s"])]
            if spread:
                half = (r["msgs_per_s_max"] - r["msgs_per_s_min"]) / 2
                line.append(f"±{100 * half / r['msgs_per_s']:.0f}%" if r["msgs_per_s"] else "-")
            if kit:
                line += [_num(r["p50_us"]), _num(r["p99_us"]), f"{r['cpu_us_per_msg']:.2f}",
                         f"{r['runs_per_msg']:.2f}", _ratio(ratio),
                         _ratio(r.get("cpu_vs_ceiling")), _ratio(r.get("p99_vs_uvloop")),
                         str(r.get("errors", 0))]
                body.append(line)
                continue
            line += [_num(r["mb_per_s"]), _num(r["p50_us"]),
                    _num(r["p99_us"]), f"{r['cpu_s_per_100k']:.2f}", _rss(r["peak_rss_kib"])]
            if idle:
                line.append(f"{r['kib_per_conn']:.1f}")
            line += [_ratio(ratio), str(r.get("errors", 0))]
            body.append(line)
        title = f"{sc}: {spec.description}" if spec else sc
        if len(methods) > 1 or kit:
            title += f"  [{method} method]"
        if markdown:
            out.append(f"### {title}\n")
            out.append("| " + " | ".join(head) + " |")
            out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
            for line in body:
                out.append("| " + " | ".join(line) + " |")
            out.append("")
        else:
            widths = [max(len(head[i]), *(len(b[i]) for b in body)) for i in range(len(head))]
            out.append(title)
            out.append("  " + "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i])
                                        for i, h in enumerate(head)))
            for line in body:
                if line[1].startswith("failed"):
                    out.append("  " + line[0].ljust(widths[0]) + "  " + line[1])
                    continue
                out.append("  " + "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                                            for i, c in enumerate(line)))
            out.append("")
    out.append(RATIO_NOTE + "; spread = half the min-max range of msgs/s over rounds"
               "; CPU s/100k = server CPU seconds per 100,000 echoed messages"
               " (warm-up included); latencies are per-message round trips.")
    if "kit" in methods:
        out.append(KIT_NOTE + ".")
    return "\n".join(out)


def _ratio(v: Any) -> str:
    return f"{v:.2f}" if v else "-"


def targets(rows: List[Dict[str, Any]]) -> str:
    """The targets blocks of issues 10 and 11 that the echo rows can
    check; "" if none apply."""
    return "".join(b for b in (_issue10(rows), _issue11(rows)) if b)


def _ok(good: bool) -> str:
    return "ok" if good else "MISSED"


def _issue11(rows: List[Dict[str, Any]]) -> str:
    """Issue 11's echo targets (ISSUE11_TARGETS, and RSS per connection in
    10k-idle at most uvloop's), per method and scenario with the rows."""
    out: List[str] = []
    keys: List[tuple] = []
    for r in rows:
        if (r.get("method", "suite"), r["scenario"]) not in keys:
            keys.append((r.get("method", "suite"), r["scenario"]))
    for method, sc in keys:
        same = {r["server"]: r for r in rows if r.get("method", "suite") == method
                and r["scenario"] == sc and "msgs_per_s" in r}
        for t in ISSUE11_TARGETS:
            mine = same.get(t.server)
            if mine is None or sc == IDLE_SCENARIO or (t.scenarios and sc not in t.scenarios):
                continue
            peers = [same[p] for p in t.peers if p in same and same[p]["msgs_per_s"]]
            checks = []
            if peers:
                best = max(peers, key=lambda p: p["msgs_per_s"])
                ratio = mine["msgs_per_s"] / best["msgs_per_s"]
                checks.append(f"{ratio:.2f}x {best['server']} {_ok(ratio >= t.ratio)} "
                              f"(>= {t.ratio})")
                if t.cpu and best.get("cpu_us_per_msg") and mine.get("cpu_us_per_msg"):
                    cpu = mine["cpu_us_per_msg"] / best["cpu_us_per_msg"]
                    checks.append(f"CPU/msg {cpu:.2f}x {best['server']} {_ok(cpu <= t.cpu)} "
                                  f"(<= {t.cpu})")
            uv = same.get(t.p99_peer)
            if uv and uv.get("p99_us") and mine.get("p99_us"):
                p99 = mine["p99_us"] / uv["p99_us"]
                checks.append(f"p99 {p99:.2f}x {t.p99_peer} {_ok(p99 <= TARGET_P99)}")
            if checks:
                out.append(f"  {method:<5} {sc:<10} {t.server:<17} " + "; ".join(checks))
        uv = same.get(IDLE_PEER)
        if sc == IDLE_SCENARIO and uv and uv.get("kib_per_conn"):
            for name in IDLE_SERVERS:
                mine = same.get(name)
                if mine and mine.get("kib_per_conn") is not None:
                    ratio = mine["kib_per_conn"] / uv["kib_per_conn"]
                    out.append(f"  {method:<5} {sc:<10} {name:<17} KiB/conn "
                               f"{mine['kib_per_conn']:.1f} = {ratio:.2f}x {IDLE_PEER} "
                               f"{_ok(ratio <= 1.0)} (<= 1.00)")
    if not out:
        return ""
    return "\ntargets (issue 11), echo:\n" + "\n".join(out)


def _issue10(rows: List[Dict[str, Any]]) -> str:
    """Issue 10's targets for iocp-port, per method and scenario that has
    the rows to check them: >= 1.15x the best peer's msgs/s, CPU per
    message <= 1.25x the C ceiling's, p99 <= uvloop's.  "" if none apply."""
    out: List[str] = []
    for r in rows:
        if r["server"] != TARGET_SERVER or "msgs_per_s" not in r:
            continue
        checks = []
        ratio = r.get("vs_best_peer")
        if ratio:
            checks.append(f"{ratio:.2f}x {r.get('best_peer')} "
                          f"{'ok' if ratio >= TARGET_RATIO else 'MISSED'} (>= {TARGET_RATIO})")
        cpu = r.get("cpu_vs_ceiling")
        if cpu:
            checks.append(f"CPU/msg {cpu:.2f}x C {'ok' if cpu <= TARGET_CPU else 'MISSED'} "
                          f"(<= {TARGET_CPU})")
        p99 = r.get("p99_vs_uvloop")
        if p99:
            checks.append(f"p99 {p99:.2f}x uvloop {'ok' if p99 <= TARGET_P99 else 'MISSED'}")
        if checks:
            out.append(f"  {r.get('method', 'suite'):<5} {r['scenario']:<10} " +
                       "; ".join(checks))
    if not out:
        return ""
    return "\ntargets (issue 10) for " + TARGET_SERVER + ":\n" + "\n".join(out)


HTTP_NOTE = ("vs uv = requests/s / the same app's on uvloop; p99 vs uv = p99 / its; "
             "CPU us/req = server CPU microseconds per completed request over the measured "
             "wrk run; errors = wrk's socket errors + non-2xx/3xx responses; spread = half "
             "the min-max range of requests/s over rounds")


def http_line(cfg: Any, machine: Dict[str, Any], extra: str = "") -> str:
    """One line saying how the HTTP scenario measured."""
    pin = machine.get("pinning", {}).get("kit", {})
    where = (f"server pinned to CPU {pin.get('server_cpus')}, wrk to "
             f"{pin.get('loadgen_cpus')}" if pin.get("server_cpus") else
             "not pinned (fewer than 2 usable CPUs)")
    warm = f"{cfg.warmup} s wrk warm-up + " if cfg.warmup else "no warm-up, "
    return (f"{cfg.command()}; {where}; a fresh server per run, {warm}{cfg.duration} s "
            f"measured, {cfg.rounds} interleaved round(s), medians{extra}")


def http_table(rows: List[Dict[str, Any]], markdown: bool = False) -> str:
    """One block per app, one row per event loop."""
    out: List[str] = []
    apps: List[str] = []
    for r in rows:
        if r["app"] not in apps:
            apps.append(r["app"])
    for app in apps:
        mine = [r for r in rows if r["app"] == app]
        spread = any(r.get("rounds", 0) > 1 for r in mine)
        head = ["server", "req/s"] + (["spread"] if spread else []) + [
            "p50 ms", "p99 ms", "CPU us/req", "peak RSS", "vs uv", "p99 vs uv", "errors"]
        body: List[List[str]] = []
        for r in mine:
            if "requests_per_s" not in r:
                body.append([r["server"], "failed: " + r.get("note", "?")]
                            + [""] * (len(head) - 2))
                continue
            line = [r["server"], _num(r["requests_per_s"])]
            if spread:
                half = (r["requests_per_s_max"] - r["requests_per_s_min"]) / 2
                line.append(f"±{100 * half / r['requests_per_s']:.0f}%"
                            if r["requests_per_s"] else "-")
            line += [f"{r['p50_us'] / 1e3:.2f}", f"{r['p99_us'] / 1e3:.2f}",
                     _num(r["cpu_us_per_req"]), _rss(r["peak_rss_kib"]),
                     _ratio(r.get("vs_uvloop")), _ratio(r.get("p99_vs_uvloop")),
                     str(r.get("errors", 0))]
            body.append(line)
        title = f"http-{app}: HTTP hello-world, GET / -> \"Hello, World!\", {app}"
        _block(out, title, head, body, markdown)
    out.append(HTTP_NOTE + ".")
    return "\n".join(out)


def _block(out: List[str], title: str, head: List[str], body: List[List[str]],
           markdown: bool) -> None:
    if markdown:
        out.append(f"### {title}\n")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
        out += ["| " + " | ".join(line) + " |" for line in body]
        out.append("")
        return
    measured = [b for b in body if not b[1].startswith("failed")]
    widths = [max([len(head[i])] + [len(b[i]) for b in (body if i == 0 else measured)])
              for i in range(len(head))]
    out.append(title)
    out.append("  " + "  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(widths[i])
                                for i, h in enumerate(head)))
    for line in body:
        if line[1].startswith("failed"):
            out.append("  " + line[0].ljust(widths[0]) + "  " + line[1])
            continue
        out.append("  " + "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i])
                                    for i, c in enumerate(line)))
    out.append("")


def http_targets(rows: List[Dict[str, Any]]) -> str:
    """Issue 11's HTTP target, per app with both rows: iocp.aio's
    requests/s >= uvloop's (and p99 <= uvloop's).  "" if none apply."""
    out: List[str] = []
    for r in rows:
        if r["loop"] != IOCP_LOOP or not r.get("vs_uvloop"):
            continue
        ratio = r["vs_uvloop"]
        ref = f"{r['app']}-{REFERENCE_LOOP}"
        line = (f"  {r['server']:<17} {ratio:.2f}x {ref} "
                f"{_ok(ratio >= HTTP_TARGET)} (>= {HTTP_TARGET:.2f})")
        p99 = r.get("p99_vs_uvloop")
        if p99:
            line += f"; p99 {p99:.2f}x {ref} {_ok(p99 <= TARGET_P99)}"
        out.append(line)
    if not out:
        return ""
    return "\ntargets (issue 11), HTTP:\n" + "\n".join(out)


def plot(rows: List[Dict[str, Any]], path: str, title: str | None = None) -> None:
    """Throughput and p99 bars per scenario.  Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError(
            "--plot needs matplotlib: pip install matplotlib  (or the extra: "
            "pip install 'pyiocp[bench]')") from exc
    scenarios: List[tuple] = []
    for r in rows:
        key = (r.get("method", "suite"), r["scenario"])
        if key not in scenarios and "msgs_per_s" in r:
            scenarios.append(key)
    methods = {m for m, _ in scenarios}
    if not scenarios:
        raise RuntimeError("nothing to plot: no successful measurement")
    fig, axes = plt.subplots(len(scenarios), 3, figsize=(16, 2.2 + 1.9 * len(scenarios)),
                             squeeze=False)

    def color(name: str) -> str:
        if name in IOCP_SERVERS:
            return "#1f77b4"
        if name == CEILING:
            return "#7f7f7f"
        return "#ff7f0e"

    for i, (method, sc) in enumerate(scenarios):
        rs = [r for r in rows if r["scenario"] == sc and r.get("method", "suite") == method
              and "msgs_per_s" in r]
        names = [r["server"] for r in rs]
        ys = list(range(len(rs)))
        cpu = (("cpu_us_per_msg", "server CPU us per message, measured window (lower is better)")
               if method == "kit" else
               ("cpu_s_per_100k", "server CPU s per 100k messages (lower is better)"))
        for j, (key, label) in enumerate((
                ("msgs_per_s", "messages/s (higher is better)"),
                ("p99_us", "p99 latency, us (lower is better)"), cpu)):
            ax = axes[i][j]
            vals = [r[key] for r in rs]
            ax.barh(ys, vals, color=[color(n) for n in names])
            ax.set_yticks(ys)
            ax.set_yticklabels(names, fontsize=8)
            ax.invert_yaxis()
            ax.tick_params(axis="x", labelsize=8)
            top = max(vals) if vals else 1
            for y, v in zip(ys, vals):
                ax.text(v + top * 0.01, y, f"{v:,.0f}" if v >= 100 else f"{v:.2f}",
                        va="center", fontsize=7)
            ax.ticklabel_format(axis="x", style="plain", useOffset=False)
            ax.set_xlim(0, top * 1.18)
            spec = SCENARIOS.get(sc)
            tag = f" [{method}]" if len(methods) > 1 or method == "kit" else ""
            ax.set_title(f"{sc} ({spec.description}){tag}" if spec and j == 0 else
                         (label if i == 0 else ""), fontsize=9)
            if j == 0 and i == 0:
                ax.set_xlabel(label, fontsize=8)
            if j > 0:
                ax.set_xlabel(label if i == len(scenarios) - 1 else "", fontsize=8)
    fig.suptitle(title or "iocp bench: echo servers on loopback "
                 "(blue: iocp, orange: peers, grey: C ceiling)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
