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
