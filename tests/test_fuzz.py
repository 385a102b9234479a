"""Bad input never crashes the process: random calls with random arguments
(wrong types, sizes, closed sockets, foreign objects) on a live port only
ever raise TypeError / ValueError / OverflowError / OSError, and the port is
left with nothing leaked."""

from __future__ import annotations

import array
import socket

import pytest

import iocp
from tests.helpers import tcp_pair

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ALLOWED = (TypeError, ValueError, OverflowError, OSError, BufferError)

ARGS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=64),
    st.sampled_from(["sock", "closed", "listener", "bytearray", "memoryview",
                     "array", "object", "tuple", "list"]),
)
CALLS = st.lists(
    st.tuples(
        st.sampled_from(["register", "unregister", "accept", "connect", "recv",
                         "recv_into", "send", "sendmsg", "post", "get",
                         "get_many", "cancel"]),
        st.lists(ARGS, max_size=4),
    ),
    min_size=1,
    max_size=12,
)


def _materialize(arg, env):
    if isinstance(arg, str) and arg in env:
        return env[arg]
    return arg


@pytest.mark.parametrize("backend", list(iocp.backends()))
@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=CALLS)
def test_random_calls_never_crash(backend, calls):
    port = iocp.CompletionPort(backend=backend)
    client, server = tcp_pair()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    closed = socket.socket()
    closed.close()
    port.register(server)
    env = {
        "sock": server, "closed": closed, "listener": listener,
        "bytearray": bytearray(16), "memoryview": memoryview(bytearray(8)),
        "array": array.array("i", [1, 2]), "object": object(),
        "tuple": ("127.0.0.1", 1), "list": [b"a", bytearray(b"b")],
    }
    ops = []
    try:
        for name, raw in calls:
            args = [_materialize(a, env) for a in raw]
            try:
                if name == "cancel":
                    for op in ops:
                        op.cancel()
                    continue
                if name in ("get", "get_many"):
                    # never block: a timeout argument is forced to 0
                    args = args[:1] if name == "get_many" else []
                    getattr(port, name)(*args, timeout=0)
                    continue
                result = getattr(port, name)(*args)
                if isinstance(result, iocp.Operation):
                    ops.append(result)
            except ALLOWED:
                pass
    finally:
        port.close()
        for s in (client, server, listener):
            s.close()
    stats = port.stats()
    assert stats["live_ops"] == 0 and stats["inflight"] == 0, stats
    assert stats["pinned_buffers"] == 0 and stats["live_buffers"] == 0, stats


# ---- every public type, built and poked from Python (issue 9, item 4) -----
#
# `iocp.Completion()` used to build a Completion without an operation, and
# its repr, str and .kind dereferenced NULL: the process died.  Each public
# class must be safe to build and use from Python, or refuse to be built
# with TypeError.  The types are enumerated from the public namespaces, so
# a new one is covered without touching this file.  A segfault cannot be
# caught in-process, so the fuzzing runs in a child pytest and the parent
# reports how it died.

import asyncio  # noqa: E402
import inspect  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import iocp.aio  # noqa: E402
from iocp import _core  # noqa: E402

CHILD_ENV = "IOCP_FUZZ_PUBLIC_TYPES_CHILD"
# What code of this package may raise for bad arguments (RuntimeError:
# e.g. a method called in the wrong state).
STRICT = ALLOWED + (RuntimeError,)

# Methods that wait without a bound, bind or reach the network with the
# arguments given (a random host would be a DNS query), or change process
# state (signal handlers, the global event loop, executors).  Each is
# covered by its own tests; the rest is called with random arguments.
NOT_CALLED = {
    "run_forever", "run_until_complete", "serve_forever", "start", "bind",
    "add_signal_handler", "remove_signal_handler", "set_event_loop",
    "get_event_loop", "set_child_watcher", "get_child_watcher",
    "run_in_executor", "set_default_executor", "shutdown_default_executor",
    "select",
}
# Methods whose waits take a timeout: always called with timeout=0.
TIMED = {"run", "run_once", "get", "get_many", "wait_closed", "shutdown", "close"}


def _public_types() -> list:
    found = {}
    for mod in (iocp, _core, iocp.aio):
        names = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        for name in names:
            obj = getattr(mod, name)
            if isinstance(obj, type):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[k] for k in sorted(found)]


PUBLIC_TYPES = _public_types()

TYPE_ARGS = st.one_of(
    ARGS,
    st.sampled_from(["protocol", "port", "completion", "none"]),
)


def _ours(cls: type, name: str) -> bool:
    """True if `name` is defined by this package (not inherited from the
    standard library, whose argument checks are not ours to police).

    The methods of the asyncio layer (iocp.aio) are held to "no crash"
    only: asyncio's loop calls them with arguments it has already checked,
    and they do not type-check theirs (a non-socket raises AttributeError).
    Building those types is held to the strict rule like every other."""
    if cls.__module__.startswith("iocp.aio"):
        return False
    for klass in cls.__mro__:
        if name in vars(klass):
            return klass.__module__.startswith("iocp")
    return False


def _settle(value) -> None:
    """Closes what a call handed back (coroutines, loops, ports)."""
    if inspect.iscoroutine(value):
        value.close()
    elif isinstance(value, (asyncio.AbstractEventLoop, iocp.CompletionPort)):
        value.close()


def _poke(obj, draw_args, env) -> None:
    cls = type(obj)
    for fn in (repr, str):
        fn(obj)
    for name in sorted(dir(obj)):
        if name.startswith("_"):
            continue
        expected = STRICT if _ours(cls, name) else (Exception,)
        try:
            attr = getattr(obj, name)
        except expected:
            continue
        if not callable(attr) or isinstance(attr, type) or name in NOT_CALLED:
            continue
        args = [_materialize(a, env) for a in draw_args()]
        kwargs = {}
        if name in TIMED:
            try:
                if "timeout" in inspect.signature(attr).parameters:
                    kwargs["timeout"] = 0
                    args = args[:1] if name == "get_many" else []
            except (TypeError, ValueError):   # no signature (a C method)
                pass
        try:
            _settle(attr(*args, **kwargs))
        except expected:
            pass


def _fuzz_env(port) -> dict:
    port.post("seed")
    completion = port.get(timeout=5)
    return {
        "protocol": iocp.Protocol, "port": port, "completion": completion,
        "none": None, "object": object(), "bytearray": bytearray(16),
        "memoryview": memoryview(bytearray(8)), "array": array.array("i", [1, 2]),
        "tuple": ("127.0.0.1", 1), "list": [b"a", bytearray(b"b")],
    }


@pytest.mark.skipif(os.environ.get(CHILD_ENV) != "1", reason="runs in the child process")
@pytest.mark.parametrize("cls", PUBLIC_TYPES, ids=lambda c: c.__qualname__)
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_child_public_type_from_python(cls, data):
    port = iocp.CompletionPort()
    env = _fuzz_env(port)
    made = []
    try:
        args = [_materialize(a, env) for a in data.draw(st.lists(TYPE_ARGS, max_size=6))]
        try:
            obj = cls(*args)
        except STRICT:
            obj = None
        if obj is not None:
            made.append(obj)
            _poke(obj, lambda: data.draw(st.lists(TYPE_ARGS, max_size=4)), env)
        # The no-argument form, and for the compiled types (whose fields
        # are C pointers) __new__ without __init__: refuse or be safe.
        makers = [cls]
        if cls.__module__ == _core.__name__:
            makers.append(lambda: cls.__new__(cls))
        for make in makers:
            try:
                extra = make()
            except STRICT:
                continue
            made.append(extra)
            _poke(extra, lambda: data.draw(st.lists(TYPE_ARGS, max_size=4)), env)
    finally:
        for obj in made:
            close = getattr(obj, "close", None)
            if callable(close) and not isinstance(obj, BaseException):
                try:
                    _settle(close())
                except Exception:   # noqa: S110 -- cleanup of fuzzed objects
                    pass
        port.close()


@pytest.mark.skipif(os.environ.get(CHILD_ENV) == "1", reason="this is the child")
def test_every_public_type_is_safe_to_build_and_poke():
    """Runs the fuzzing above in a child process: a crash (segfault,
    abort) fails this test with the signal, instead of killing the run."""
    assert {"Completion", "Operation", "CompletionPort", "Server", "EventLoop"} <= {
        t.__name__ for t in PUBLIC_TYPES}
    env = dict(os.environ, **{CHILD_ENV: "1"})
    proc = subprocess.run(
        [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "-W", "ignore::RuntimeWarning", "-W", "ignore::DeprecationWarning",
         f"{__file__}::test_child_public_type_from_python"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode >= 0, f"the fuzzed process died by signal {-proc.returncode}:\n{tail}"
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout, tail
