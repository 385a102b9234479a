"""Readiness callbacks (add_reader / add_writer) for the completion-port loop.

``PortReadiness`` (the loop's registry) serves them with the port's poll
ops: every backend has them (io_uring POLL_ADD, the epoll emulation's poll
list, IOCP's AFD poll).  Per descriptor and direction one one-shot poll op
is armed (POLLIN for a reader, POLLOUT for a writer, each with POLLERR and
POLLHUP); when it completes, a Handle that runs the callback is queued on
the loop, and the op is armed again only after the callback has run -- so
a descriptor left unread is reported again on the next iteration, as a
selector loop's level-triggered readiness is, and one a callback drained
is not reported twice.  No thread, no thread hop.

What the port cannot take -- a poll op refused with an OSError (a backend
without poll ops: ENOSYS), a descriptor the backend cannot register
(Windows: anything but a socket) -- goes, per descriptor, to
``ReadinessThread``: the earlier helper thread, kept as the fallback.

A descriptor the loop's proactor has registered already (a socket also
used with sock_recv, a transport's) is polled through that registration;
otherwise the registry registers a stand-in object that owns nothing (its
``fileno()`` is the descriptor; the port never closes what it registers)
and leaves the port as soon as the last callback of the descriptor is
removed, so a closed and reused descriptor number never finds it.
Registering does not change the descriptor's blocking mode (the port sets
O_NONBLOCK; it is put back): selector loops leave it alone too.

``ReadinessThread``, the fallback, the approach tornado uses on Windows'
proactor loop:

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
first descriptor that needs it, and a thread hop per readiness event.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import sys
import threading
from asyncio import events
from typing import Any, Callable

from iocp._core import POLLIN, POLLOUT

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


# ---- the port's poll ops ----------------------------------------------------

# A poll op that ends with one of these found its descriptor closed behind
# our back: forgotten silently, as epoll forgets a closed descriptor.
_GONE = frozenset(getattr(errno, n) for n in ("EBADF", "ENOENT", "ENOTSOCK") if hasattr(errno, n))
# register() refusals the helper thread's selector would refuse the same way.
_REFUSED = frozenset(getattr(errno, n) for n in ("EBADF", "EPERM") if hasattr(errno, n))
_POSIX = sys.platform != "win32"


class _FdSock(socket.socket):
    """A stand-in for a descriptor in the port's registry.

    The port registers ``socket.socket`` objects and reads their
    ``fileno()``; this one reports the watched descriptor and owns nothing:
    it is never a socket of its own (its native descriptor stays -1, so
    neither it nor the garbage collector closes anything), and
    ``setblocking()``, which register() calls, leaves the mode alone (the
    registry puts back what the port's native register changed).

    Once the descriptor no longer names the file it was registered for
    (closed behind our back, maybe reused), ``fileno()`` answers -1, as a
    closed socket does: the port then lets whoever owns the reused number
    register it (the port asks ``fileno()`` of what it holds), instead of
    refusing with "already registered".  One fstat per call, on POSIX."""

    __slots__ = ("_iocp_fd", "_iocp_ident")
    _iocp_fd: int
    _iocp_ident: Any

    def fileno(self) -> int:
        fd = self._iocp_fd
        if fd >= 0 and self._iocp_ident is not None and _identity(fd) != self._iocp_ident:
            self._iocp_fd = fd = -1
        return fd

    def setblocking(self, flag: bool) -> None:
        pass

    def close(self) -> None:
        self._iocp_fd = -1

    def __repr__(self) -> str:
        return f"<iocp.aio readiness stand-in fd={self._iocp_fd}>"


def _stand_in(fd: int, ident: Any) -> _FdSock:
    # socket.socket.__init__ would open or adopt a socket; __new__ alone
    # makes the object with no descriptor.
    obj = socket.socket.__new__(_FdSock)
    obj._iocp_fd = fd
    obj._iocp_ident = ident
    return obj


def _identity(fd: int) -> Any:
    """What the descriptor is (device, inode), to tell "the same file,
    registered anew" from "closed and reused"; None where unknown."""
    if not _POSIX:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class _Watch:
    """One descriptor the port watches: the object registered for it and,
    per direction (0 read, 1 write), the armed poll op and whether a
    dispatch is queued on the loop."""

    __slots__ = ("fd", "sock", "owned", "ident", "ops", "queued", "done")

    def __init__(self, fd: int, sock: socket.socket, owned: bool, ident: Any) -> None:
        self.fd = fd
        self.sock = sock
        self.owned = owned  # we registered it (a stand-in), so we unregister it
        self.ident = ident
        self.ops: list[Any] = [None, None]
        self.queued = [False, False]
        self.done: tuple[Callable[[Any], None], Callable[[Any], None]] = (
            lambda c: None,
            lambda c: None,
        )


class PortReadiness:
    """add_reader/add_writer for one loop on its port's poll ops (see the
    module docstring); descriptors the port cannot take go to a
    ReadinessThread, started only then.

    ``_readers``/``_writers`` map each descriptor to its Handle, whoever
    serves it (the proactor's ``get_key`` and ``_ready_op`` read them)."""

    def __init__(self, loop: Any) -> None:
        self._loop = loop
        self._readers: dict[int, events.Handle] = {}
        self._writers: dict[int, events.Handle] = {}
        self._watches: dict[int, _Watch] = {}
        self._thread: ReadinessThread | None = None
        self._threaded: set[int] = set()  # descriptors the thread serves
        self._no_poll = False  # the port has no poll ops (ENOSYS): all to the thread
        self._closed = False

    @property
    def thread(self) -> ReadinessThread | None:
        """The fallback helper thread, if one was needed."""
        return self._thread

    # ---- registration ------------------------------------------------------

    def _poll(self, sock: socket.socket, events_: int, callback: Callable[[Any], None]) -> Any:
        return self._loop._port.poll(sock, events_, callback)

    def _attach(self, fd: int) -> _Watch:
        """Puts ``fd`` on the port: through the proactor's registration of
        it, else a stand-in of ours (OSError if the port refuses it)."""
        loop = self._loop
        socks = loop._proactor._socks
        sock = socks.get(fd)
        if sock is not None and sock.fileno() == fd:
            watch = _Watch(fd, sock, False, _identity(fd))
        else:
            ident = _identity(fd)
            sock = _stand_in(fd, ident)
            blocking = False
            if _POSIX:
                try:
                    blocking = os.get_blocking(fd)
                except OSError:
                    pass
            try:
                loop._port.register(sock)
            except ValueError as exc:  # registered by someone the proactor does not know
                raise OSError(errno.EEXIST, str(exc)) from None
            if blocking:  # the native register made it non-blocking
                try:
                    os.set_blocking(fd, True)
                except OSError:
                    pass
            socks[fd] = sock  # a proactor registering a socket of this fd replaces it
            watch = _Watch(fd, sock, True, ident)
        watch.done = (
            lambda c, w=watch: self._on_poll(w, 0, c),
            lambda c, w=watch: self._on_poll(w, 1, c),
        )
        self._watches[fd] = watch
        return watch

    def _detach(self, watch: _Watch) -> None:
        if self._watches.get(watch.fd) is watch:
            del self._watches[watch.fd]
        for i, op in enumerate(watch.ops):
            watch.ops[i] = None
            if op is not None:
                try:
                    op.cancel()
                except Exception:
                    pass
        if not watch.owned:
            return
        loop = self._loop
        port = loop._port
        px = loop._proactor
        if px is not None and px._socks.get(watch.fd) is watch.sock:
            del px._socks[watch.fd]
        if port is not None and not port.closed:
            try:
                port.unregister(watch.sock)
            except (ValueError, OSError):
                pass

    def _arm(self, watch: _Watch, write: int) -> None:
        watch.ops[write] = self._poll(
            watch.sock, POLLOUT if write else POLLIN, watch.done[write]
        )

    def _to_thread(self, fd: int) -> None:
        """Hands every callback of ``fd`` to the helper thread."""
        watch = self._watches.get(fd)
        if watch is not None:
            self._detach(watch)
        if self._thread is None:
            self._thread = ReadinessThread(self._loop)
        self._threaded.add(fd)
        for write, table in ((False, self._readers), (True, self._writers)):
            h = table.get(fd)
            if h is not None:
                self._thread.add(fd, write, h._callback, h._args)

    # ---- loop side -----------------------------------------------------------

    def add(
        self, fd: int, write: bool, callback: Callable[..., Any], args: tuple[Any, ...]
    ) -> None:
        table = self._writers if write else self._readers
        handle = events.Handle(callback, args, self._loop, None)
        old = table.get(fd)
        if fd in self._threaded:
            assert self._thread is not None
            self._thread.add(fd, write, callback, args)
            table[fd] = handle
        else:
            watch = self._watches.get(fd)
            table[fd] = handle
            try:
                if self._no_poll:
                    self._to_thread(fd)
                else:
                    if watch is not None and watch.sock.fileno() != fd:
                        self._detach(watch)  # its file was closed behind our back
                        watch = None
                    if watch is None:
                        watch = self._attach(fd)
                    if watch.ops[write] is None and not watch.queued[write]:
                        self._arm(watch, write)
            except OSError as exc:
                if exc.errno == errno.ENOSYS:
                    self._no_poll = True
                try:
                    if exc.errno in _REFUSED:
                        raise
                    self._to_thread(fd)  # may refuse it too (same error as a selector)
                except BaseException:
                    self._undo(fd, table, old)
                    raise
            except BaseException:
                self._undo(fd, table, old)
                raise
        if old is not None:
            old.cancel()

    def _undo(self, fd: int, table: dict[int, events.Handle], old: Any) -> None:
        if old is None:
            table.pop(fd, None)
        else:
            table[fd] = old
        if fd not in self._readers and fd not in self._writers:
            watch = self._watches.get(fd)
            if watch is not None:
                self._detach(watch)
            if fd in self._threaded and self._thread is not None:
                self._threaded.discard(fd)

    def remove(self, fd: int, write: bool) -> bool:
        table = self._writers if write else self._readers
        handle = table.pop(fd, None)
        if handle is None:
            return False
        handle.cancel()
        last = fd not in self._readers and fd not in self._writers
        if fd in self._threaded:
            assert self._thread is not None
            self._thread.remove(fd, write)
            if last:
                self._threaded.discard(fd)
            return True
        watch = self._watches.get(fd)
        if watch is not None:
            if last:
                self._detach(watch)
            else:
                op, watch.ops[write] = watch.ops[write], None
                if op is not None:
                    try:
                        op.cancel()
                    except Exception:
                        pass
        return True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for watch in list(self._watches.values()):
            self._detach(watch)
        for h in list(self._readers.values()) + list(self._writers.values()):
            h.cancel()
        self._readers.clear()
        self._writers.clear()
        self._threaded.clear()
        if self._thread is not None:
            self._thread.close()

    # ---- completions (in the port's dispatch) ------------------------------

    def _on_poll(self, watch: _Watch, write: int, c: Any) -> None:
        if watch.ops[write] is not c.operation:
            return  # cancelled by remove(), or a watch replaced since
        watch.ops[write] = None
        if self._closed or self._watches.get(watch.fd) is not watch:
            return
        loop = self._loop
        if c.cancelled:
            # Not by us: the registration left the port (its owner
            # unregistered it, or registered a socket of the same fd).
            loop.call_soon(self._reattach, watch)
            return
        err = c.error
        if err is not None and err.errno in _GONE:
            return
        watch.queued[write] = True
        loop._add_callback(events.Handle(self._dispatch, (watch, write), loop, None))
        px = loop._proactor
        if px is not None:
            px._end_run()  # the loop runs the callback this iteration

    def _dispatch(self, watch: _Watch, write: int) -> None:
        watch.queued[write] = False
        fd = watch.fd
        if self._watches.get(fd) is not watch:
            return
        table = self._writers if write else self._readers
        h = table.get(fd)
        if h is None:
            return
        if watch.sock.fileno() != fd:
            # Closed behind our back (io_uring's poll holds the file, so it
            # may still report, a hang-up say): forgotten, as epoll forgets.
            self._detach(watch)
            return
        try:
            if not h._cancelled:
                h._run()  # a Handle: its exceptions go to the exception handler
        finally:
            # Armed again only now, after the callback: level-triggered.
            if (
                fd in table
                and self._watches.get(fd) is watch
                and watch.ops[write] is None
                and not watch.queued[write]
            ):
                self._rearm(watch, write)

    def _rearm(self, watch: _Watch, write: int) -> None:
        try:
            self._arm(watch, write)
        except (OSError, ValueError) as exc:
            if getattr(exc, "errno", None) in _GONE or watch.sock.fileno() != watch.fd:
                self._detach(watch)  # closed behind our back: forgotten
                return
            try:
                self._to_thread(watch.fd)
            except Exception as exc2:
                self._loop.call_exception_handler(
                    {"message": f"cannot watch fd {watch.fd} any more", "exception": exc2}
                )

    def _reattach(self, watch: _Watch) -> None:
        fd = watch.fd
        if self._closed or self._watches.get(fd) is not watch:
            return
        self._detach(watch)
        if fd not in self._readers and fd not in self._writers:
            return
        if watch.ident is None:
            # No identity to compare (Windows: a SOCKET handle has no
            # fstat).  The descriptor is known to be open, and the socket
            # it was, only when the proactor's registration of it replaced
            # ours -- the usual way here (sock_recv on a socket with a
            # reader); anything else is forgotten.
            px = self._loop._proactor
            sock = px._socks.get(fd) if px is not None else None
            if sock is None or sock is watch.sock or sock.fileno() != fd:
                return
        elif _identity(fd) != watch.ident:
            return  # closed (maybe reused) behind our back: forgotten, as epoll does
        try:
            new = self._attach(fd)
            for write, table in ((0, self._readers), (1, self._writers)):
                if fd in table:
                    self._arm(new, write)
        except (OSError, ValueError):
            new = self._watches.get(fd)
            if new is not None:
                self._detach(new)
