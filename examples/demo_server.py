"""The classic IOCP demo server: accepts clients on 127.0.0.1:9527, prints what they send.

    python examples/demo_server.py [--port 9527]

Pair it with ``python examples/demo_client.py``.  Messages are printed as
text; bytes that are not UTF-8 or not printable are shown escaped (the
data is never treated as a C string, so a NUL does not cut a message).
"""

from __future__ import annotations

import argparse
import logging
import sys

from iocp.server import Connection, Protocol, Server


def show(data: bytes) -> str:
    """Printable text for received bytes, escaping anything else."""
    text = data.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Printer(Protocol):
    """Prints each line received; one instance per connection."""

    def __init__(self) -> None:
        self.partial = b""
        self.who = "?"

    def connection_made(self, conn: Connection) -> None:
        """Log the new client."""
        host, port = conn.peername[:2]  # type: ignore[index]
        self.who = f"{host}:{port}"
        print(f"client {self.who} connected", flush=True)

    def data_received(self, conn: Connection, data: bytes) -> None:
        """Print every complete line."""
        *lines, self.partial = (self.partial + data).split(b"\n")
        for line in lines:
            print(f"{self.who}: {show(line)}", flush=True)

    def connection_lost(self, conn: Connection, exc: BaseException | None) -> None:
        """Print what is left and say goodbye."""
        if self.partial:
            print(f"{self.who}: {show(self.partial)}", flush=True)
        print(f"client {self.who} disconnected", flush=True)


def main() -> int:
    """Parse the command line and serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9527)
    args = parser.parse_args()
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: must be 0..65535")
    # Escape what the console code page cannot show (cp1252 on Windows).
    sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    server = Server(Printer, args.host, args.port)
    try:
        server.start()
    except OSError as exc:  # the port is taken, or the address is not this machine's
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    port = server.address[1]  # type: ignore[index]
    print(f"listening on {args.host}:{port} (backend {server.backend})", flush=True)
    # `ready` runs once SIGINT/SIGTERM stop the server gracefully.
    return server.serve_forever(
        ready=lambda: print("serving until Ctrl-C or SIGTERM", flush=True)
    )


if __name__ == "__main__":
    raise SystemExit(main())
