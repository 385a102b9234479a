"""The README's classic demo runs as printed: it accepts, prints what a
client sends (binary escaped), reports the close, and stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
@pytest.mark.needs_sigint  # the demo inherits SIGINT as the suite has it
def test_readme_demo(tmp_path, backend):
    code = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    script = tmp_path / "demo.py"
    script.write_text(code)
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 9527)) == 0:
            pytest.skip("port 9527 is busy")
    env = dict(os.environ, IOCP_BACKEND=backend,
               PYTHONPATH=str(README.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env=env)
    lines: list[str] = []
    closed, hello = threading.Event(), threading.Event()

    def read_output() -> None:
        for raw in proc.stdout:  # type: ignore[union-attr]
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            if "says hello" in line:
                hello.set()
            if " closed" in line:
                closed.set()

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", 9527), timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    reader.join(5)
                    if "Address already in use" in "".join(lines):
                        pytest.skip("port 9527 was taken meanwhile")
                assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
                time.sleep(0.05)
        with client:
            client.sendall(b"hello\n")
            # One receive each: the second line must be printed on its own.
            assert hello.wait(20), "".join(lines)
            client.sendall(b"\xff\x00bin\n")
        # The demo reports the close only after printing what came before
        # it; wait for that rather than for a guessed time.
        assert closed.wait(20), "".join(lines)
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        reader.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = "".join(lines)
    assert proc.returncode == 0, text
    assert f"backend {backend}" in text
    assert "says hello" in text
    assert "says \\xff\x00bin" in text  # invalid UTF-8 escaped, NUL kept
    assert "closed" in text and "Traceback" not in text


def _readme_commands_module():
    import importlib.util

    path = README.parent / ".ci" / "readme_commands.py"
    if not path.exists():  # tests/wheels/run_installed.py copies tests/, README, examples/
        pytest.skip("not a source checkout: no .ci/")
    spec = importlib.util.spec_from_file_location("readme_commands", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_types_the_quick_start_commands_as_written():
    # .ci/run reads the Quick start commands out of README.md instead of
    # keeping its own copy, which could drift from what a newcomer types.
    rc = _readme_commands_module()
    text = README.read_text(encoding="utf-8")
    bench, tests = rc.quick_start_commands(text)
    start = text.index("## Quick start")
    quick_start = text[start:text.index("\n## ", start)]
    assert f"\n{bench}\n" in quick_start and f"\n{tests}\n" in quick_start
    assert bench.startswith("pip install '.[bench]'") and bench.endswith("iocp bench --quick")
    ci = (README.parent / ".ci" / "run").read_text()
    assert ".ci/readme_commands.py README.md" in ci
    code = [line for line in ci.splitlines() if not line.lstrip().startswith("#")]
    for command in (bench, tests):
        assert not any(command in line for line in code), "hard-coded in .ci/run"


@pytest.mark.parametrize("block", [
    "pip install '.[bench]' && iocp bench --quick\n",                       # one command
    "pip install -e '.[test]' && python -m pytest\npip install '.[bench]' && iocp bench\n",
    "pip install '.[bench]' && \\\n  iocp bench --quick\npython -m pytest\n",  # continued
])
def test_readme_commands_refuses_a_quick_start_it_cannot_type(block):
    rc = _readme_commands_module()
    with pytest.raises(ValueError):
        rc.quick_start_commands(f"# x\n\n## Quick start\n\n```sh\n{block}```\n\n## Next\n")
