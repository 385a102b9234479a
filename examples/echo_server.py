"""Echo server: every byte a client sends comes back to it.

    python examples/echo_server.py [--host 127.0.0.1] [--port 9527] [--threads 1]

Try it with ``python -m iocp client`` or ``nc 127.0.0.1 9527``.  Ctrl-C (or
SIGTERM) shuts it down gracefully.
"""

from __future__ import annotations

import argparse
import logging
import sys

from iocp.server import Connection, Protocol, Server


class Echo(Protocol):
    """Sends back what it receives; one instance per connection."""

    def data_received(self, conn: Connection, data: bytes) -> None:
        conn.send(data)


def main() -> int:
    """Parse the command line and serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9527)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: must be 0..65535")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = Server(Echo, args.host, args.port)
    try:
        server.start(threads=args.threads)  # listen now: a busy port is reported here
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    # `ready` runs once SIGINT/SIGTERM stop the server gracefully.
    return server.serve_forever(ready=lambda: logging.info("serving until Ctrl-C or SIGTERM"))


if __name__ == "__main__":
    raise SystemExit(main())
