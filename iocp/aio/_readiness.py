"""Readiness callbacks (add_reader / add_writer) for the completion-port loop.

A completion port reports finished operations, not readiness, and it can
only watch sockets it performs I/O on.  Code written for selector loops
(tornado, pyzmq, pipes of subprocesses, UDP here) wants "call me when this
fd is readable".  We give it that with a helper thread, the approach
tornado uses on Windows' proactor loop:

- the helper thread blocks in ``selectors.DefaultSelector.select()``
  (epoll on Linux) on the watched fds plus a wake-up socketpair;
- when fds are ready it hands the list to the loop with
  ``call_soon_threadsafe`` (a posted completion wakes the port) and waits
  until the loop has run the callbacks -- so readiness stays
  level-triggered exactly like a selector loop, without the thread
  spinning on an fd the loop has not serviced yet;
- the loop runs the registered callbacks, then releases the thread.

Registrations change from the loop thread only.  With epoll, a change
takes effect in the running ``epoll_wait``; with the other selectors the
helper is woken to pick it up.  Costs one thread per loop, started on the
first add_reader/add_writer, and a thread hop per readiness event.
"""

from __future__ import annotations

import selectors
import socket
import threading
from asyncio import events
from typing import Any, Callable

_EPOLL = getattr(selectors, "EpollSelector", None)


def fileobj_to_fd(fileobj: Any) -> int:
    if isinstance(fileobj, int):
        fd = fileobj
    else:
        try:
            fd = int(fileobj.fileno())
        except (AttributeError, TypeError, ValueError):
            raise ValueError(f"Invalid file object: {fileobj!r}") from None
    if fd < 0:
        raise ValueError(f"Invalid file descriptor: {fd}")
    return fd


class ReadinessThread:
    """add_reader/add_writer for one loop, served by a helper thread."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self._sel = selectors.DefaultSelector()
        self._rsock, self._wsock = socket.socketpair()
        self._rsock.setblocking(False)
        self._wsock.setblocking(False)
        self._sel.register(self._rsock, selectors.EVENT_READ)
        self._readers: dict[int, events.Handle] = {}
        self._writers: dict[int, events.Handle] = {}
        self._closed = False
        self._ack = threading.Event()
        self._needs_wake = _EPOLL is None or not isinstance(self._sel, _EPOLL)
        self._thread = threading.Thread(target=self._run, name="iocp.aio-readiness", daemon=True)
        self._thread.start()

    # ---- loop side -----------------------------------------------------

    def _update(self, fd: int) -> None:
        mask = (selectors.EVENT_READ if fd in self._readers else 0) | (
            selectors.EVENT_WRITE if fd in self._writers else 0
        )
        try:
            self._sel.get_key(fd)
            registered = True
        except KeyError:
            registered = False
        if mask == 0:
            if registered:
                try:
                    self._sel.unregister(fd)
                except (KeyError, ValueError, OSError):
                    pass  # closed behind our back: epoll already forgot it
        elif registered:
            try:
                self._sel.modify(fd, mask)
            except OSError:  # the fd was closed and reused behind our back
                self._sel.unregister(fd)
                self._sel.register(fd, mask)
        else:
            self._sel.register(fd, mask)
        if self._needs_wake:
            self._wake()

    def add(
        self, fd: int, write: bool, callback: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        table = self._writers if write else self._readers
        handle = events.Handle(callback, args, self._loop, None)
        old = table.get(fd)
        table[fd] = handle
        try:
            self._update(fd)
        except BaseException:
            if old is None:
                del table[fd]
            else:
                table[fd] = old
            raise
        if old is not None:
            old.cancel()

    def remove(self, fd: int, write: bool) -> bool:
        table = self._writers if write else self._readers
        handle = table.pop(fd, None)
        if handle is None:
            return False
        handle.cancel()
        self._update(fd)
        return True

    def _dispatch(self, ready: list[tuple[int, int]]) -> None:
        try:
            for fd, mask in ready:
                if mask & selectors.EVENT_READ:
                    h = self._readers.get(fd)
                    if h is not None and not h._cancelled:
                        h._run()
                if mask & selectors.EVENT_WRITE:
                    h = self._writers.get(fd)
                    if h is not None and not h._cancelled:
                        h._run()
        finally:
            self._ack.set()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for h in list(self._readers.values()) + list(self._writers.values()):
            h.cancel()
        self._readers.clear()
        self._writers.clear()
        self._ack.set()
        self._wake()
        self._thread.join()
        self._sel.close()
        self._rsock.close()
        self._wsock.close()

    def _wake(self) -> None:
        try:
            self._wsock.send(b"\0")
        except OSError:
            pass

    # ---- helper thread -------------------------------------------------

    def _run(self) -> None:
        while not self._closed:
            try:
                got = self._sel.select()
            except (OSError, ValueError):
                if self._closed:
                    return
                continue  # an fd closed behind our back; epoll drops it
            if self._closed:
                return
            ready = []
            for key, mask in got:
                if key.fileobj is self._rsock:
                    try:
                        while self._rsock.recv(4096):
                            pass
                    except OSError:
                        pass
                    continue
                ready.append((key.fd, mask))
            if not ready:
                continue
            self._ack.clear()
            try:
                self._loop.call_soon_threadsafe(self._dispatch, ready)
            except RuntimeError:  # the loop is closed
                return
            self._ack.wait()
