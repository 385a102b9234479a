"""Native closed-loop echo load, printed as JSON.

    python -m iocp.bench.loadgen --port N [--connections 100] [--size 64] ...

Every echoed byte is verified; errors are counted, not hidden.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List

from iocp._argtypes import MAX_SECONDS, float_option, int_option


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m iocp.bench.loadgen",
                                description="Closed-loop echo load generator (JSON on stdout).")
    p.add_argument("--host", default="127.0.0.1")
    # The native run_load() takes C ints: every bound here is within them.
    p.add_argument("--port", type=int_option(1, 65535, "port"), required=True)
    p.add_argument("--connections", type=int_option(1, 1_000_000, "connection count"),
                   default=100)
    p.add_argument("--size", type=int_option(1, 1 << 30, "size"), default=64,
                   help="message size in bytes")
    p.add_argument("--inflight", type=int_option(1, 65536), default=1,
                   help="messages in flight per connection")
    p.add_argument("--warmup", type=float_option(), default=1.0,
                   help="seconds before measuring")
    p.add_argument("--duration", type=float_option(lo_open=True), default=5.0,
                   help="measured seconds")
    p.add_argument("--active", type=int_option(-1, 1_000_000), default=-1,
                   help="busy connections (others echo once, then idle); -1 = all")
    p.add_argument("--threads", type=int_option(1, 256, "thread count"), default=1)
    p.add_argument("--connect-timeout", type=float_option(lo_open=True), default=10.0)
    p.add_argument("--drain-timeout", type=float_option(0.0, MAX_SECONDS), default=2.0)
    p.add_argument("--seed", type=int_option(0, (1 << 64) - 1, "seed"), default=0)
    p.add_argument("--server-pid", type=int_option(0, (1 << 31) - 1, "pid"), default=0,
                   help="sample this process's CPU time over exactly the measured window")
    p.add_argument("--work-us", type=float_option(0.0, 1e6), default=0.0,
                   help="busy microseconds per echoed message (emulates a heavier client)")
    a = p.parse_args(argv)
    try:
        from iocp import _benchtools  # type: ignore[attr-defined]
    except ImportError as exc:
        print(f"iocp._benchtools is not available: {exc}", file=sys.stderr)
        return 2
    from iocp.bench.servers import raise_nofile_limit

    raise_nofile_limit()
    try:
        result = _benchtools.run_load(
            a.host, a.port, a.connections, a.size, a.inflight, a.warmup, a.duration,
            threads=a.threads, active=a.active, connect_timeout=a.connect_timeout,
            drain_timeout=a.drain_timeout, seed=a.seed, server_pid=a.server_pid,
            work_us=a.work_us)
    except KeyboardInterrupt:
        return 130
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
