"""Every private name of the stdlib's asyncio that iocp.aio relies on.

iocp.aio builds on asyncio's proactor event loop and borrows its
transports, sslproto, the Unix pipe and subprocess transports and the
policy base class.  Those are not public API: names move between
releases (3.14 renamed ``events.BaseDefaultEventLoopPolicy``, deprecated
the policy functions and ``asyncio.iscoroutinefunction``, removed the
child watchers).  So every module-level private name is taken here, once,
behind a version gate, and the rest of iocp.aio imports it from here.
docs/asyncio.md ("Python versions") lists what each gate was checked
against: run on 3.9-3.13, read in the 3.14 and main (3.15) sources.

Private *attributes* of those classes that our subclasses use (a
transport's ``_sock``, ``_write_fut``, ``_loop_writing()``, the proactor
loop's ``_self_reading_future``, ``Server._detach()`` ...) cannot be
imported; they are listed in docs/asyncio.md, and each one whose shape
changed between versions has its gate here (``DETACH_TAKES_TRANSPORT``,
``HAS_RUN_FOREVER_SETUP``).
"""

from __future__ import annotations

import asyncio
import sys
import warnings
from asyncio import base_events, coroutines, events, format_helpers, runners, sslproto, trsock
from asyncio import constants as _constants
from asyncio import futures as _futures
from asyncio import proactor_events as _proactor_events_typed
from asyncio import transports as _transports
from typing import Any, Callable

# typeshed describes only part of these modules' private names.
proactor_events: Any = _proactor_events_typed

PY310 = sys.version_info >= (3, 10)
PY311 = sys.version_info >= (3, 11)
PY312 = sys.version_info >= (3, 12)
PY313 = sys.version_info >= (3, 13)
PY314 = sys.version_info >= (3, 14)

# ---- the proactor loop and its transports (3.9 - 3.15: same names) ------

BaseProactorEventLoop: Any = proactor_events.BaseProactorEventLoop
BaseEventLoop: Any = base_events.BaseEventLoop
ProactorSocketTransport: Any = proactor_events._ProactorSocketTransport
ProactorDatagramTransport: Any = proactor_events._ProactorDatagramTransport
SSLProtocol: Any = sslproto.SSLProtocol
# The loop's lean call_soon/create_task fall back to these (debug mode,
# task factories, 3.13's extra create_task arguments).
base_call_soon: Callable[..., Any] = base_events.BaseEventLoop.call_soon
base_create_task: Callable[..., Any] = base_events.BaseEventLoop.create_task
base_set_debug: Callable[..., Any] = base_events.BaseEventLoop.set_debug
# The socket a transport's get_extra_info("socket") gives (3.8+).
TransportSocket: Any = trsock.TransportSocket
# What the stream transport (_transport.TCPTransport) borrows: the base
# loop.sendfile()'s fallback insists on, sendfile's mode enum, and the
# futures helper the transports resolve their waiters with (3.9 - 3.15).
FlowControlMixin: Any = _transports._FlowControlMixin
SENDFILE_TRY_NATIVE: Any = _constants._SendfileMode.TRY_NATIVE
set_result_unless_cancelled: Any = _futures._set_result_unless_cancelled

# BaseEventLoop._run_forever_setup/_run_forever_cleanup: the hooks
# run_forever() calls around its loop, 3.13+ (not in 3.12.1).  Before,
# run_forever() itself is overridden.
HAS_RUN_FOREVER_SETUP = hasattr(BaseEventLoop, "_run_forever_setup")

# Server._detach() takes the transport from 3.13 on (the server keeps a
# set of them, for close_clients()/abort_clients()).
DETACH_TAKES_TRANSPORT = PY313

# ---- the loop iteration in C (src/aioloop.pxi) ----------------------------
# What the core's aio_run_once needs of the stdlib to behave as
# BaseEventLoop._run_once (3.9 - 3.15: the same names and values): the
# stdlib's own iteration (debug mode runs it) and the thresholds of its
# purge of cancelled timers.

base_run_once: Callable[..., Any] = base_events.BaseEventLoop._run_once
MIN_SCHEDULED_TIMER_HANDLES: int = base_events._MIN_SCHEDULED_TIMER_HANDLES
MIN_CANCELLED_TIMER_HANDLES_FRACTION: float = base_events._MIN_CANCELLED_TIMER_HANDLES_FRACTION
MAXIMUM_SELECT_TIMEOUT: float = base_events.MAXIMUM_SELECT_TIMEOUT


def report_callback_error(handle: Any, exc: BaseException) -> None:
    """A callback the C loop ran raised `exc`: hand it to the loop's
    exception handler with the context Handle._run gives (3.13+ formats
    the callback's source according to the loop's debug flag)."""
    if PY313:
        where = format_helpers._format_callback_source(
            handle._callback, handle._args, debug=handle._loop.get_debug())
    else:
        where = format_helpers._format_callback_source(handle._callback, handle._args)
    context = {"message": f"Exception in callback {where}", "exception": exc, "handle": handle}
    if handle._source_traceback:
        context["source_traceback"] = handle._source_traceback
    handle._loop.call_exception_handler(context)


# ---- Unix pipes, subprocesses, Unix sockets ------------------------------

if sys.platform != "win32":
    from asyncio import unix_events as _unix_events_typed

    _unix_events: Any = _unix_events_typed

    UnixReadPipeTransport: Any = _unix_events._UnixReadPipeTransport
    UnixWritePipeTransport: Any = _unix_events._UnixWritePipeTransport
    UnixSubprocessTransport: Any = _unix_events._UnixSubprocessTransport
    # Its create_unix_connection/create_unix_server are borrowed as they
    # are (they only call loop methods every BaseEventLoop has), so the
    # argument checks and their wording are asyncio's own on each version.
    UnixSelectorEventLoop: Any = _unix_events._UnixSelectorEventLoop
    HAS_UNIX = True
else:  # pragma: no cover
    UnixReadPipeTransport = UnixWritePipeTransport = UnixSubprocessTransport = None
    UnixSelectorEventLoop = None
    HAS_UNIX = False

# ---- policies --------------------------------------------------------------
# 3.14 renamed BaseDefaultEventLoopPolicy to _BaseDefaultEventLoopPolicy
# (and AbstractEventLoopPolicy to _AbstractEventLoopPolicy, reachable as
# asyncio.AbstractEventLoopPolicy only through a module __getattr__ that
# warns), deprecated get/set_event_loop_policy (DeprecationWarning, removal
# planned for 3.16) and kept the work in _get/_set_event_loop_policy.
# None once policies are gone.

BaseDefaultEventLoopPolicy: Any = getattr(
    events, "_BaseDefaultEventLoopPolicy", getattr(events, "BaseDefaultEventLoopPolicy", None)
)

_set_policy: Callable[[Any], None] | None = getattr(events, "_set_event_loop_policy", None)
_get_policy: Callable[[], Any] | None = getattr(events, "_get_event_loop_policy", None)


def set_event_loop_policy(policy: Any) -> None:
    """asyncio.set_event_loop_policy without 3.14's own deprecation warning
    (iocp.aio.install() gives its own, naming the replacement)."""
    if _set_policy is not None:
        _set_policy(policy)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        asyncio.set_event_loop_policy(policy)


def get_event_loop_policy() -> Any:
    """asyncio.get_event_loop_policy without 3.14's deprecation warning."""
    if _get_policy is not None:
        return _get_policy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return asyncio.get_event_loop_policy()


# ---- helpers ---------------------------------------------------------------

# The running loop or None (events.__all__ lists it, but it is private).
get_running_loop_or_none: Callable[[], Any] = events._get_running_loop

# asyncio.iscoroutinefunction warns from 3.14 (use inspect's); the loops
# call coroutines._iscoroutinefunction there, which also accepts the
# pre-3.11 @asyncio.coroutine marker.  Older versions have only the public
# one, which does not warn.
iscoroutinefunction: Callable[[Any], bool] = getattr(
    coroutines, "_iscoroutinefunction", coroutines.iscoroutinefunction
)
iscoroutine: Callable[[Any], bool] = coroutines.iscoroutine

# asyncio.run's end-of-run cancellation, for iocp.aio.run on 3.9/3.10
# (3.11+ uses asyncio.Runner).
cancel_all_tasks: Callable[[Any], None] = getattr(runners, "_cancel_all_tasks", None)  # type: ignore[assignment]


def fill_socket_extra(extra: dict[str, Any], sock: Any) -> None:
    """A transport's "socket", "sockname" and "peername" extra info, as
    asyncio's own transports fill them in (peername kept if given)."""
    extra["socket"] = TransportSocket(sock)
    try:
        extra["sockname"] = sock.getsockname()
    except OSError:
        extra["sockname"] = None
    if "peername" not in extra:
        try:
            extra["peername"] = sock.getpeername()
        except OSError:
            extra["peername"] = None
