"""iocp.aio -- run asyncio code on an I/O completion port.

    import iocp.aio

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 8080)
        async with server:
            await server.serve_forever()

    iocp.aio.run(main())                # like asyncio.run / uvloop.run

or ``iocp.aio.install()`` to make every new asyncio loop an iocp loop, or
``loop = iocp.aio.new_event_loop()``.

The loop is asyncio's own proactor event loop (the one Windows uses) on a
proactor built from ``iocp.CompletionPort``: socket I/O is port operations
(io_uring, epoll emulation or Windows IOCP), timers and callbacks are
asyncio's.  See docs/asyncio.md for what is supported and the design.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Coroutine, TypeVar

from ._loop import EventLoop, EventLoopPolicy
from ._proactor import Proactor

__all__ = ["EventLoop", "EventLoopPolicy", "Proactor", "install", "new_event_loop", "run"]

_T = TypeVar("_T")


def new_event_loop(*, backend: str | None = None) -> EventLoop:
    """A new iocp event loop (``backend`` as in ``iocp.CompletionPort``)."""
    return EventLoop(backend=backend)


def install(backend: str | None = None) -> None:
    """Sets the asyncio event loop policy to ``EventLoopPolicy(backend)``:
    from now on ``asyncio.run()`` and ``asyncio.new_event_loop()`` make iocp
    loops."""
    asyncio.set_event_loop_policy(EventLoopPolicy(backend))


def run(
    main: Coroutine[Any, Any, _T], *, debug: bool | None = None, backend: str | None = None
) -> _T:
    """Runs a coroutine on a new iocp loop and closes it: ``asyncio.run``
    with an iocp loop (Ctrl-C cancels the main task on Python >= 3.11, as
    asyncio.run does; on 3.9/3.10 it raises KeyboardInterrupt)."""

    def factory() -> EventLoop:
        return EventLoop(backend=backend)

    if sys.version_info >= (3, 11):
        with asyncio.Runner(debug=debug, loop_factory=factory) as runner:
            return runner.run(main)

    from asyncio import coroutines, events, runners

    if events._get_running_loop() is not None:
        raise RuntimeError("iocp.aio.run() cannot be called from a running event loop")
    if not coroutines.iscoroutine(main):
        raise ValueError(f"a coroutine was expected, got {main!r}")
    loop = factory()
    try:
        events.set_event_loop(loop)
        if debug is not None:
            loop.set_debug(debug)
        return loop.run_until_complete(main)
    finally:
        try:
            _runners: Any = runners
            _runners._cancel_all_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            events.set_event_loop(None)
            loop.close()
