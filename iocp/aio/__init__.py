"""iocp.aio -- run asyncio code on an I/O completion port.

    import asyncio
    import iocp.aio

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 8080)
        async with server:
            await server.serve_forever()

    asyncio.run(main(), loop_factory=iocp.aio.new_event_loop)   # Python 3.12+

    with asyncio.Runner(loop_factory=iocp.aio.new_event_loop) as runner:
        runner.run(main())                                        # Python 3.11+

    iocp.aio.run(main())                                          # any version

A loop factory is the way asyncio picks a loop from Python 3.12 on: event
loop policies are deprecated from 3.14 (removal planned for 3.16), so
``iocp.aio.install()``, which sets one, warns (DeprecationWarning) on 3.12+,
as ``uvloop.install()`` does.  ``loop = iocp.aio.new_event_loop()`` gives a
loop to drive by hand.

The loop is asyncio's own proactor event loop (the one Windows uses) on a
proactor built from ``iocp.CompletionPort``: socket I/O is port operations
(io_uring, epoll emulation or Windows IOCP), timers and callbacks are
asyncio's.  See docs/asyncio.md for what is supported and the design.
"""

from __future__ import annotations

import asyncio
import sys
import warnings
from typing import Any, Coroutine, TypeVar

from . import _compat, _loop
from ._loop import EventLoop
from ._proactor import Proactor

__all__ = ["EventLoop", "Proactor", "install", "new_event_loop", "run"]

# asyncio's policies are deprecated from 3.14 and go in 3.16; the class
# exists while its stdlib base does.
if hasattr(_loop, "EventLoopPolicy"):
    EventLoopPolicy = _loop.EventLoopPolicy
    __all__.append("EventLoopPolicy")

_T = TypeVar("_T")


def new_event_loop(*, backend: str | None = None) -> EventLoop:
    """A new iocp event loop (``backend`` as in ``iocp.CompletionPort``):
    the ``loop_factory`` for ``asyncio.run`` (3.12+) and ``asyncio.Runner``
    (3.11+)."""
    return EventLoop(backend=backend)


def install(backend: str | None = None) -> None:
    """Sets the asyncio event loop policy to ``EventLoopPolicy(backend)``:
    from now on ``asyncio.run()`` and ``asyncio.new_event_loop()`` make iocp
    loops.

    Deprecated on Python 3.12+ (a DeprecationWarning): asyncio deprecates
    policies from 3.14.  Use
    ``asyncio.run(main(), loop_factory=iocp.aio.new_event_loop)`` or
    ``iocp.aio.run(main())``.  Raises RuntimeError on a Python without
    policies.
    """
    if _compat.PY312:
        warnings.warn(
            "iocp.aio.install() is deprecated: asyncio deprecates event loop policies "
            "from Python 3.14; use asyncio.run(main(), loop_factory=iocp.aio.new_event_loop) "
            "or iocp.aio.run(main()) instead",
            DeprecationWarning,
            stacklevel=2,
        )
    policy_class = getattr(_loop, "EventLoopPolicy", None)
    if policy_class is None:  # pragma: no cover - Python 3.16+
        raise RuntimeError(
            "this Python has no asyncio event loop policies; use "
            "asyncio.run(main(), loop_factory=iocp.aio.new_event_loop)"
        )
    _compat.set_event_loop_policy(policy_class(backend))


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

    if _compat.get_running_loop_or_none() is not None:
        raise RuntimeError("iocp.aio.run() cannot be called from a running event loop")
    if not _compat.iscoroutine(main):
        raise ValueError(f"a coroutine was expected, got {main!r}")
    loop = factory()
    try:
        asyncio.set_event_loop(loop)
        if debug is not None:
            loop.set_debug(debug)
        return loop.run_until_complete(main)
    finally:
        try:
            _compat.cancel_all_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
