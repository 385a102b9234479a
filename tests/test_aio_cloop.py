"""iocp.aio's loop iteration, call_soon and create_future in C
(src/aioloop.pxi): each behaviour checked side by side with asyncio's own
selector loop, which must give the same answer.

What the C code must keep of BaseEventLoop: stdlib Handle and Future
objects, FIFO order, callbacks that a callback schedules running in the
next iteration, cancelled handles skipped, contexts, the exception
handler's report of a failing callback, KeyboardInterrupt escaping, the
purge of cancelled timers, handles of other classes run through their own
``_run()``, and debug mode (the stdlib's iteration, which times slow
callbacks).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any, Callable

import pytest

import iocp.aio
from iocp.aio import _loop

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.SelectorEventLoop,
    "iocp": iocp.aio.new_event_loop,
}


@pytest.fixture(params=list(LOOPS))
def loop(request: pytest.FixtureRequest):
    lp = LOOPS[request.param]()
    yield lp
    lp.close()


def test_the_c_iteration_is_in_use() -> None:
    assert _loop._C_LOOP
    lp = iocp.aio.new_event_loop()
    try:
        assert type(lp)._run_once is iocp._core.aio_run_once
        assert type(lp).call_soon is iocp._core.aio_call_soon
    finally:
        lp.close()


def _iterations(loop: asyncio.AbstractEventLoop, n: int) -> None:
    """Runs exactly n iterations (stop() ends the iteration it runs in)."""
    for _ in range(n):
        loop.call_soon(loop.stop)
        loop.run_forever()


def test_handles_are_the_stdlibs_and_run_in_order(loop) -> None:
    got: list[Any] = []
    h = loop.call_soon(got.append, 1)
    assert type(h) is asyncio.Handle and not h.cancelled()
    loop.call_soon(got.extend, (2, 3))
    loop.call_soon(lambda *a: got.append(a), 1, 2, 3, 4, 5, 6, 7, 8)  # > 6 args
    cancelled = loop.call_soon(got.append, "never")
    cancelled.cancel()
    _iterations(loop, 1)
    assert got == [1, 2, 3, (1, 2, 3, 4, 5, 6, 7, 8)]


def test_a_callback_scheduled_by_a_callback_runs_next_iteration(loop) -> None:
    got: list[str] = []

    def first() -> None:
        got.append("first")
        loop.call_soon(got.append, "second")

    loop.call_soon(first)
    _iterations(loop, 1)
    assert got == ["first"]
    _iterations(loop, 1)
    assert got == ["first", "second"]


def test_callbacks_run_in_their_context(loop) -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    got: list[str] = []
    ctx = contextvars.copy_context()
    ctx.run(var.set, "given")
    var.set("current")
    try:
        loop.call_soon(lambda: got.append(var.get()), context=ctx)
        loop.call_soon(lambda: got.append(var.get()))
        loop.call_soon(var.set, "changed in a copy")
        loop.call_soon(lambda: got.append(var.get()))
        _iterations(loop, 1)
    finally:
        var.set("unset")
    assert got == ["given", "current", "current"]


def test_a_failing_callback_is_reported_and_the_loop_goes_on(loop) -> None:
    reports: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda lp, context: reports.append(context))
    got: list[int] = []

    def boom() -> None:
        raise ValueError("boom")

    h = loop.call_soon(boom)
    loop.call_soon(got.append, 1)
    _iterations(loop, 1)
    assert got == [1]
    (report,) = reports
    assert report["handle"] is h
    assert isinstance(report["exception"], ValueError)
    assert report["message"].startswith("Exception in callback ")
    assert "boom" in report["message"]


def test_keyboard_interrupt_escapes_and_leaves_the_rest_ready(loop) -> None:
    got: list[int] = []

    def interrupt() -> None:
        raise KeyboardInterrupt

    loop.call_soon(interrupt)
    loop.call_soon(got.append, 1)
    with pytest.raises(KeyboardInterrupt):
        loop.run_forever()
    assert got == []
    _iterations(loop, 1)
    assert got == [1]


def test_timers_fire_in_order_and_cancelled_ones_are_purged(loop) -> None:
    got: list[int] = []
    for i in (3, 1, 2):
        loop.call_later(0.001 * i, got.append, i)
    timers = [loop.call_later(3600, got.append, -1) for _ in range(200)]
    for t in timers[:150]:
        t.cancel()
    loop.run_until_complete(asyncio.sleep(0.05))
    assert got == [1, 2, 3]
    # More than 100 scheduled, more than half cancelled: all purged at once.
    assert len(loop._scheduled) == 50
    assert loop._timer_cancelled_count == 0
    for t in timers[150:]:
        t.cancel()
    _iterations(loop, 1)
    assert got == [1, 2, 3]


def test_a_handle_of_another_class_runs_through_its_own_run(loop) -> None:
    got: list[str] = []

    class Traced(asyncio.Handle):
        def _run(self) -> None:
            got.append("traced")
            super()._run()

    loop._ready.append(Traced(got.append, ("cb",), loop))
    _iterations(loop, 1)
    assert got == ["traced", "cb"]


def test_create_future_belongs_to_the_loop(loop) -> None:
    fut = loop.create_future()
    assert isinstance(fut, asyncio.Future) and fut.get_loop() is loop
    loop.call_soon(fut.set_result, 7)
    assert loop.run_until_complete(fut) == 7


def test_closed_loop_refuses_call_soon(loop) -> None:
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        loop.call_soon(print)


def test_debug_mode_times_slow_callbacks(loop, caplog) -> None:
    import time

    loop.set_debug(True)
    loop.slow_callback_duration = 0.01
    loop.call_soon(time.sleep, 0.05)
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        _iterations(loop, 1)
    assert any("took" in r.getMessage() and "sleep" in r.getMessage() for r in caplog.records)
