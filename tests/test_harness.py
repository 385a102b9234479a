"""The suite itself cannot hang (issue 9, item 6): a hung test fails the run,
and the tests that interrupt themselves with SIGINT are skipped where SIGINT
is ignored instead of waiting for it forever."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
POSIX = sys.platform != "win32"


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTEST_ADDOPTS", None)
    return env


HUNG_TEST = """\
import iocp


def test_waits_forever():
    port = iocp.CompletionPort()
    port.get()  # nothing ever completes: a wait with no bound, GIL released
"""


def _ini(config: pytest.Config, name: str) -> str:
    try:
        return str(config.getini(name) or "")
    except ValueError:  # not registered: pytest-timeout is not installed
        return ""


@pytest.mark.skipif(not PYPROJECT.exists(), reason="runs with the project's pytest config")
def test_the_suite_bounds_every_test(pytestconfig: pytest.Config) -> None:
    """The project's configuration gives every test a timeout, and
    faulthandler prints the stacks before it strikes."""
    pytest.importorskip("pytest_timeout")
    if pytestconfig.inipath != PYPROJECT:
        pytest.skip("not run with the project's pytest config")
    timeout = float(_ini(pytestconfig, "timeout") or 0)
    assert timeout > 0
    assert _ini(pytestconfig, "timeout_method") == "thread"
    assert 0 < float(_ini(pytestconfig, "faulthandler_timeout") or 0) < timeout


@pytest.mark.skipif(not PYPROJECT.exists(), reason="runs with the project's pytest config")
def test_a_hung_test_fails_the_run(tmp_path: Path) -> None:
    """With the project's configuration (its bounds shortened), a test stuck
    in a port wait is killed: its stack is printed (faulthandler first, then
    pytest-timeout) and the run exits non-zero."""
    pytest.importorskip("pytest_timeout")
    (tmp_path / "test_hangs.py").write_text(HUNG_TEST)
    r = subprocess.run(
        [
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
            "-c", str(PYPROJECT), "--rootdir", str(tmp_path),
            # The project's method, with the bounds shortened.
            "-o", "timeout=4", "-o", "faulthandler_timeout=1",
            str(tmp_path / "test_hangs.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(tmp_path),
        env=_env(),
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "Timeout (0:00:01)!" in r.stderr, out  # faulthandler's dump, first
    assert "+ Timeout +" in r.stdout, out  # then pytest-timeout's, which exits
    assert "test_waits_forever" in r.stdout, out  # its stack names the hung test


@pytest.mark.skipif(not POSIX, reason="POSIX shells and signals")
def test_signal_tests_skip_when_sigint_is_ignored() -> None:
    """A non-interactive shell starts a background job with SIGINT ignored,
    and Python keeps it so.  The suite started that way skips the tests that
    send themselves SIGINT (before the fix they waited forever)."""
    selected = [
        "tests/test_port.py::test_sigint_interrupts_a_blocked_wait",
        "tests/test_aio.py::test_keyboard_interrupt_stops_run",
        "tests/test_aio.py::test_keyboard_interrupt_stops_iocp_aio_run",
        "tests/test_readme.py::test_readme_demo",
    ]
    script = '"$0" -m pytest -q -rs -p no:cacheprovider "$@" & wait $!'
    proc = subprocess.Popen(
        ["sh", "-c", script, sys.executable, *selected],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(ROOT),
        env=_env(),
        start_new_session=True,  # so a hung run is killed with its shell
    )
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=10)
        pytest.fail(f"the suite hung with SIGINT ignored:\n{out}")
    assert proc.returncode == 0, out
    assert "passed" not in out and "failed" not in out, out
    assert "skipped" in out and "SIGINT is not at its default handler" in out, out
