"""The loop of :mod:`iocp.server`: a completion port, the threads that run it, timers.

Design note.  The server layer has no event loop of its own: the completion
port is the loop.  :class:`_Loop` adds what the port lacks for a server:

- threads: ``start(n)`` runs ``port.run()`` on ``n`` threads; with none,
  whoever runs the port (or :meth:`_Loop.run_until`) drives everything;
- posted calls: :meth:`_Loop.call_soon` goes through ``port.post`` and is
  counted until it has run, so :meth:`_Loop.settle` knows when nothing of
  ours is left on the port;
- timers: one thread sleeps until the earliest deadline (a heap) and posts
  the call, so timers fire while the port is idle, with no polling.

A thread-local tells whether the calling thread runs the loop (callbacks
may then run protocol code inline instead of posting it).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from typing import Any, Callable, List, Tuple

_tls = threading.local()


class _Loop:
    """Runs a completion port on threads; timers are posted to it from one thread.

    Everything the server layer puts on the port is either an operation of
    a connection or the listener (counted there) or a call posted by
    :meth:`call_soon` (counted here until it has run), so :meth:`settle`
    can tell when nothing of ours is left.
    """

    def __init__(self, cport: Any, owned: bool) -> None:
        self.port = cport
        self.owned = owned
        self.threads: List[threading.Thread] = []
        self._running = False
        self._timers: List[Tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._tcond = threading.Condition()
        self._tthread: threading.Thread | None = None
        self._tstop = False
        self._pcond = threading.Condition()
        self._posts = 0  # call_soon() calls posted and not yet run to the end
        # The thread that dispatches the port in the single-thread mode, in a
        # cell the connections share (they compare it with their caller's
        # thread on every call): our loop thread while it runs, the thread of
        # run_until() while that runs, else the caller's own thread once a
        # connection learned it (start(threads=0)); None when nobody does.
        # Cleared when a thread stops dispatching, so a thread that reuses a
        # dead thread's ident is never taken for the dispatcher.
        self.dispatcher: List[int | None] = [None]

    # completion loop -------------------------------------------------------
    def start(self, nthreads: int, name: str = "iocp-loop") -> None:
        """Start ``nthreads`` threads running the port's completion loop."""
        self._running = True
        for i in range(max(1, nthreads)):
            t = threading.Thread(target=self.run, name=f"{name}-{i}", daemon=True)
            self.threads.append(t)
            t.start()

    def run(self) -> None:
        """Run the completion loop on the calling thread until :meth:`stop`."""
        _tls.loop = self
        me = threading.get_ident()
        self.dispatcher[0] = me
        # port.stop() would also stop other users of a shared port, so on a
        # port we do not own the threads notice stop() by a short time slice.
        slice_s = 1.0 if self.owned else 0.1
        try:
            while self._running and not self.port.closed:
                self.port.run(timeout=slice_s)
        finally:
            _tls.loop = None
            if self.dispatcher[0] == me:
                self.dispatcher[0] = None

    def in_loop(self) -> bool:
        """True on a thread that runs this loop."""
        return getattr(_tls, "loop", None) is self

    def stop_timers(self, timeout: float = 5.0) -> None:
        """Drop every pending timer and refuse new ones; return once the
        timer thread is gone, so no timer posts anything after this."""
        with self._tcond:
            self._tstop = True
            self._timers.clear()
            self._tcond.notify_all()
        if self._tthread is not None and self._tthread is not threading.current_thread():
            self._tthread.join(timeout)

    def stop_threads(self, timeout: float = 5.0) -> None:
        """Stop the loop threads and wait for them (not from a loop thread).

        Each thread returns after the batch it is dispatching, so once they
        are joined no callback of ours runs on them any more.
        """
        self._running = False
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        for t in self.threads:
            while t is not me and t.is_alive() and time.monotonic() < deadline:
                if self.owned:
                    try:
                        self.port.stop()
                    except Exception:  # port already closed
                        break
                t.join(0.05)
        self.threads = [t for t in self.threads if t.is_alive()]

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the timers and the loop threads (see :meth:`settle` to also drain)."""
        self.stop_timers(timeout)
        self.stop_threads(timeout)

    def settle(self, timeout: float = 5.0) -> bool:
        """Stop the timers and the loop threads, and return once nothing we
        put on the port is left: every posted call has run and, on a port
        we own, no operation is in flight or queued.  Call it once the
        connections and the listener are gone.  False if ``timeout`` passed.

        Order matters.  The timers go first, because the timer thread posts
        at any moment.  Then a posted call may still start more work, so
        the port is run until it is empty, on this thread once the loop
        threads have stopped: then no callback can be running elsewhere
        when emptiness is observed.
        """
        deadline = time.monotonic() + timeout
        self.stop_timers(timeout)
        if self.owned:
            self.stop_threads(max(0.0, deadline - time.monotonic()))
            return self.run_until(self._port_empty, deadline)
        # A shared port: other users may have their own operations in flight
        # and may run the port themselves, so only our posted calls count.
        # Our threads (if any) run them; without threads this one does.
        if self.threads:
            with self._pcond:
                while self._posts and time.monotonic() < deadline:
                    self._pcond.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            self.stop_threads(max(0.0, deadline - time.monotonic()))
        return self.run_until(lambda: self._posts == 0, deadline)

    def _port_empty(self) -> bool:
        if self.port.closed:
            return self._posts == 0
        st = self.port.stats()
        return (
            self._posts == 0
            and st.get("inflight", 0) == 0
            and st.get("queued", 0) == 0
            and st.get("backlog", 0) == 0
        )

    def can_run_here(self) -> bool:
        """True if this thread may run the port now, false inside a callback
        of the port's ``run()`` on this thread (a protocol callback or a
        signal handler of a loop the caller drives), where the port refuses
        a nested run.  The probe takes what is ready (``run_once(0)``): only
        ask when running the port here is what comes next anyway.
        """
        prev = getattr(_tls, "loop", None)
        _tls.loop = self
        was = self.dispatcher[0]
        self.dispatcher[0] = threading.get_ident()
        try:
            self.port.run_once(timeout=0)
        except RuntimeError:
            return False
        except ValueError:  # the port is closed: nothing left to run
            return True
        finally:
            _tls.loop = prev
            self.dispatcher[0] = was
        return True

    def run_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Run the port on this thread (as a loop thread) until ``done()``."""
        prev = getattr(_tls, "loop", None)
        _tls.loop = self
        was = self.dispatcher[0]
        self.dispatcher[0] = threading.get_ident()
        try:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0 or self.port.closed:
                    return done()
                try:
                    self.port.run(timeout=min(left, 0.05))
                except RuntimeError:  # called from a callback of run() on this thread
                    return done()
        finally:
            _tls.loop = prev
            self.dispatcher[0] = was
        return True

    # calls and timers --------------------------------------------------------
    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on a loop thread (thread-safe, via ``port.post``)."""
        with self._pcond:
            self._posts += 1
        try:
            self.port.post(callback=lambda _c: self._run_posted(fn))
        except BaseException:
            self._posted_done()
            raise

    def _run_posted(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        finally:
            self._posted_done()

    def _posted_done(self) -> None:
        with self._pcond:
            self._posts -= 1
            if not self._posts:
                self._pcond.notify_all()

    def call_later(self, delay: float, fn: Callable[[], None]) -> bool:
        """Run ``fn()`` on a loop thread after ``delay`` seconds.

        One timer thread sleeps until the earliest deadline (no polling) and
        posts the call to the port, so it works while the loop is idle.
        Returns False (and drops ``fn``) once the timers are stopped.
        """
        with self._tcond:
            if self._tstop:
                return False
            heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), fn))
            if self._tthread is None:
                self._tthread = threading.Thread(
                    target=self._timer_main, name="iocp-timer", daemon=True
                )
                self._tthread.start()
            self._tcond.notify()
        return True

    def _timer_main(self) -> None:
        while True:
            with self._tcond:
                while not self._tstop and (
                    not self._timers or self._timers[0][0] > time.monotonic()
                ):
                    wait = self._timers[0][0] - time.monotonic() if self._timers else None
                    self._tcond.wait(wait)
                if self._tstop:
                    return
                _, _, fn = heapq.heappop(self._timers)
            try:
                self.call_soon(fn)
            except Exception:  # port closed under us: timers are moot
                return
