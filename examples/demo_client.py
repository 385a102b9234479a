"""The classic IOCP demo client: sends each line typed on stdin to the server.

    python examples/demo_client.py [--host 127.0.0.1] [--port 9527]

Replies (if the server echoes) are printed.  At end of input (Ctrl-D) the
client half-closes the connection, waits briefly for the server to finish,
and exits.
"""

from __future__ import annotations

import argparse
import sys
import threading

from iocp.server import Connection, Protocol, connect


class Replies(Protocol):
    """Prints what the server sends back."""

    def __init__(self) -> None:
        self.done = threading.Event()

    def data_received(self, conn: Connection, data: bytes) -> None:
        """Print the reply bytes as text."""
        sys.stdout.write(data.decode("utf-8", "backslashreplace"))
        sys.stdout.flush()

    def connection_lost(self, conn: Connection, exc: BaseException | None) -> None:
        """The server closed: let main() finish."""
        self.done.set()


def main() -> int:
    """Connect, pump stdin to the server, wait for the close."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9527)
    args = parser.parse_args()
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: must be 0..65535")
    # Escape what the console code page cannot show (cp1252 on Windows).
    sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    replies = Replies()
    try:
        client = connect(lambda: replies, args.host, args.port, timeout=5.0)
    except OSError as exc:
        print(f"cannot connect to {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    with client:
        conn = client.connection
        assert conn is not None
        for line in sys.stdin.buffer:
            if replies.done.is_set():
                print("server closed the connection", file=sys.stderr)
                return 1
            conn.send(line)
        conn.write_eof()  # the server sees EOF, answers what is left, closes
        replies.done.wait(2.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
