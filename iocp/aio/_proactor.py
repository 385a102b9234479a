"""The proactor: asyncio's overlapped-I/O interface on an iocp.CompletionPort.

``asyncio.proactor_events.BaseProactorEventLoop`` drives its transports
through a "proactor" object -- on Windows ``IocpProactor`` in
``asyncio/windows_events.py``.  This is the same interface on
``iocp.CompletionPort``: each method submits one port operation whose
callback resolves an asyncio future; ``select(timeout)`` waits on the port
(GIL released) and runs those callbacks; cancelling a future cancels its
operation; ``close()`` closes the port, which cancels and drains every
operation still in flight.

Submission and the wait: the loop's port is single-issuer (the thread
that runs the loop owns it; see ``claim()``).  Every op is handed to the
port when it is issued -- from a loop callback the port submits it at once;
from a completion callback (inside ``run_once``'s dispatch) io_uring holds
the SQE back and sends it with that ``run_once``'s own ``io_uring_enter``,
before it returns -- so an op never waits for the next ``select()``.
``select(timeout)`` is exactly one ``port.run_once(timeout)``: one wait,
one batch, no posted packet and no ``stop()``.  A completion callback that
raises an Exception goes to the loop's exception handler; a
KeyboardInterrupt or SystemExit (from a callback or a signal handler run
during the wait) leaves ``run_once`` and the loop, and the rest of that
batch is dispatched by the next ``run_once`` first, so no completion is
lost.  ``wake()`` (call_soon_threadsafe) posts one packet from any thread:
the port hands a foreign thread's post to the owner's wait.

Stream sockets go through the port (accept, connect, recv, recv_into,
send); the loop's stream transports sit on ``iocp._core.Stream`` instead
(``_transport``).  Datagram sockets have no port operation: they use the
port's poll ops (``_datagram``, and ``_ready_op`` here for ``sock_*``
calls, through ``_readiness``).  ``sendfile`` is ``os.sendfile``
on the non-blocking socket, waiting on the port's poll op when the socket
is full (where there is no ``os.sendfile`` it reports "not available" and
asyncio falls back to plain sends).
"""

from __future__ import annotations

import asyncio
import collections
import os
import selectors
import socket
import threading
from typing import Any, Callable

from iocp._core import POLLOUT, Completion, CompletionPort, Operation

_os_sendfile = getattr(os, "sendfile", None)

# Bytes one sendfile hands the kernel per loop turn.  A peer that reads as
# fast as the kernel copies (io_uring's multishot recv on the same machine)
# would otherwise keep one os.sendfile loop going for the whole file,
# starving the loop's other work for as long.
_SENDFILE_TURN = 64 * 1024


class OpFuture(asyncio.Future):  # type: ignore[type-arg]
    """A future bound to one port operation: cancelling it cancels the op.

    The op completes exactly once; if the future is already done (it was
    cancelled) its result is dropped -- except an accepted socket, which is
    closed, and what a recv received: a recv cancelled while its op is in
    the kernel may still complete with data (the cancel raced with the
    arrival), and those bytes belong to the socket's stream, so they are
    kept for the next recv on that socket (see ``Proactor._orphan_started``).
    """

    _op: Operation | None = None
    _px: Proactor  # set on the per-proactor subclass
    _sock: socket.socket | None = None  # a recv's socket
    _buf: Any = None  # a recv_into's buffer
    _orphaned = False  # cancelled while its recv was in the kernel

    def cancel(self, msg: Any = None) -> bool:
        op = self._op
        if op is not None:
            self._op = None
            if self._sock is not None and not self.done():
                self._orphaned = True
                self._px._orphan_started(self._sock)
            try:
                op.cancel()
            except Exception:
                pass
        if msg is None:
            return super().cancel()
        return super().cancel(msg)

    # One completion handler per kind; they run in select() or port.close().

    def _fail(self, c: Completion) -> bool:
        self._op = None
        if self.done():
            return True
        if c.cancelled:
            super().cancel()
            return True
        if c.error is not None:
            self.set_exception(c.error)
            return True
        return False

    def _on_recv(self, c: Completion) -> None:
        if self._orphaned:
            self._fail(c)
            self._px._orphan_done(self._sock, c, None)
        elif not self._fail(c):
            self.set_result(c.data)

    def _on_count(self, c: Completion) -> None:
        if self._orphaned:
            self._fail(c)
            self._px._orphan_done(self._sock, c, self._buf)
        elif not self._fail(c):
            self.set_result(c.nbytes)

    def _on_connect(self, c: Completion) -> None:
        if not self._fail(c):
            self.set_result(None)

    def _on_accept(self, c: Completion) -> None:
        if self._fail(c):
            if c.error is None and not c.cancelled:
                c.data[0].close()  # accepted after the future was cancelled
            return
        self.set_result(c.data)


def _is_empty(buf: Any) -> bool:
    """True for a zero-length buffer (cheap for the usual bytearray)."""
    try:
        return len(buf) == 0
    except TypeError:  # a buffer exporter without len()
        with memoryview(buf) as view:
            return view.nbytes == 0


class _RecvGate:
    """A socket's receive side while a cancelled recv is unresolved.

    ``orphans`` counts its cancelled recvs whose op has not completed yet;
    ``stash`` holds the bytes they brought (and ``eof`` / ``error`` what
    ended the stream) until later recvs take them; ``waiting`` holds the
    recvs issued meanwhile, ``(future, nbytes, buffer)``, in order.  A new
    recv is never submitted while an orphan may still bring data: that data
    comes first in the stream.  The gate goes once nothing is left nor to
    come, or when the socket leaves the port (a transport's close, the
    loop's close, its fd reused): bytes nobody asks for stay until then.
    """

    __slots__ = ("stash", "eof", "error", "orphans", "waiting")

    def __init__(self) -> None:
        self.stash = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.orphans = 0
        self.waiting: collections.deque[tuple[OpFuture, int, Any]] = collections.deque()


class Proactor:
    """asyncio proactor on an ``iocp.CompletionPort``."""

    def __init__(self, port: CompletionPort) -> None:
        if not isinstance(port, CompletionPort):
            raise TypeError(f"expected an iocp.CompletionPort, got {type(port).__name__}")
        self._port: CompletionPort | None = port
        self._loop: Any = None
        self._socks: dict[int, socket.socket] = {}
        self._wake_posted = False
        # Set once the loop's thread has claimed the single-issuer port
        # (claim()); until then wake() must not post, or the posting
        # thread would become the port's owner.
        self._claimed = not port.single_issuer
        self._claim_lock = threading.Lock()
        self._owner: threading.Thread | None = None
        self._gates: dict[socket.socket, _RecvGate] = {}
        self._Future: type[OpFuture] = type("OpFuture", (OpFuture,), {"_px": self})
        # Bound once: select() passes it to every run_once.
        self._on_post_handler = self._on_post

    def __repr__(self) -> str:
        return f"<iocp.aio.Proactor port={self._port!r}>"

    @property
    def port(self) -> CompletionPort | None:
        return self._port

    def set_loop(self, loop: Any) -> None:
        self._loop = loop
        port = self._port
        if port is not None and port.exception_handler is None:
            port.exception_handler = self._callback_failed

    def _callback_failed(self, exc: BaseException, c: Any) -> None:
        self._loop.call_exception_handler(
            {"message": "iocp completion handler failed", "exception": exc}
        )

    # ---- registration --------------------------------------------------

    def _register(self, sock: socket.socket) -> CompletionPort:
        port = self._port
        if port is None:
            raise RuntimeError("the event loop's completion port is closed")
        fd = sock.fileno()
        old = self._socks.get(fd)
        if old is sock:
            return port
        if old is not None:  # closed (or re-wrapped) behind our back
            self._gates.pop(old, None)
            try:
                port.unregister(old)
            except (ValueError, OSError):
                pass
        port.register(sock)
        self._socks[fd] = sock
        return port

    def _unregister(self, sock: socket.socket) -> None:
        """Forgets a socket (cancelling its ops) before it is closed."""
        gate = self._gates.pop(sock, None)
        if gate is not None:
            for fut, _, _ in gate.waiting:
                fut.cancel()
        port = self._port
        if port is None or port.closed:
            return
        fd = sock.fileno()
        if fd >= 0:
            if self._socks.get(fd) is not sock:
                return
            del self._socks[fd]
        else:
            for k, s in self._socks.items():
                if s is sock:
                    del self._socks[k]
                    break
            else:
                return
        try:
            port.unregister(sock)
        except (ValueError, OSError):
            pass

    def _start(
        self, fut: OpFuture, submit: Callable[..., Operation], *args: Any
    ) -> OpFuture:
        """Submits ``fut``'s op now (an error, e.g. the socket was closed
        meanwhile, resolves the future instead)."""
        try:
            fut._op = submit(*args)
        except Exception as exc:
            fut.set_exception(exc)
        return fut

    # ---- stream operations ---------------------------------------------

    def _stream(self, conn: socket.socket, flags: int) -> CompletionPort | None:
        """The port, with ``conn`` registered; None for what the port cannot
        do (datagram sockets, flags), which then goes through readiness."""
        if not flags and self._socks.get(conn.fileno()) is conn:
            return self._port  # the hot path: a registered stream socket
        if flags or conn.type == socket.SOCK_DGRAM:
            return None
        return self._register(conn)

    def recv(self, conn: socket.socket, nbytes: int, flags: int = 0) -> asyncio.Future[Any]:
        port = self._stream(conn, flags)
        if port is None or nbytes == 0:  # recv(0) is b"" at once, as on a selector loop
            return self._ready_op(conn, False, lambda: conn.recv(nbytes, flags))
        fut = self._Future(loop=self._loop)
        fut._sock = conn
        gate = self._gates.get(conn)
        if gate is None:
            self._start(fut, port.recv, conn, nbytes, fut._on_recv)
        else:
            gate.waiting.append((fut, nbytes, None))
            self._serve(conn, gate)
        return fut

    def recv_into(self, conn: socket.socket, buf: Any, flags: int = 0) -> asyncio.Future[Any]:
        port = self._stream(conn, flags)
        if port is None or _is_empty(buf):
            return self._ready_op(conn, False, lambda: conn.recv_into(buf, 0, flags))
        fut = self._Future(loop=self._loop)
        fut._sock = conn
        fut._buf = buf
        gate = self._gates.get(conn)
        if gate is None:
            self._start(fut, port.recv_into, conn, buf, fut._on_count)
        else:
            gate.waiting.append((fut, 0, buf))
            self._serve(conn, gate)
        return fut

    # ---- cancelled recvs: keep what they received ------------------------

    def _orphan_started(self, sock: socket.socket) -> None:
        """A recv future of ``sock`` was cancelled with its op in flight."""
        gate = self._gates.get(sock)
        if gate is None:
            gate = self._gates[sock] = _RecvGate()
        gate.orphans += 1

    def _orphan_done(self, sock: Any, c: Completion, buf: Any) -> None:
        """The op of a cancelled recv completed: keep what it brought."""
        gate = self._gates.get(sock)
        if gate is None:  # the socket left the port meanwhile
            return
        gate.orphans -= 1
        if not c.cancelled:
            if c.error is not None:
                if gate.error is None:
                    gate.error = c.error
            elif buf is None:
                if c.data:
                    gate.stash += c.data
                else:
                    gate.eof = True
            elif c.nbytes:
                with memoryview(buf) as view:
                    gate.stash += view.cast("B")[: c.nbytes]
            else:
                gate.eof = True
        self._serve(sock, gate)

    def _serve(self, sock: socket.socket, gate: _RecvGate) -> None:
        """Resolves the waiting recvs of ``sock`` from what the orphans
        left, in order; once nothing is left nor to come, submits the rest
        and forgets the gate."""
        waiting = gate.waiting
        stash = gate.stash
        while waiting:
            fut, nbytes, buf = waiting[0]
            if fut.done():  # cancelled while waiting: it never had an op
                waiting.popleft()
                continue
            if stash:
                waiting.popleft()
                if buf is None:
                    data = bytes(stash[:nbytes])
                    del stash[:nbytes]
                    fut.set_result(data)
                else:
                    with memoryview(buf) as view:
                        dst = view.cast("B")
                        n = min(len(dst), len(stash))
                        dst[:n] = stash[:n]
                    del stash[:n]
                    fut.set_result(n)
            elif gate.error is not None:
                waiting.popleft()
                exc, gate.error = gate.error, None
                fut.set_exception(exc)
            elif gate.eof:
                waiting.popleft()
                fut.set_result(b"" if buf is None else 0)
            elif gate.orphans:
                return  # what they bring comes first
            else:
                break
        if gate.orphans or stash or gate.error is not None:
            return
        del self._gates[sock]
        port = self._port
        for fut, nbytes, buf in waiting:
            if fut.done():
                continue
            if port is None:
                fut.cancel()
            elif buf is None:
                self._start(fut, port.recv, sock, nbytes, fut._on_recv)
            else:
                self._start(fut, port.recv_into, sock, buf, fut._on_count)

    def send(self, conn: socket.socket, buf: Any, flags: int = 0) -> asyncio.Future[Any]:
        port = self._stream(conn, flags)
        if port is None:
            return self._ready_op(conn, True, lambda: conn.send(buf, flags))
        fut = self._Future(loop=self._loop)
        if not buf:
            fut.set_result(0)
            return fut
        return self._start(fut, port.send, conn, buf, fut._on_count)

    def accept(self, listener: socket.socket) -> asyncio.Future[Any]:
        port = self._register(listener)
        fut = self._Future(loop=self._loop)
        return self._start(fut, port.accept, listener, fut._on_accept)

    def connect(self, conn: socket.socket, address: Any) -> asyncio.Future[Any]:
        if conn.type == socket.SOCK_DGRAM:
            fut: asyncio.Future[Any] = self._loop.create_future()
            try:
                conn.connect(address)  # immediate for datagram sockets
            except OSError as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(None)
            return fut
        port = self._register(conn)
        fut = self._Future(loop=self._loop)
        # Submitted now, as every op: the SYN goes out before the caller's
        # next step, which may block on the peer (as a selector loop's
        # non-blocking connect() does).
        return self._start(fut, port.connect, conn, address, fut._on_connect)

    def sendfile(
        self, sock: socket.socket, file: Any, offset: int, count: int
    ) -> asyncio.Future[Any]:
        """Sends ``count`` bytes of ``file`` from ``offset`` with
        ``os.sendfile`` (the kernel copies, as TransmitFile does for
        Windows' proactor): what the socket takes now, the rest each time a
        poll op reports it writable.  The future's result is the count sent
        (less only if the file ends first); cancelling it stops at once.
        If it fails part way, the file position is left after the last
        byte sent, as the selector loops leave it."""
        if _os_sendfile is None or sock.type != socket.SOCK_STREAM:
            raise asyncio.SendfileNotAvailableError("no native sendfile on this platform")
        try:
            port = self._register(sock)
        except ValueError:
            # Already registered, by the stream core under a TCPTransport
            # (iocp._core.Stream registers its socket itself): its port is
            # this one, and the poll ops below go through that registration.
            port = self._port
            if port is None or sock.fileno() < 0:
                raise
        fut: asyncio.Future[Any] = self._loop.create_future()
        fd, in_fd = sock.fileno(), file.fileno()
        sent = 0
        poll_op: Operation | None = None

        def attempt() -> bool:
            """Sends what the socket takes, at most _SENDFILE_TURN bytes;
            True once ``fut`` is resolved."""
            nonlocal sent
            turn_end = sent + _SENDFILE_TURN
            while sent < count:
                if sent >= turn_end:
                    return False  # the rest from the next writable report
                try:
                    n = _os_sendfile(fd, in_fd, offset + sent, min(count - sent, turn_end - sent))
                except (BlockingIOError, InterruptedError):
                    return False
                except BaseException as exc:
                    if sent:  # the loop seeks past whole blocks only
                        file.seek(offset + sent)
                    fut.set_exception(exc)
                    return True
                if n == 0:  # the file ended
                    break
                sent += n
            fut.set_result(sent)
            return True

        def on_writable(c: Completion) -> None:
            nonlocal poll_op
            poll_op = None
            if fut.done():
                return
            if c.cancelled:
                fut.cancel()
            elif c.error is not None:
                fut.set_exception(c.error)
            elif not attempt():
                poll_op = port.poll(sock, POLLOUT, on_writable)

        def on_done(f: Any) -> None:
            if poll_op is not None:
                try:
                    poll_op.cancel()
                except Exception:
                    pass

        # Like an overlapped TransmitFile, the send starts from the port --
        # here the first writable report -- never inside this call: a
        # sendfile that the peer's reads let finish at once would otherwise
        # end before the caller's next line, which asyncio's callers (and
        # tests) do not expect of the proactor.
        poll_op = port.poll(sock, POLLOUT, on_writable)
        fut.add_done_callback(on_done)
        return fut

    def _end_run(self) -> None:
        """Asked by completion handlers that queue loop callbacks (readiness,
        datagrams) to end select()'s wait after this batch: nothing to do,
        run_once() returns after every batch."""

    # ---- datagrams: readiness ------------------------------------------

    def recvfrom(self, conn: socket.socket, nbytes: int, flags: int = 0) -> asyncio.Future[Any]:
        return self._ready_op(conn, False, lambda: conn.recvfrom(nbytes, flags))

    def recvfrom_into(
        self, conn: socket.socket, buf: Any, nbytes: int = 0, flags: int = 0
    ) -> asyncio.Future[Any]:
        return self._ready_op(conn, False, lambda: conn.recvfrom_into(buf, nbytes, flags))

    def sendto(
        self, conn: socket.socket, buf: Any, flags: int = 0, addr: Any = None
    ) -> asyncio.Future[Any]:
        if addr is None:
            return self._ready_op(conn, True, lambda: conn.send(buf, flags))
        return self._ready_op(conn, True, lambda: conn.sendto(buf, flags, addr))

    def _ready_op(
        self, sock: socket.socket, write: bool, attempt: Callable[[], Any]
    ) -> asyncio.Future[Any]:
        """Tries a non-blocking call now, else when the fd is ready."""
        loop = self._loop
        fut: asyncio.Future[Any] = loop.create_future()
        try:
            fut.set_result(attempt())
            return fut
        except (BlockingIOError, InterruptedError):
            pass
        except BaseException as exc:
            fut.set_exception(exc)
            return fut
        fd = sock.fileno()
        readiness = loop._readiness_thread()

        def on_ready() -> None:
            if fut.done():
                return
            try:
                result = attempt()
            except (BlockingIOError, InterruptedError):
                return
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        def done(f: Any) -> None:
            if readiness._closed:
                return
            table = readiness._writers if write else readiness._readers
            h = table.get(fd)
            if h is not None and h._callback is on_ready:
                readiness.remove(fd, write)

        readiness.add(fd, write, on_ready, ())
        fut.add_done_callback(done)
        return fut

    def get_key(self, fd: Any) -> Any:
        """The one selector method asked of the loop's ``_selector`` (this
        proactor) outside select(): the stdlib Unix pipe transports' repr()
        reads the fd's readiness registration through it."""
        readiness = getattr(self._loop, "_readiness", None)
        fd = fd if isinstance(fd, int) else fd.fileno()
        events = 0
        if readiness is not None and not readiness._closed:
            events = (selectors.EVENT_READ if fd in readiness._readers else 0) | (
                selectors.EVENT_WRITE if fd in readiness._writers else 0
            )
        if not events:
            raise KeyError(fd)
        return selectors.SelectorKey(fd, fd, events, None)

    # ---- the wait ------------------------------------------------------

    def claim(self) -> None:
        """Makes the calling thread the owner of the loop's single-issuer
        port; the loop calls it as each run starts, in the running thread.

        Creating a loop does not touch the port, so a loop may be created in
        one thread and run in another.  The port stays the first running
        thread's (the kernel binds a single-issuer io_uring to it): running
        the loop later in another thread raises RuntimeError here, before
        the run starts.  Until the claim, ``wake()`` does not post (a post
        would make the posting thread the owner); it need not: the loop is
        not waiting then, and the callback that asked for the wake-up is
        already in the ready queue its first iteration reads.
        """
        port = self._port
        if port is None:
            raise RuntimeError("the event loop's completion port is closed")
        me = threading.current_thread()
        owner = self._owner
        if owner is not None and owner is not me:
            # The port checks thread idents, which a new thread may reuse
            # once the owner has exited; the kernel would then refuse the
            # new thread's calls.  The Thread object tells them apart.
            raise RuntimeError(
                f"this single-issuer completion port is owned by thread {owner.ident} "
                f"({owner.name}{'' if owner.is_alive() else ', exited'}) and cannot be "
                f"used from thread {me.ident} ({me.name})"
            )
        if self._claimed:
            port.flush()  # raises RuntimeError on a thread that is not the owner
            return
        with self._claim_lock:
            port.flush()  # the first owner-checked call: this thread owns it
            if port.single_issuer:
                self._owner = me
            self._claimed = True

    def wake(self) -> None:
        """Wakes select() from any thread (call_soon_threadsafe)."""
        if self._wake_posted:
            return
        port = self._port
        if port is None:
            return
        if not self._claimed:
            with self._claim_lock:
                if not self._claimed:
                    return  # not running yet (see claim())
        self._wake_posted = True
        try:
            port.post()
        except (ValueError, OSError, RuntimeError):
            self._wake_posted = False

    def select(self, timeout: float | None = None) -> list[Any]:
        """One loop iteration's wait: exactly one ``port.run_once``."""
        port = self._port
        if port is None:
            raise RuntimeError("the event loop's completion port is closed")
        port.run_once(timeout, self._on_post_handler)
        return []

    def _on_post(self, c: Completion) -> None:
        """run_once()'s handler: the wake-up posts of call_soon_threadsafe."""
        self._wake_posted = False

    def _stop_serving(self, obj: socket.socket) -> None:
        self._unregister(obj)

    def close(self) -> None:
        port = self._port
        if port is None:
            return
        gates, self._gates = self._gates, {}
        for gate in gates.values():
            for fut, _, _ in gate.waiting:
                fut.cancel()
        port.close()  # cancels every op and runs its handler: futures cancelled
        self._socks.clear()
        self._port = None
