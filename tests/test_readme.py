"""The README's classic demo runs as printed: it accepts, prints what a
client sends (binary escaped), reports the close, and stops on Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
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
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", 9527), timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        with client:
            client.sendall(b"hello\n")
            time.sleep(0.1)
            client.sendall(b"\xff\x00bin\n")
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = out.decode()
    assert proc.returncode == 0, text
    assert f"backend {backend}" in text
    assert "says hello" in text
    assert "says \\xff\x00bin" in text  # invalid UTF-8 escaped, NUL kept
    assert "closed" in text and "Traceback" not in text
