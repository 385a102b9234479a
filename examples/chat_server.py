"""Chat server: each line a client sends is broadcast to every other client.

    python examples/chat_server.py [--host 127.0.0.1] [--port 9527]

Connect a few ``python -m iocp client`` (or ``nc``) sessions and type.  The
handler is one shared ``Room`` instance (``Server(room)``), so it sees every
connection; its member list is guarded by a lock because callbacks of
different connections may run on different loop threads.  A client that
stops reading is cut off by the server's write limit instead of making the
server buffer without bound.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from typing import Dict

from iocp.server import Connection, Server

log = logging.getLogger("chat")


class Room:
    """A shared handler: one object for all connections."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._members: Dict[Connection, bytes] = {}  # conn -> partial line
        self._names: Dict[Connection, str] = {}

    def _broadcast(self, sender: Connection | None, text: str) -> None:
        data = text.encode("utf-8", "replace")
        with self._lock:
            targets = [c for c in self._members if c is not sender]
        for conn in targets:
            conn.send(data)

    def connection_made(self, conn: Connection) -> None:
        """Greet the newcomer and tell the others."""
        peer = conn.peername
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else f"user{id(conn) % 1000}"
        with self._lock:
            self._members[conn] = b""
            self._names[conn] = name
            count = len(self._members)
        log.info("%s joined (%d online)", name, count)
        conn.send(f"* welcome {name}, {count} online\n".encode())
        self._broadcast(conn, f"* {name} joined\n")

    def data_received(self, conn: Connection, data: bytes) -> None:
        """Split into lines; broadcast each complete one."""
        with self._lock:
            pending = self._members.get(conn, b"") + data
            *lines, rest = pending.split(b"\n")
            self._members[conn] = rest[-4096:]
            name = self._names.get(conn, "?")
        for line in lines:
            text = line.decode("utf-8", "replace").rstrip("\r")
            self._broadcast(conn, f"{name}: {text}\n")

    def connection_lost(self, conn: Connection, exc: BaseException | None) -> None:
        """Forget the member and tell the others."""
        with self._lock:
            self._members.pop(conn, None)
            name = self._names.pop(conn, "?")
        log.info("%s left%s", name, f" ({exc})" if exc else "")
        self._broadcast(None, f"* {name} left\n")


def main() -> int:
    """Parse the command line and serve until interrupted."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9527)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: must be 0..65535")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = Server(Room(), args.host, args.port, write_limit=1024 * 1024)
    try:
        server.start(threads=args.threads)  # listen now: a busy port is reported here
    except OSError as exc:
        print(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    # `ready` runs once SIGINT/SIGTERM stop the server gracefully.
    return server.serve_forever(ready=lambda: logging.info("serving until Ctrl-C or SIGTERM"))


if __name__ == "__main__":
    raise SystemExit(main())
