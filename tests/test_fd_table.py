"""Descriptor values at the edges of the per-socket tables (issue 9, bounds).

The Linux backends index per-socket state by descriptor and grow the table
to fit.  A huge value (a real descriptor dup2()ed high, or a made-up
``fileno()``) must either work or give a clear error -- never an integer
overflow in the growth, and never a value silently cut down to another
socket's descriptor.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

from .helpers import close_all, tcp_pair

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX descriptors")

# Runs in a fresh interpreter, so a growth loop that never ends (the old
# code doubled an int past INT_MAX) fails the test by timeout.
FAKE = textwrap.dedent(
    r"""
    import json, socket, sys
    import iocp

    class Fake(socket.socket):
        value = 0
        def fileno(self):
            return self.value

    port = iocp.CompletionPort(backend=sys.argv[1])
    real = socket.socket()
    out = {}
    for name, value in [("int_max", 2**31 - 1), ("2^30+1", 2**30 + 1),
                        ("2^31", 2**31), ("alias", 2**32 + real.fileno()),
                        ("2^40", 2**40)]:
        s = Fake()
        s.value = value
        try:
            port.register(s)
            out[name] = "registered"
        except (OSError, OverflowError, ValueError) as exc:
            out[name] = [type(exc).__name__, getattr(exc, "errno", None)]
        s.value = -1
        s.close()
    # The real socket behind the would-be alias is still free to register.
    try:
        port.register(real)
        port.unregister(real)
        out["real"] = "ok"
    except Exception as exc:
        out["real"] = repr(exc)
    real.close()
    port.close()
    print(json.dumps(out))
    """
)


def test_made_up_huge_fileno_is_a_clear_error(backend: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", FAKE, backend], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.splitlines()[-1])
    # Within a C int: not an open descriptor, so EBADF (before the fix the
    # epoll table doubled its int size past INT_MAX and never returned).
    for name in ("int_max", "2^30+1"):
        assert out[name] == ["OSError", errno.EBADF], out
    # Beyond it: refused by the conversion to the native descriptor type,
    # never truncated to some other descriptor.
    for name in ("2^31", "alias", "2^40"):
        assert out[name] in (["OverflowError", None], ["OSError", errno.EBADF]), out
    assert out["real"] == "ok", out


@pytest.mark.skipif(resource is None, reason="needs RLIMIT_NOFILE")
def test_real_descriptor_near_the_limit_works(make_port) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = hard if hard != resource.RLIM_INFINITY else 1 << 17
    limit = min(limit, 1 << 17)
    if limit < 1024:
        pytest.skip("RLIMIT_NOFILE too low for a high descriptor")
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        port = make_port()
        a, b = tcp_pair()
        high = limit - 1
        os.dup2(a.fileno(), high)
        a.close()
        a = socket.socket(fileno=high)
        assert a.fileno() == high
        port.register(a)
        b.sendall(b"high")
        op = port.recv(a, 10)
        c = port.get(timeout=10)
        assert c is not None and c.operation is op and c.data == b"high"
        sent = port.send(a, b"fd")
        c = port.get(timeout=10)
        assert c is not None and c.operation is sent and c.ok
        b.settimeout(10)
        assert b.recv(10) == b"fd"
        close_all(port, a, b)
        port.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

