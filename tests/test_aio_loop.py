"""iocp.aio's loop on the port: one run_once per iteration, ops that start
when issued, wake-ups from other threads, the thread that owns the
single-issuer port, and accept loops on one multishot accept.

Every loop is closed at the end and its port must hold nothing (no live op
records, nothing in flight, no pinned or port buffers).  Every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import sys
import threading
from typing import Any

import pytest

import iocp
import iocp.aio

TIMEOUT = 30.0
BURST = 32


def _leak_free(loop: iocp.aio.EventLoop) -> None:
    stats = loop.port.stats()
    for k in ("live_ops", "inflight", "pinned_buffers", "live_buffers"):
        assert stats[k] == 0, stats


@pytest.fixture
def aloop(backend: str):
    """An iocp event loop on the current backend, closed and leak-checked."""
    loop = iocp.aio.EventLoop(backend=backend)
    yield loop
    if not loop.is_closed():
        loop.close()
    _leak_free(loop)


def run(loop: asyncio.AbstractEventLoop, coro: Any) -> Any:
    return loop.run_until_complete(asyncio.wait_for(coro, TIMEOUT))


class _CountingPort:
    """Stands in for the proactor's port: counts the calls select() makes
    and passes every call on."""

    def __init__(self, port: iocp.CompletionPort) -> None:
        self._port = port
        self.calls: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._port, name)
        if name in ("run", "run_once", "post", "stop", "get", "get_many"):

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.calls[name] = self.calls.get(name, 0) + 1
                return attr(*args, **kwargs)

            return counted
        return attr


def _count_selects(loop: iocp.aio.EventLoop) -> list[int]:
    """Counts the loop's select() calls from now on (count[0])."""
    proactor = loop._proactor
    select = proactor.select
    count = [0]

    def counting(timeout: Any = None) -> Any:
        count[0] += 1
        return select(timeout)

    proactor.select = counting  # type: ignore[method-assign]
    return count


# ------------------------------------------------------------------ the wait


def test_loop_port_is_single_issuer(aloop) -> None:
    assert aloop.port.single_issuer


def test_select_is_one_run_once(aloop) -> None:
    # An echo over a socket pair: each iteration waits with exactly one
    # run_once and nothing else -- no run(), no posted packet, no stop().
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        for i in range(50):
            await loop.sock_sendall(a, b"%d" % i)
            got = await loop.sock_recv(b, 100)
            assert got == b"%d" % i
        return 0

    try:
        run(aloop, asyncio.sleep(0))  # the self-pipe reader is armed
        counting = _CountingPort(aloop._proactor._port)
        aloop._proactor._port = counting  # type: ignore[assignment]
        selects = _count_selects(aloop)
        try:
            run(aloop, main())
        finally:
            aloop._proactor._port = counting._port
        assert selects[0] >= 50  # each recv waited at least once
        assert counting.calls == {"run_once": selects[0]}
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", ["send", "connect"])
def test_op_starts_when_issued(aloop, kind: str) -> None:
    # The op is issued from a task step, then the loop thread blocks (in a
    # later callback of the same iteration, before any select()) until a
    # plain thread has seen the op's effect: the bytes or the connection.
    # An op deferred to the next select() is not seen, and the wait ends
    # unsatisfied.
    lsock = socket.create_server(("127.0.0.1", 0))
    lsock.settimeout(TIMEOUT)
    seen = threading.Event()
    server_conn: list[socket.socket] = []
    a, b = socket.socketpair()
    a.setblocking(False)

    def peer() -> None:
        if kind == "connect":
            conn, _ = lsock.accept()
            server_conn.append(conn)
            seen.set()
        else:
            b.settimeout(TIMEOUT)
            if b.recv(10) == b"x":
                seen.set()

    t = threading.Thread(target=peer, daemon=True)
    t.start()
    csock = socket.socket()
    csock.setblocking(False)

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        if kind == "connect":
            op = asyncio.ensure_future(loop.sock_connect(csock, lsock.getsockname()))
        else:
            await loop.sock_sendall(a, b"")  # registers a beforehand
            op = asyncio.ensure_future(loop.sock_sendall(a, b"x"))
        await asyncio.sleep(0)  # op's first step runs in this iteration, first
        started = seen.wait(10)  # blocks the loop thread: no select() now
        await op
        return started

    try:
        assert run(aloop, main()), f"the {kind} did not start before the next select()"
    finally:
        t.join(TIMEOUT)
        for s in (lsock, a, b, csock, *server_conn):
            s.close()


def test_call_soon_threadsafe_wakes_a_blocked_loop(aloop) -> None:
    # The loop waits in run_once with no timer due for TIMEOUT seconds; a
    # thread's call_soon_threadsafe must end that wait.
    async def main() -> int:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        idle = threading.Event()

        def other() -> None:
            idle.wait(TIMEOUT)
            loop.call_soon_threadsafe(fut.set_result, 7)

        t = threading.Thread(target=other)
        t.start()
        loop.call_soon(idle.set)  # set from the last callback before the wait
        try:
            return await asyncio.wait_for(fut, 10)
        finally:
            t.join(TIMEOUT)

    assert run(aloop, main()) == 7


# ------------------------------------------------------------------ threads


async def _echo_and_wake() -> tuple[bytes, int]:
    """A socket echo plus a wake-up from a third thread."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    try:
        await loop.sock_sendall(a, b"ping")
        got = await loop.sock_recv(b, 10)
        fut = loop.create_future()
        t = threading.Thread(target=loop.call_soon_threadsafe, args=(fut.set_result, 3))
        t.start()
        n = await asyncio.wait_for(fut, 10)
        t.join(TIMEOUT)
        return got, n
    finally:
        a.close()
        b.close()


def _in_thread(fn: Any) -> Any:
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(("ok", fn()))
        except BaseException as exc:  # reported in the test's thread
            out.append(("err", exc))

    t = threading.Thread(target=target)
    t.start()
    t.join(TIMEOUT)
    assert out, "the thread did not finish"
    kind, value = out[0]
    if kind == "err":
        raise value
    return value


def test_loop_made_in_main_runs_in_another_thread(backend: str) -> None:
    loop = iocp.aio.EventLoop(backend=backend)
    # A wake-up before the loop ever ran, from yet another thread, must not
    # take the port away from the thread that will run it.
    woke: list[int] = []
    t = threading.Thread(target=loop.call_soon_threadsafe, args=(woke.append, 1))
    t.start()
    t.join(TIMEOUT)

    def use() -> Any:
        try:
            return run(loop, _echo_and_wake())
        finally:
            loop.close()

    assert _in_thread(use) == (b"ping", 3)
    assert woke == [1]
    _leak_free(loop)


def test_loop_made_in_another_thread_runs_in_main(backend: str) -> None:
    loop = _in_thread(lambda: iocp.aio.EventLoop(backend=backend))
    try:
        assert run(loop, _echo_and_wake()) == (b"ping", 3)
    finally:
        loop.close()
    _leak_free(loop)


def test_port_stays_with_the_first_running_thread(backend: str) -> None:
    # The kernel binds a single-issuer ring to its first submitter, so the
    # loop cannot move: a run, or close(), elsewhere is a clear error that
    # changes nothing, and the owner can still run and close it.
    loop = iocp.aio.EventLoop(backend=backend)
    with concurrent.futures.ThreadPoolExecutor(1) as owner:
        owner.submit(run, loop, _echo_and_wake()).result(TIMEOUT)
        with pytest.raises(RuntimeError, match="owned by thread"):
            loop.run_forever()
        with pytest.raises(RuntimeError, match="cannot be closed here"):
            loop.close()
        assert not loop.is_closed()

        def again() -> Any:
            try:
                return run(loop, _echo_and_wake())
            finally:
                loop.close()

        assert owner.submit(again).result(TIMEOUT) == (b"ping", 3)
    _leak_free(loop)


def test_exited_owner_is_told_apart_from_a_new_thread(backend: str) -> None:
    # A new thread may get the exited owner's ident; it must get the clear
    # error, not reach the kernel (which refuses it) with the port.
    loop = iocp.aio.EventLoop(backend=backend)
    keep = threading.Event()
    owner = concurrent.futures.ThreadPoolExecutor(1)
    try:
        owner.submit(run, loop, _echo_and_wake()).result(TIMEOUT)
        owner.submit(keep.wait, TIMEOUT)
        for _ in range(3):  # whatever ident the new threads get
            with pytest.raises(RuntimeError, match="owned by thread"):
                _in_thread(lambda: loop.run_forever())
    finally:
        keep.set()
        owner.submit(loop.close).result(TIMEOUT)
        owner.shutdown()
    _leak_free(loop)


# ------------------------------------------------------------------ accept


class _Counting(asyncio.Protocol):
    def __init__(self, made: list[Any], done: asyncio.Future[None], n: int) -> None:
        self.made = made
        self.done = done
        self.n = n

    def connection_made(self, transport: Any) -> None:
        self.made.append(transport)
        if len(self.made) == self.n and not self.done.done():
            self.done.set_result(None)


def _connect_burst(address: Any, n: int) -> list[socket.socket]:
    """n blocking connects: each completes in the kernel's listen queue,
    whether or not the server has accepted it yet."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(address, timeout=TIMEOUT)
        socks.append(s)
    return socks


def test_accept_burst_in_few_iterations(aloop) -> None:
    # BURST connections wait in the listen queue before the loop turns
    # again: one multishot accept takes them in a batch or two; the stdlib
    # proactor loop takes one per iteration (BURST iterations at least).
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        made: list[Any] = []
        done = loop.create_future()
        server = await loop.create_server(
            lambda: _Counting(made, done, BURST), "127.0.0.1", 0
        )
        selects = _count_selects(aloop)
        clients = _connect_burst(server.sockets[0].getsockname(), BURST)
        try:
            await asyncio.wait_for(done, 10)
            n = selects[0]
        finally:
            for t in made:
                t.close()
            for c in clients:
                c.close()
            server.close()
            await server.wait_closed()
        return len(made), n

    made, iterations = run(aloop, main())
    assert made == BURST
    assert iterations <= BURST // 4, iterations


def test_accept_backlog_bound(aloop) -> None:
    # At most `backlog` accepted sockets wait to be served; at the bound the
    # accept pauses and goes on once they are: every connection is served.
    async def main() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        lsock = socket.create_server(("127.0.0.1", 0), backlog=BURST * 2)
        lsock.setblocking(False)
        made: list[Any] = []
        done = loop.create_future()
        peak = [0]

        def factory() -> asyncio.Protocol:
            acc = loop._accept_futures[lsock.fileno()]
            peak[0] = max(peak[0], len(acc._pending) + 1)  # + the one being served
            return _Counting(made, done, BURST)

        loop._start_serving(factory, lsock, backlog=4)
        clients = _connect_burst(lsock.getsockname(), BURST)
        try:
            await asyncio.wait_for(done, 10)
        finally:
            for t in made:
                t.close()
            for c in clients:
                c.close()
            loop._stop_serving(lsock)
        return len(made), peak[0]

    made, peak = run(aloop, main())
    assert made == BURST
    assert peak <= 4, peak


def test_server_close_cancels_accept_and_closes_pending(aloop) -> None:
    # Connections accepted by the kernel but not served when the server
    # closes are closed (their clients see EOF or a reset), the accept op
    # ends, the listening socket is closed and nothing stays on the port.
    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        made: list[Any] = []
        server = await loop.create_server(
            lambda: _Counting(made, loop.create_future(), 0), "127.0.0.1", 0
        )
        lsock = server.sockets[0]
        acceptor = loop._accept_futures[lsock.fileno()]
        clients = _connect_burst(lsock.getsockname(), 8)
        # No iteration since the connects: nothing served yet.
        server.close()
        await server.wait_closed()
        for _ in range(1000):  # bounded: the cancel's completions come back
            if acceptor._op is None and not acceptor._pending:
                break
            await asyncio.sleep(0)
        assert acceptor._op is None and not acceptor._pending
        assert not loop._accept_futures
        assert made == []
        outcomes = []
        for c in clients:
            c.settimeout(10)
            try:
                outcomes.append(c.recv(1))
            except ConnectionResetError:
                outcomes.append("reset")
            c.close()
        return outcomes

    outcomes = run(aloop, main())
    assert all(o in (b"", "reset") for o in outcomes), outcomes
    assert aloop.port.stats()["live_ops"] <= 1  # the self-pipe's recv


def test_accepted_connections_echo_through_the_server(aloop) -> None:
    # create_server / open_connection on the multishot accept, end to end.
    async def main() -> list[bytes]:
        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(await r.readline())
            await w.drain()
            w.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()
        out = []
        for i in range(5):
            r, w = await asyncio.open_connection(*addr)
            w.write(b"line %d\n" % i)
            out.append(await r.readline())
            w.close()
            await w.wait_closed()
        server.close()
        await server.wait_closed()
        return out

    assert run(aloop, main()) == [b"line %d\n" % i for i in range(5)]


# ------------------------------------------------------------------ hot paths


def test_get_debug_follows_set_debug(aloop) -> None:
    # get_debug is a stored C callable: it must track set_debug, and what
    # Futures and Handles read through it must follow.
    assert aloop.get_debug() is False
    aloop.set_debug(True)
    assert aloop.get_debug() is True
    handle = aloop.call_soon(lambda: None)
    assert handle._source_traceback  # debug mode: where it was scheduled
    handle.cancel()
    aloop.set_debug(False)
    assert aloop.get_debug() is False
    handle = aloop.call_soon(lambda: None)
    assert handle._source_traceback is None
    handle.cancel()


def test_call_soon_checks_as_asyncio(aloop) -> None:
    # Debug mode keeps asyncio's thread and callback checks.
    aloop.set_debug(True)
    with pytest.raises(TypeError, match="callable"):
        aloop.call_soon("not callable")
    err: list[BaseException] = []

    def elsewhere() -> None:
        try:
            aloop.call_soon(lambda: None)
        except RuntimeError as exc:
            err.append(exc)

    def from_a_thread() -> None:
        t = threading.Thread(target=elsewhere)
        t.start()
        t.join(TIMEOUT)

    aloop.call_soon(from_a_thread)
    run(aloop, asyncio.sleep(0))
    assert err and "thread" in str(err[0])
    aloop.set_debug(False)
    order: list[int] = []
    for i in range(3):
        aloop.call_soon(order.append, i)
    run(aloop, asyncio.sleep(0))
    assert order == [0, 1, 2]
    aloop.close()
    with pytest.raises(RuntimeError, match="is closed"):
        aloop.call_soon(order.append, 9)
    coro = asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="is closed"):
        aloop.create_task(coro)
    coro.close()


def test_create_task_names_contexts_and_factories(aloop) -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="none")

    async def read() -> str:
        await asyncio.sleep(0)
        return var.get()

    ctx = contextvars.copy_context()
    ctx.run(var.set, "inside")
    task = aloop.create_task(read(), name="mine")
    assert task.get_name() == "mine" and task.get_loop() is aloop
    assert run(aloop, task) == "none"
    if sys.version_info >= (3, 11):
        assert run(aloop, aloop.create_task(read(), context=ctx)) == "inside"
    made: list[Any] = []

    def factory(loop: Any, coro: Any, **kwargs: Any) -> Any:
        made.append(coro)
        return asyncio.Task(coro, loop=loop, **kwargs)

    aloop.set_task_factory(factory)
    task = aloop.create_task(read(), name="via-factory")
    assert made and task.get_name() == "via-factory"
    assert run(aloop, task) == "none"


def test_time_is_the_monotonic_clock_unless_overridden(backend: str) -> None:
    import time

    class Clocked(iocp.aio.EventLoop):
        def time(self) -> float:
            return 1234.5

    loop = iocp.aio.EventLoop(backend=backend)
    other = Clocked(backend=backend)
    try:
        before = time.monotonic()
        assert before <= loop.time() <= time.monotonic()
        assert other.time() == 1234.5
    finally:
        loop.close()
        other.close()
