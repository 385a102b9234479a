"""Native closed-loop echo load, printed as JSON.

    python -m iocp.bench.loadgen --port N [--connections 100] [--size 64] ...

Every echoed byte is verified; errors are counted, not hidden.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m iocp.bench.loadgen",
                                description="Closed-loop echo load generator (JSON on stdout).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--size", type=int, default=64, help="message size in bytes")
    p.add_argument("--inflight", type=int, default=1, help="messages in flight per connection")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    p.add_argument("--active", type=int, default=-1,
                   help="busy connections (others echo once, then idle); -1 = all")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--drain-timeout", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
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
            drain_timeout=a.drain_timeout, seed=a.seed)
    except KeyboardInterrupt:
        return 130
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
