"""Pre-fork workers for :meth:`iocp.server.Server.serve_forever` (``workers > 1``).

Design note.  The parent binds the address once (resolving ``port=0``) to
pin it, then forks; each worker opens its own listening socket on the same
address with SO_REUSEPORT and its own completion port (a port cannot cross
``fork()``), so the kernel spreads connections over the processes.  Each
worker writes one byte to a pipe once it listens; the parent calls
``ready()`` when all have, forwards SIGINT/SIGTERM to them and returns 1 if
any exited with a non-zero status.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, List

from iocp.server._util import log

if TYPE_CHECKING:
    from iocp.server._server import Server


def serve_workers(
    server: Server,
    threads: int,
    workers: int,
    handle_signals: bool,
    ready: Callable[[], Any] | None,
) -> int:
    """Run ``server`` in ``workers`` forked processes; return the exit status."""
    if not hasattr(os, "fork") or not hasattr(socket, "SO_REUSEPORT"):
        raise NotImplementedError("workers > 1 needs fork() and SO_REUSEPORT (Linux)")
    if server.path is not None:
        raise ValueError("workers > 1 is for TCP; Unix sockets cannot share a path")
    if server._started:
        raise RuntimeError("serve_forever(workers=...) must be called before start()")
    if server._given_port is not None:
        # Each worker makes its own port after fork(); a port cannot be
        # used in a process other than the one that created it.
        raise ValueError("workers > 1 creates a port in each forked worker; "
                         "a completion_port= cannot be shared across fork()")
    server.reuse_port = True
    reserve = server.bind()  # pins the port (resolves port=0) for the workers
    server.port = reserve.getsockname()[1]
    server._sock = None
    pids: List[int] = []
    rfd, wfd = os.pipe()  # each worker writes one byte once it listens
    for i in range(workers):
        pid = os.fork()
        if pid == 0:  # worker
            code = 1
            try:
                reserve.close()
                os.close(rfd)
                server.worker_id = i
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)

                def listening() -> None:
                    os.write(wfd, b"r")
                    os.close(wfd)

                code = server._serve_here(threads, handle_signals=True, ready=listening)
            except BaseException:
                log.exception("worker %d failed", i)
            finally:
                logging.shutdown()
                os._exit(code)
        pids.append(pid)
    os.close(wfd)
    got = 0
    while got < workers:  # EOF early means a worker died before listening
        try:
            chunk = os.read(rfd, workers)
        except InterruptedError:
            continue
        if not chunk:
            break
        got += len(chunk)
    os.close(rfd)
    reserve.close()
    if got == workers and ready is not None:
        ready()

    def forward(signum: int, _frame: Any) -> None:
        for p in pids:
            try:
                os.kill(p, signum)
            except OSError:
                pass

    old: Dict[int, Any] = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            old[signum] = signal.signal(signum, forward)
    status = 0
    try:
        remaining = set(pids)
        while remaining:
            try:
                pid, st = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid in remaining:
                remaining.discard(pid)
                code = os.waitstatus_to_exitcode(st)
                if code != 0:
                    log.error("worker pid %d exited with %d", pid, code)
                    status = 1
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return status


# Signals that ask a server to shut down gracefully.  On Windows, Ctrl-Break
