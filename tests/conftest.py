"""Shared fixtures: every test that takes `backend` runs once per backend
that works on this machine, and every port made through `make_port` is
checked for leaks (live op records, in-flight ops, port buffers, pinned
Python buffers) when the test ends."""

from __future__ import annotations

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]
import signal
import socket

import pytest

import iocp

AVAILABLE = list(iocp.backends())


def pytest_report_header(config: pytest.Config) -> str:
    return f"iocp backends here: {iocp.backends()}"


def sigint_is_default() -> bool:
    """True when SIGINT raises KeyboardInterrupt here.  Not so when this
    process inherited SIGINT as ignored (a non-interactive shell starts its
    background jobs that way; Python then leaves it ignored), so a test that
    interrupts itself with SIGINT would wait for nothing.  pytest installs no
    SIGINT handler of its own."""
    return signal.getsignal(signal.SIGINT) is signal.default_int_handler


def pytest_configure(config: pytest.Config) -> None:
    # Here, not in pyproject.toml: the wheel and Wine runs copy tests/ alone.
    config.addinivalue_line(
        "markers",
        "needs_sigint: interrupts the test process with SIGINT; skipped when "
        "SIGINT is not at its default handler",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("needs_sigint") is not None and not sigint_is_default():
        handler = signal.getsignal(signal.SIGINT)
        pytest.skip(f"SIGINT is not at its default handler here ({handler!r})")


@pytest.fixture(params=AVAILABLE)
def backend(request: pytest.FixtureRequest) -> str:
    """The name of a backend that runs on this machine."""
    return request.param


@pytest.fixture
def make_port(backend: str):
    """Factory of ports on the current backend, closed and leak-checked at
    teardown."""
    ports: list[iocp.CompletionPort] = []

    def factory(**kwargs) -> iocp.CompletionPort:
        kwargs.setdefault("backend", backend)
        port = iocp.CompletionPort(**kwargs)
        ports.append(port)
        return port

    yield factory
    for port in ports:
        if not port.closed:
            port.close()
        stats = port.stats()
        assert stats["live_ops"] == 0, stats
        assert stats["inflight"] == 0, stats
        assert stats["pinned_buffers"] == 0, stats
        assert stats["live_buffers"] == 0, stats


@pytest.fixture
def port(make_port) -> iocp.CompletionPort:
    """One leak-checked port on the current backend."""
    return make_port()


@pytest.fixture
def listener():
    """A listening TCP socket on 127.0.0.1 with a free port."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    yield sock
    sock.close()


@pytest.fixture
def many_fds():
    """Raises RLIMIT_NOFILE for tests that open thousands of sockets."""
    if resource is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 4200:
        pytest.skip("cannot raise the open-file limit to 4200")
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.fixture(scope="module")
def ssl_contexts():
    """(server, client) SSL contexts trusting one fresh self-signed
    certificate (made by tests.test_aio._self_signed)."""
    import ssl
    import tempfile

    from tests.test_aio import _self_signed

    with tempfile.TemporaryDirectory() as d:
        cert, key = _self_signed(d)
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server.load_cert_chain(cert, key)
        client = ssl.create_default_context(cafile=cert)
        yield server, client
