"""CPython's own asyncio test mixins, bound to iocp.aio on every backend.

CPython tests its selector and proactor loops by mixing shared test
classes (``test.test_asyncio.test_events.EventLoopTestsMixin`` and the
like) into concrete ``unittest.TestCase`` classes whose
``create_event_loop()`` / ``new_loop()`` / ``setUp()`` make the loop under
test.  This module makes the same concrete classes for
``iocp.aio.new_event_loop(backend=...)``, one set per backend, so pytest
collects and runs the stdlib's tests against this loop.

``test.test_asyncio`` ships with the interpreter but some distributions
strip it: then the whole module is skipped.  The mixins are reached
through their modules (never imported by class name), so pytest does not
also collect CPython's own concrete classes here.

Every test of those mixins bounds its waits (``support.SHORT_TIMEOUT`` and
the like); on top of that the project's pytest-timeout setting bounds each
test.  Tests that cannot apply to this loop are skipped with a reason (see
``_SKIPS`` and docs/asyncio.md, "CPython's asyncio tests").
"""

from __future__ import annotations

import unittest
from typing import Any, Callable

import pytest

import iocp
import iocp.aio

pytest.importorskip("test.support", reason="the interpreter's test package is not installed")
pytest.importorskip("test.test_asyncio.utils", reason="test.test_asyncio is not installed")

from test.test_asyncio import (  # noqa: E402
    test_buffered_proto as _buffered_proto,
)
from test.test_asyncio import (  # noqa: E402
    test_events as _events,
)
from test.test_asyncio import (  # noqa: E402
    test_sendfile as _sendfile,
)
from test.test_asyncio import (  # noqa: E402
    test_server as _server,
)
from test.test_asyncio import (  # noqa: E402
    test_sock_lowlevel as _sock_lowlevel,
)
from test.test_asyncio import (  # noqa: E402
    test_sslproto as _sslproto,
)
from test.test_asyncio import (  # noqa: E402
    test_streams as _streams,
)
from test.test_asyncio import (  # noqa: E402
    test_subprocess as _subprocess,
)
from test.test_asyncio import utils as _test_utils  # noqa: E402

try:
    from test.test_asyncio import test_ssl as _ssl_tests  # noqa: E402
except ImportError:  # no ssl module
    _ssl_tests = None  # type: ignore[assignment]

# Backends the port may have; the ones missing here get skipped classes.
_BACKENDS = {"io_uring": "IoUring", "epoll": "Epoll", "iocp": "Iocp"}
_AVAILABLE = iocp.backends()

# Tests that cannot apply to this loop: {mixin attribute name: reason}.
# Each one is listed, with the same reason, in docs/asyncio.md.
_SKIPS: dict[str, dict[str, str]] = {}


def _factory(backend: str) -> Callable[[], iocp.aio.EventLoop]:
    def make() -> iocp.aio.EventLoop:
        return iocp.aio.new_event_loop(backend=backend)

    return make


def _skip(name: str, reason: str) -> Callable[..., Any]:
    def test(self: unittest.TestCase) -> None:
        self.skipTest(reason)

    test.__name__ = name
    return test


def _bind(
    kind: str, bases: tuple[type, ...], body: Callable[[Callable[[], Any]], dict[str, Any]]
) -> None:
    """Defines ``<Backend><kind>`` in this module for every backend."""
    for backend, prefix in _BACKENDS.items():
        ns = body(_factory(backend))
        for name, reason in _SKIPS.get(kind, {}).items():
            ns[name] = _skip(name, reason)
        ns["__module__"] = __name__
        ns["__qualname__"] = prefix + kind
        cls = type(prefix + kind, bases, ns)
        if backend not in _AVAILABLE:
            cls = unittest.skip(f"backend {backend!r} does not run here")(cls)
        globals()[prefix + kind] = cls


def tearDownModule() -> None:
    # As each of CPython's modules does.
    import asyncio

    asyncio.set_event_loop_policy(None)


# ---- test_events: EventLoopTestsMixin + SubprocessTestsMixin -------------

_bind(
    "EventLoopTests",
    (_events.EventLoopTestsMixin, _events.SubprocessTestsMixin, _test_utils.TestCase),
    lambda make: {"create_event_loop": lambda self: make()},
)

# ---- test_sock_lowlevel ---------------------------------------------------

_bind(
    "SockLowlevelTests",
    (_sock_lowlevel.BaseSockTestsMixin, _test_utils.TestCase),
    lambda make: {"create_event_loop": lambda self: make()},
)

# ---- test_sendfile ----------------------------------------------------------

_bind(
    "SendfileTests",
    (_sendfile.SendfileTestsBase, _test_utils.TestCase),
    lambda make: {"create_event_loop": lambda self: make()},
)

# ---- test_server (with the Unix-socket test CPython binds on selectors) ----

_bind(
    "StartServerTests",
    (_server.BaseStartServer, unittest.TestCase),
    lambda make: {
        "new_loop": lambda self: make(),
        "test_start_unix_server_1": _server.SelectorStartServerTests.test_start_unix_server_1,
    },
)

# ---- test_buffered_proto ---------------------------------------------------

_bind(
    "BufferedProtocolTests",
    (_buffered_proto.BaseTestBufferedProtocol, unittest.TestCase),
    lambda make: {"new_loop": lambda self: make()},
)

# ---- test_sslproto.BaseStartTLS ----------------------------------------------

_bind(
    "StartTLSTests",
    (_sslproto.BaseStartTLS, unittest.TestCase),
    lambda make: {"new_loop": lambda self: make()},
)


# ---- test_streams.StreamTests, test_ssl.TestSSL: they make their loop in setUp


def _streams_body(make: Callable[[], Any]) -> dict[str, Any]:
    def setUp(self: Any) -> None:
        _test_utils.TestCase.setUp(self)
        self.loop = make()
        self.set_event_loop(self.loop)

    return {"setUp": setUp}


_bind("StreamTests", (_streams.StreamTests,), _streams_body)


if _ssl_tests is not None:

    def _ssl_body(make: Callable[[], Any]) -> dict[str, Any]:
        def setUp(self: Any) -> None:
            _test_utils.TestCase.setUp(self)
            self.loop = make()
            self.set_event_loop(self.loop)
            self.addCleanup(self.loop.close)

        return {"setUp": setUp, "new_loop": lambda self: make()}

    _bind("SSLTests", (_ssl_tests.TestSSL,), _ssl_body)


# ---- test_subprocess.SubprocessMixin (bound as CPython binds its proactor) --


def _subprocess_body(make: Callable[[], Any]) -> dict[str, Any]:
    def setUp(self: Any) -> None:
        _test_utils.TestCase.setUp(self)
        self.loop = make()
        self.set_event_loop(self.loop)

    return {"setUp": setUp}


_bind("SubprocessTests", (_subprocess.SubprocessMixin, _test_utils.TestCase), _subprocess_body)
