"""Values at or past the limits of the native types (issue 9, item 8
"Bounds"): each raises a clear error or is clamped, on every backend, and
never reaches undefined behaviour (the UBSan build, tests/asan.sh, runs
these too)."""

from __future__ import annotations

import socket
import struct
import sys
import threading

import pytest

import iocp
from iocp import _core
from tests.helpers import close_all, tcp_pair

# ---- queue_capacity ------------------------------------------------------

QMAX = 1 << 24   # IOCP_QUEUE_CAPACITY_MAX


@pytest.mark.parametrize(
    "capacity, exc",
    [
        (2**31, ValueError),          # > INT_MAX: was accepted, then reaped as a negative int
        (2**31 - 1, ValueError),
        (2**32 - 1, ValueError),
        (QMAX + 1, ValueError),
        (2**32, OverflowError),       # does not fit the C unsigned
        (2**64, OverflowError),
        (-1, OverflowError),
        (0, ValueError),
    ],
)
def test_queue_capacity_out_of_range_is_refused(backend, capacity, exc):
    with pytest.raises(exc):
        iocp.CompletionPort(backend=backend, queue_capacity=capacity)


def test_queue_capacity_at_the_limit_works(make_port):
    port = make_port(queue_capacity=QMAX)
    assert port.stats()["queue_capacity"] == QMAX
    port.post(7)
    assert port.get(timeout=5).key == 7


# ---- timeouts ------------------------------------------------------------


def _bounded_call(port, method: str, timeout) -> list:
    """port.<method>(timeout=...) on a thread, unblocked (stop + post) and
    reported if it is still waiting after 5 s: a broken timeout conversion
    must fail the test, not hang it."""
    result: list = []

    def call():
        try:
            result.append(getattr(port, method)(timeout=timeout))
        except BaseException as exc:  # reported by the caller
            result.append(exc)

    t = threading.Thread(target=call)
    t.start()
    t.join(5)
    hung = t.is_alive()
    if hung:
        port.stop()
        port.post("unblock")
        t.join(5)
    assert not hung, f"{method}(timeout={timeout!r}) was still waiting after 5 s"
    return result


@pytest.mark.parametrize("method", ["get", "get_many", "run"])
@pytest.mark.parametrize("timeout", [float("nan"), -1, -1e-9, float("-inf")])
def test_nan_and_negative_timeouts_raise_value_error(port, method, timeout):
    result = _bounded_call(port, method, timeout)
    assert isinstance(result[0], ValueError), result
    # The port still works.
    port.post(1)
    assert port.get(timeout=5).key == 1


@pytest.mark.parametrize("method", ["get", "get_many", "run"])
@pytest.mark.parametrize("timeout", ["1", b"1", object(), [1]])
def test_non_number_timeouts_raise_type_error(port, method, timeout):
    with pytest.raises(TypeError):
        getattr(port, method)(timeout=timeout)


@pytest.mark.parametrize("method", ["get", "get_many", "run"])
def test_timeout_too_large_for_a_float_raises_overflow_error(port, method):
    with pytest.raises(OverflowError):
        getattr(port, method)(timeout=10**400)


@pytest.mark.parametrize("method", ["get", "get_many", "run"])
@pytest.mark.parametrize("timeout", [1e300, 2**63, 1e10, 2**31 / 1000 + 1, float("inf")])
def test_huge_timeouts_wait_in_slices(port, method, timeout):
    """A timeout past what a native int of milliseconds holds (it was cast
    with `<int>(t * 1000)`, undefined behaviour) waits like a very long
    timeout: here a post from another thread ends the wait."""
    got = []

    def on_post(c):
        got.append(c.key)
        port.stop()

    # Posted while the waiter is (or is about to be) in its wait, from a
    # thread that is not the main one, so the wait is not cut into the
    # 50 ms signal slices: the long slice itself is what is exercised.
    result = []

    def waiter():
        try:
            if method == "run":
                result.append(port.run(timeout=timeout))
            else:
                result.append(getattr(port, method)(timeout=timeout))
        except BaseException as exc:  # reported below
            result.append(exc)

    t = threading.Thread(target=waiter)
    t.start()
    port.post(9, callback=on_post)
    t.join(10)
    assert not t.is_alive(), "a huge timeout never returned after a post"
    assert not isinstance(result[0], BaseException), result
    if method == "run":
        assert got == [9]
    elif method == "get":
        assert result[0].key == 9
    else:
        assert [c.key for c in result[0]] == [9]


# ---- addresses -----------------------------------------------------------


@pytest.fixture
def inet_socks(port):
    s4 = socket.socket()
    s6 = socket.socket(socket.AF_INET6)
    port.register(s4)
    port.register(s6)
    yield s4, s6
    close_all(port, s4, s6)


@pytest.mark.parametrize(
    "family, address, exc",
    [
        (4, ("127.0.0.1", 80, 0), TypeError),           # AF_INET takes a pair
        (4, ("::1", 80, 0, 0), TypeError),              # an AF_INET6 tuple
        (4, ("127.0.0.1",), TypeError),
        (6, ("::1", 80, 0, 0, 0), TypeError),
        (6, ("::1", 1, 2**20, 0), OverflowError),       # flowinfo is 20 bits
        (6, ("::1", 1, -1, 0), OverflowError),
        (6, ("::1", 1, 0, 2**32), OverflowError),       # scope id is 32 bits
        (6, ("::1", 1, 0, 2**64), OverflowError),
        (6, ("::1", 1, 0, -1), OverflowError),
        (6, ("::1", 1, 0, "0"), TypeError),
        (4, ("127.0.0.1\0evil", 80), ValueError),        # was silently truncated
        (4, ("127.0.0.1", 2**64), ValueError),
        (4, ("127.0.0.1", -1), ValueError),
    ],
)
def test_bad_inet_addresses_raise(port, inet_socks, family, address, exc):
    sock = inet_socks[0] if family == 4 else inet_socks[1]
    with pytest.raises(exc):
        port.connect(sock, address)
    assert port.stats()["live_ops"] == 0


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs AF_UNIX")
@pytest.mark.parametrize(
    "path",
    ["x" * 108, "x" * 200, "x" * 5000, b"\0" + b"a" * 200, ""],
)
def test_unix_path_that_does_not_fit_sockaddr_storage_raises(port, path):
    sock = socket.socket(socket.AF_UNIX)
    port.register(sock)
    try:
        with pytest.raises(ValueError):
            port.connect(sock, path)
        assert port.stats()["live_ops"] == 0
    finally:
        close_all(port, sock)


def _sun(path: bytes) -> bytes:
    return struct.pack("=H", socket.AF_UNIX) + path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sockaddr layout of Linux")
@pytest.mark.parametrize("length", [129, 4096, 2**31 - 1])
def test_address_length_past_sockaddr_storage_is_clamped(length):
    """The kernel reports an address's full length even when it truncated
    it; parsing must stop at sockaddr_storage (128 bytes) and sun_path (108
    bytes), never read past them (it used to copy up to 511 bytes)."""
    raw = _sun(b"a" * 126)            # fills the whole storage, no NUL
    path = _core._test_parse_address(raw, length)
    assert path == "a" * 108
    inet6 = struct.pack("=HHI16sI", socket.AF_INET6, socket.htons(80), 0,
                        socket.inet_pton(socket.AF_INET6, "::1"), 3)
    assert _core._test_parse_address(inet6, length) == ("::1", 80, 0, 3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sockaddr layout of Linux")
def test_address_lengths_too_short_for_the_family():
    inet = struct.pack("=HH4s", socket.AF_INET, socket.htons(80), socket.inet_aton("1.2.3.4"))
    assert _core._test_parse_address(inet, 16) == ("1.2.3.4", 80)
    assert _core._test_parse_address(inet, 15) is None     # too short: no address
    assert _core._test_parse_address(_sun(b"ab"), 4) == "ab"
    assert _core._test_parse_address(_sun(b"ab"), 0) == ""
    with pytest.raises(OverflowError):
        _core._test_parse_address(inet, -1)


def test_accepted_unix_peer_with_the_longest_path(port, tmp_path):
    """End to end: a peer bound to a 107-byte path (the most sun_path
    holds with its NUL) is reported in full."""
    if not hasattr(socket, "AF_UNIX"):
        pytest.skip("needs AF_UNIX")
    base = str(tmp_path)
    lpath = base + "/l"
    cpath = (base + "/" + "c" * 200)[:107]
    if len(lpath) >= 107 or len(cpath) < 107:
        pytest.skip("temporary directory path too long")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(lpath)
    listener.listen()
    port.register(listener)
    op = port.accept(listener)
    client = socket.socket(socket.AF_UNIX)
    client.bind(cpath)
    client.connect(lpath)
    c = port.get(timeout=5)
    assert c is not None and c.operation is op and c.ok, c
    conn, addr = c.data
    assert addr == cpath
    conn.close()
    client.close()
    close_all(port, listener)


# ---- backend names -------------------------------------------------------


def test_unknown_backend_name_is_a_value_error():
    with pytest.raises(ValueError, match="unknown backend"):
        iocp.CompletionPort(backend="kqueue")


def test_known_backend_that_cannot_run_here_is_an_os_error():
    """README: a forced backend that cannot run raises OSError (it was a
    ValueError for a backend of another platform, e.g. iocp on Linux)."""
    missing = [b for b in _core.KNOWN_BACKENDS if b not in iocp.backends()]
    if not missing:
        pytest.skip("every backend runs here")
    for name in missing:
        with pytest.raises(OSError, match="cannot run here"):
            iocp.CompletionPort(backend=name)


def test_known_backend_from_the_environment_that_cannot_run_is_an_os_error(monkeypatch):
    missing = [b for b in _core.KNOWN_BACKENDS if b not in iocp.backends()]
    if not missing:
        pytest.skip("every backend runs here")
    monkeypatch.setenv("IOCP_BACKEND", missing[0])
    with pytest.raises(OSError):
        iocp.CompletionPort()
    monkeypatch.setenv("IOCP_BACKEND", "bogus")
    with pytest.raises(ValueError):
        iocp.CompletionPort()


def test_connected_pair_still_works_after_bad_addresses(port, inet_socks):
    """The refusals above leave the port usable."""
    client, server = tcp_pair()
    port.register(server)
    port.recv(server, 10)
    client.sendall(b"hi")
    c = port.get(timeout=5)
    assert c.data == b"hi"
    close_all(port, client, server)
