"""The ``iocp`` command (``python -m iocp``): demo server, stdin client, benchmarks.

    iocp serve  [--host 127.0.0.1] [--port 9527] [--echo] [--threads N] [--workers K]
    iocp client [--host 127.0.0.1] [--port 9527]
    iocp bench  ...
"""

from __future__ import annotations

import argparse
import errno
import io
import logging
import os
import socket
import sys
import threading
from typing import Any, List, Sequence

from iocp._argtypes import MAX_SECONDS, float_option, int_option, port_number

PROG = "iocp"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9527
_out_lock = threading.Lock()


# --------------------------------------------------------------------------
# output helpers


def escape(data: bytes) -> str:
    """Render received bytes for a terminal: UTF-8 text as is, anything else escaped.

    Never treated as a C string: NUL bytes and control characters show as
    ``\\x00`` etc., undecodable bytes as ``\\xNN``.
    """
    text = data.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch == "\t":
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)


def _emit(line: str, stream: Any = None) -> None:
    stream = stream or sys.stdout
    with _out_lock:
        try:
            stream.write(line + "\n")
            stream.flush()
        except (BrokenPipeError, ValueError):
            pass


def _addr(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"[{addr[0]}]:{addr[1]}" if ":" in str(addr[0]) else f"{addr[0]}:{addr[1]}"
    return str(addr) if addr else "unix"


def _fail(message: str, code: int = 1) -> int:
    _emit(f"{PROG}: {message}", sys.stderr)
    return code


# Short texts for the errors a user is most likely to meet, the same on
# every platform: on Windows, errno is the WSA code (errno.EADDRINUSE is
# 10048 there) and the system's own wording is long ("Only one usage of
# each socket address ... is normally permitted").
_SHORT_TEXT = {
    errno.EADDRINUSE: "address already in use",
    errno.EADDRNOTAVAIL: "cannot assign requested address",
}


def _oserror_text(exc: OSError) -> str:
    if isinstance(exc, socket.gaierror):  # errno is an EAI_* code, not an errno
        return str(exc.strerror or exc).lower()
    if exc.errno is None:
        return str(exc)
    if exc.errno in _SHORT_TEXT:
        return _SHORT_TEXT[exc.errno]
    if getattr(exc, "winerror", None) is not None and exc.strerror:
        # A Windows error (WSA codes included): os.strerror() knows only
        # the C runtime's errno values and says "Unknown error" for these;
        # the exception carries the system's message.
        return exc.strerror.strip().rstrip(".").lower()
    return os.strerror(exc.errno).lower()


def _utf8_output() -> None:
    r"""Makes stdout and stderr UTF-8 whatever the console code page or locale.

    On Windows a pipe gets the ANSI code page (cp1252), where most received
    text would be mangled or unencodable, and text mode turns each "\n"
    into "\r\n": stdout is written with plain "\n", so the client prints
    exactly the lines it received.  Streams replaced by the caller (not a
    plain TextIOWrapper, e.g. a test's capture) are left alone.
    """
    for stream, extra in ((sys.stdout, {"newline": "\n"}), (sys.stderr, {})):
        if type(stream) is not io.TextIOWrapper:
            continue
        try:
            stream.flush()
            stream.reconfigure(encoding="utf-8", errors="backslashreplace", **extra)
        except (OSError, ValueError):  # closed, or data already decoded
            pass


# --------------------------------------------------------------------------
# argument parsing


class _Parser(argparse.ArgumentParser):
    """argparse with errors as one line on stderr (no usage dump)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# Numeric options: out-of-range values are refused by argparse, never
# accepted or left to fail deep inside a command.
_port_number = port_number
_threads = int_option(1, 1024, "thread count")
_workers = int_option(1, 1024, "worker count")
_positive = int_option(1, None, "count")
_seconds = float_option(0.0, MAX_SECONDS, what="duration")


def _add_address(p: argparse.ArgumentParser, host_help: str) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help=f"{host_help} (default {DEFAULT_HOST})")
    p.add_argument(
        "--port", type=_port_number, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})"
    )
    if sys.platform != "win32":
        p.add_argument("--unix", metavar="PATH", help="use this Unix domain socket instead of TCP")
    p.add_argument(
        "--backend",
        choices=["io_uring", "epoll", "iocp"],
        help="completion port backend (default: the best available)",
    )


def build_parser(bench_module: Any = None) -> argparse.ArgumentParser:
    """The argument parser; ``bench_module`` (iocp.bench.cli) configures ``iocp bench``."""
    parser = _Parser(
        prog=PROG,
        description="I/O completion ports for Python: demo server and client, benchmarks.",
        epilog="Run 'iocp COMMAND --help' for the options of a command.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    serve = sub.add_parser(
        "serve",
        help="run the demo server (prints what clients send, or echoes it)",
        description="The classic IOCP demo server: logs each connection and prints each "
        "message received (binary data shown escaped), or echoes with --echo. "
        "Stops gracefully on Ctrl-C / SIGTERM.",
    )
    _add_address(serve, "address to listen on; '::1' or '::' for IPv6")
    serve.add_argument("--echo", action="store_true", help="echo data back instead of printing")
    serve.add_argument("--quiet", action="store_true", help="do not print each message")
    serve.add_argument(
        "--threads", type=_threads, default=1, help="completion-loop threads (1..1024, default 1)"
    )
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        help="processes sharing the port with SO_REUSEPORT (Linux; 1..1024, default 1)",
    )
    serve.add_argument("--max-connections", type=_positive, help="refuse clients beyond this")
    serve.add_argument(
        "--idle-timeout", type=_seconds, help="close connections silent for this many seconds"
    )
    serve.add_argument(
        "--drain-timeout",
        type=_seconds,
        default=5.0,
        help="on shutdown, seconds to let connections flush (default 5)",
    )

    client = sub.add_parser(
        "client",
        help="send the lines typed on stdin to a server, print its replies",
        description="Reads lines from stdin and sends them; prints whatever the server "
        "sends back. At end of input, waits (briefly) for the replies, then exits.",
    )
    _add_address(client, "server address")
    client.add_argument(
        "--wait",
        type=_seconds,
        default=2.0,
        help="at end of input, seconds to wait for replies (default 2)",
    )
    client.add_argument(
        "--timeout", type=_seconds, default=5.0, help="connect timeout (default 5)"
    )

    bench_help = "benchmarks (iocp against asyncio, uvloop, ...); see 'iocp bench --help'"
    if bench_module is not None:
        bench = sub.add_parser("bench", help=bench_help, description=bench_module.DESCRIPTION)
        bench_module.configure_parser(bench)
        bench.set_defaults(func=bench_module.run)
    else:  # listed in --help; the module is imported only when bench is run
        sub.add_parser("bench", help=bench_help, add_help=False)
    serve.set_defaults(func=cmd_serve)
    client.set_defaults(func=cmd_client)
    return parser


# --------------------------------------------------------------------------
# iocp serve


class _DemoProtocol:
    """Prints complete lines per connection (or echoes); one instance per connection."""

    def __init__(self, echo: bool, quiet: bool, tag: str) -> None:
        self.echo = echo
        self.quiet = quiet
        self.tag = tag
        self.buf = b""
        self.who = ""

    def connection_made(self, conn: Any) -> None:
        self.who = _addr(conn.peername)
        _emit(f"{self.tag}[+] connection from {self.who}")

    def data_received(self, conn: Any, data: bytes) -> None:
        if self.echo:
            conn.send(data)
        if self.quiet:
            return
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            text = escape(line[:-1] if line.endswith(b"\r") else line)
            _emit(f"{self.tag}[{self.who}] {text}")
        if len(self.buf) > 4096:  # no newline coming: print the chunk as is
            _emit(f"{self.tag}[{self.who}] {escape(self.buf)}")
            self.buf = b""

    def eof_received(self, conn: Any) -> None:
        return None

    def connection_lost(self, conn: Any, exc: BaseException | None) -> None:
        if self.buf and not self.quiet:
            _emit(f"{self.tag}[{self.who}] {escape(self.buf)}")
            self.buf = b""
        why = f" ({exc})" if exc is not None else ""
        _emit(f"{self.tag}[-] {self.who} disconnected{why}")


def cmd_serve(args: argparse.Namespace) -> int:
    """``iocp serve``."""
    from iocp.server import Server

    def factory() -> _DemoProtocol:
        wid = server.worker_id
        tag = f"[worker {wid} pid {os.getpid()}] " if wid is not None else ""
        return _DemoProtocol(args.echo, args.quiet, tag)

    path = getattr(args, "unix", None)
    server = Server(
        factory,
        args.host,
        args.port,
        path=path,
        max_connections=args.max_connections,
        idle_timeout=args.idle_timeout or None,
        drain_timeout=args.drain_timeout,
        reuse_port=args.workers > 1,
        backend=args.backend,
    )
    where = path or _addr((args.host, args.port))
    if args.workers > 1:
        if not hasattr(os, "fork"):
            return _fail("serve: --workers needs fork() (Linux)", 2)
        try:
            server.bind()  # fails early and clearly if the address is taken
        except OSError as exc:
            return _fail(f"serve: cannot listen on {where}: {_oserror_text(exc)}")
        port = server.address[1]  # type: ignore[index]
        banner = (
            f"iocp: serving on {_addr((args.host, port))} with {args.workers} workers "
            f"x {args.threads} thread(s), backend {_probe_backend(args.backend)}; "
            "Ctrl-C to stop"
        )
        return server.serve_forever(
            threads=args.threads, workers=args.workers, ready=lambda: _emit(banner)
        )
    try:
        server.bind()
        server.start(threads=args.threads)
    except OSError as exc:
        return _fail(f"serve: cannot listen on {where}: {_oserror_text(exc)}")
    except ValueError as exc:
        return _fail(f"serve: {exc}", 2)
    shown = path or _addr(server.address)
    _emit(
        f"iocp: serving on {shown} ({'echo' if args.echo else 'print'} mode), "
        f"backend {server.backend}, {args.threads} thread(s); Ctrl-C to stop"
    )
    return server.serve_forever(threads=args.threads)


def backend_error(name: str | None) -> str | None:
    """Why a port with backend ``name`` cannot be made here, or None if it can.

    ``name=None`` means what a port would pick: ``IOCP_BACKEND``, else the
    best available.  Both ways a forced backend fails are covered: a name
    this build lacks (ValueError) and one that cannot run on this machine
    (OSError: io_uring refused by the kernel or a seccomp profile).
    """
    from iocp._core import CompletionPort

    origin = ""
    if name is None and os.environ.get("IOCP_BACKEND"):
        origin = " (from the IOCP_BACKEND environment variable)"
    try:
        with CompletionPort(backend=name):
            return None
    except ValueError as exc:
        return f"{exc}{origin}"
    except OSError as exc:
        return f"{exc.strerror or exc}{origin}"


def _probe_backend(name: str | None) -> str:
    from iocp._core import CompletionPort

    with CompletionPort(backend=name) as port:
        return str(port.backend)


# --------------------------------------------------------------------------
# iocp client


class _ClientProtocol:
    """Prints what the server sends; notes when the connection ends."""

    def __init__(self) -> None:
        self.lost = threading.Event()
        self.exc: BaseException | None = None
        self.received = 0

    def data_received(self, conn: Any, data: bytes) -> None:
        self.received += len(data)
        text = "\n".join(escape(part) for part in data.split(b"\n"))
        with _out_lock:
            try:
                sys.stdout.write(text)
                sys.stdout.flush()
            except (BrokenPipeError, ValueError):
                pass

    def eof_received(self, conn: Any) -> None:
        return None

    def connection_lost(self, conn: Any, exc: BaseException | None) -> None:
        self.exc = exc
        self.lost.set()


def _stdin_lines(sink: List[bytes | None], ready: threading.Event) -> None:
    """Reads fd 0 raw (no buffered stdin lock, so exiting never hangs on it)."""
    pending = b""
    try:
        while True:
            chunk = os.read(0, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                sink.append(line + b"\n")
                ready.set()
    except OSError:
        pass
    if pending:
        sink.append(pending + b"\n")
    sink.append(None)
    ready.set()


def cmd_client(args: argparse.Namespace) -> int:
    """``iocp client``."""
    from iocp.server import Client

    path = getattr(args, "unix", None)
    where = path or _addr((args.host, args.port))
    proto = _ClientProtocol()
    client = Client(lambda: proto, args.host, args.port, path=path, backend=args.backend)
    try:
        conn = client.connect(timeout=args.timeout or None)
    except (ConnectionRefusedError, FileNotFoundError):
        return _fail(
            f"client: cannot connect to {where}: connection refused (is the server running?)"
        )
    except TimeoutError:
        return _fail(f"client: cannot connect to {where}: timed out")
    except OSError as exc:
        return _fail(f"client: cannot connect to {where}: {_oserror_text(exc)}")
    lines: List[bytes | None] = []
    ready = threading.Event()
    threading.Thread(target=_stdin_lines, args=(lines, ready), daemon=True).start()
    code = 0
    try:
        while True:
            ready.wait(0.2)
            if proto.lost.is_set():
                break
            ready.clear()
            while lines:
                line = lines.pop(0)
                if line is None:
                    raise EOFError
                conn.send(line)
        why = f": {proto.exc}" if proto.exc else ""
        _fail(f"client: connection closed by the server{why}")
        code = 1
    except EOFError:
        # Half-close: the server sees EOF, flushes its replies and closes;
        # the replies arrive before our connection_lost.
        conn.write_eof()
        if not proto.lost.wait(args.wait):
            logging.getLogger("iocp").debug("no close from the server after %s s", args.wait)
    except KeyboardInterrupt:
        code = 130
    finally:
        client.close(timeout=1.0)
    return code


# --------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``iocp`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _utf8_output()
    bench_module: Any = None
    if next((a for a in argv if not a.startswith("-")), None) == "bench":
        try:  # imported lazily: only `iocp bench` pays for it
            import iocp.bench.cli

            bench_module = iocp.bench.cli
        except ImportError as exc:
            return _fail(f"bench: the benchmark module is not available ({exc})", 2)
    parser = build_parser(bench_module)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    func = getattr(args, "func", None)
    if func is None:  # cannot happen: subcommands are required
        return _fail(f"{args.command}: not available", 2)
    if hasattr(args, "backend"):  # checked once, before the command starts anything
        why = backend_error(args.backend)
        if why is not None:
            return _fail(f"{args.command}: {why}", 2)
    try:
        return int(func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:
        logging.getLogger("iocp").debug("%s failed", args.command, exc_info=True)
        if exc.errno == errno.EADDRINUSE:
            return _fail(f"address already in use: {exc}")
        return _fail(f"{args.command}: {exc}")
    except (ImportError, NotImplementedError, ValueError, RuntimeError) as exc:
        # A setting the command refused (e.g. --workers with --unix), or a
        # resource it could not get: one line; -v shows where it came from.
        logging.getLogger("iocp").debug("%s failed", args.command, exc_info=True)
        return _fail(f"{args.command}: {exc}", 2)


if __name__ == "__main__":
    sys.exit(main())
