"""HTTP hello-world servers under test, one per process.

    python -m iocp.bench.httpservers NAME --port N [--host H] [--backend B]

NAME is APP-LOOP: an app (``aiohttp``: a ``web.Application`` with
``GET /`` -> "Hello, World!"; ``uvicorn``: a bare ASGI app saying the same)
on an event loop (``iocp-aio``, ``uvloop``, ``rloop``, ``asyncio``).  Every
server answers ``GET /`` with 200 and the 13 bytes ``Hello, World!`` as
text/plain, keeps connections alive, logs no access, listens on a socket
made here the same way as the echo servers' (backlog 4096; its protocol
IPPROTO_TCP, as ``create_server(host, port)`` makes it), and stops on
SIGTERM or SIGINT.  uvicorn gets its loop the way its command line does
(``--loop iocp.aio:new_event_loop``, ``--loop uvloop``, ...) and its HTTP
parser by its own choice ("auto": httptools when installed, else h11).
"""

from __future__ import annotations

import argparse
import functools
import signal
import socket
import sys
from typing import Any, Callable, Dict, List, Tuple

from iocp._argtypes import port_number
from iocp.bench import servers as _servers

BODY = b"Hello, World!"
APPS = ("aiohttp", "uvicorn")
LOOPS = ("iocp-aio", "uvloop", "rloop", "asyncio")
# The loop every ratio is taken against (issue 11: ">= uvloop's requests/s").
REFERENCE_LOOP = "uvloop"
IOCP_LOOP = "iocp-aio"


def loop_factory(loop: str, backend: str | None = None) -> Callable[[], Any]:
    """A zero-argument function making a new event loop of kind `loop`."""
    if loop == "iocp-aio":
        import iocp.aio

        return functools.partial(iocp.aio.new_event_loop, backend=backend)
    if loop == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    if loop == "rloop":
        import rloop  # type: ignore[import-not-found]

        return rloop.new_event_loop  # type: ignore[no-any-return]
    if loop == "asyncio":
        import asyncio

        return asyncio.new_event_loop
    raise ValueError(f"unknown loop {loop!r}; choose from {', '.join(LOOPS)}")


# uvicorn's --loop value for each loop (what a user would type).
UVICORN_LOOP = {"iocp-aio": "iocp.aio:new_event_loop", "uvloop": "uvloop",
                "rloop": "rloop:new_event_loop", "asyncio": "asyncio"}


# --------------------------------------------------------------------- apps


def serve_aiohttp(lsock: socket.socket, loop: str, backend: str | None) -> None:
    """aiohttp's web.Application, GET / -> "Hello, World!", on `loop`."""
    import asyncio

    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="text/plain")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.SockSite(runner, lsock, backlog=_servers.BACKLOG)
        await site.start()
        stop = asyncio.get_running_loop().create_future()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(
                sig, lambda: stop.done() or stop.set_result(None))
        try:
            await stop
        finally:
            await runner.cleanup()

    ev = loop_factory(loop, backend)()
    asyncio.set_event_loop(ev)
    try:
        ev.run_until_complete(main())
    finally:
        asyncio.set_event_loop(None)
        ev.close()


async def hello_asgi(scope: Dict[str, Any], receive: Callable[..., Any],
                     send: Callable[..., Any]) -> None:
    """A bare ASGI app: every HTTP request gets 200 "Hello, World!"."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(BODY)).encode())]})
    await send({"type": "http.response.body", "body": BODY})


def uvicorn_config(loop: str, backend: str | None = None) -> Any:
    """uvicorn.Config for `loop`, as `uvicorn --loop X --no-access-log
    --lifespan off --log-level warning` would make it."""
    import uvicorn

    spec: Any = UVICORN_LOOP[loop]
    if loop == "iocp-aio" and backend:
        spec = loop_factory(loop, backend)   # uvicorn takes a factory as well as a string
    return uvicorn.Config(hello_asgi, loop=spec, lifespan="off", access_log=False,
                          log_level="warning", backlog=_servers.BACKLOG)


def serve_uvicorn(lsock: socket.socket, loop: str, backend: str | None) -> None:
    """uvicorn serving `hello_asgi` on `loop`; uvicorn's own SIGTERM/SIGINT
    handling stops it."""
    import uvicorn

    # uvicorn shuts down gracefully on SIGTERM, then raises the signal again
    # under the handler it found: make that one end the process cleanly.
    signal.signal(signal.SIGTERM, _servers._raise_stop)
    try:
        uvicorn.Server(uvicorn_config(loop, backend)).run(sockets=[lsock])
    except _servers._Stop:
        pass


SERVE = {"aiohttp": serve_aiohttp, "uvicorn": serve_uvicorn}


# --------------------------------------------------------------------- registry


def _split(name: str) -> Tuple[str, str]:
    app, _, loop = name.partition("-")
    return app, loop


HTTP_SERVERS: List[str] = [f"{app}-{loop}" for app in APPS for loop in LOOPS]

_LOOP_NEEDS: Dict[str, Callable[[], str | None]] = {
    "iocp-aio": _servers._need_aio,
    "uvloop": _servers._need_module("uvloop", "pip install 'pyiocp[bench]'"),
    "rloop": _servers._need_module("rloop", "pip install 'pyiocp[bench]' (Python 3.10+, "
                                   "Linux/macOS wheels)"),
    "asyncio": lambda: None,
}


def check(name: str) -> str | None:
    """None when HTTP server `name` can run here, else why not."""
    if name not in HTTP_SERVERS:
        return f"unknown HTTP server {name!r}"
    app, loop = _split(name)
    if not _servers._has_module(app):
        return f"{app} not installed (pip install 'pyiocp[bench]')"
    if app == "uvicorn":
        import uvicorn

        # A custom --loop (module:attr) is a loop factory only from 0.36 on.
        version = tuple(int(p) for p in uvicorn.__version__.split(".")[:2] if p.isdigit())
        if version < (0, 36):
            return f"uvicorn {uvicorn.__version__} is too old (0.36+ takes --loop MODULE:FACTORY)"
    return _LOOP_NEEDS[loop]()


def available() -> Tuple[List[str], Dict[str, str]]:
    """(HTTP servers that can run here, {server: reason} for the others)."""
    ok: List[str] = []
    skipped: Dict[str, str] = {}
    for name in HTTP_SERVERS:
        reason = check(name)
        if reason:
            skipped[name] = reason
        else:
            ok.append(name)
    return ok, skipped


def describe(name: str) -> str:
    app, loop = _split(name)
    if app == "aiohttp":
        return f"aiohttp web.Application on {loop}"
    return f"uvicorn, bare ASGI app, --loop {UVICORN_LOOP[loop]}"


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m iocp.bench.httpservers",
                                     description="Run one benchmark HTTP hello-world server.")
    parser.add_argument("name", choices=HTTP_SERVERS)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, required=True)
    parser.add_argument("--backend", default=None, choices=["io_uring", "epoll", "iocp"],
                        help="iocp backend for iocp.aio")
    args = parser.parse_args(argv)
    reason = check(args.name)
    if reason:
        print(f"server {args.name} unavailable: {reason}", file=sys.stderr)
        return 2
    _servers.raise_nofile_limit()
    app, loop = _split(args.name)
    # IPPROTO_TCP, as getaddrinfo gives `create_server(host, port)`: asyncio
    # sets TCP_NODELAY on accepted sockets only when their proto says TCP,
    # and without it a response written in two parts waits for the
    # client's delayed ACK (40 ms).
    lsock = _servers.listen_socket(args.host, args.port, socket.IPPROTO_TCP)
    try:
        SERVE[app](lsock, loop, args.backend)
    except KeyboardInterrupt:
        pass
    finally:
        lsock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
