"""Runs the test suite against the *installed* iocp package.

Copies tests/ (plus README.md and examples/, which some tests read through
paths relative to tests/) from the project into a fresh temporary
directory and runs pytest there, so `import iocp` can only find the
installed wheel, never the source tree.  Used by cibuildwheel's
test-command and by tests/wheels/check.sh.  Works on Linux and Windows.

    python run_installed.py PROJECT_DIR [pytest args...]
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile


def main() -> int:
    project = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else ".")
    extra = sys.argv[2:]
    tmp = tempfile.mkdtemp(prefix="iocp-wheel-test-")
    try:
        ignore = shutil.ignore_patterns("__pycache__", "native", "wine", "wheels")
        shutil.copytree(os.path.join(project, "tests"), os.path.join(tmp, "tests"), ignore=ignore)
        for name in ("README.md", "examples"):
            src = os.path.join(project, name)
            if os.path.isdir(src):
                shutil.copytree(
                    src, os.path.join(tmp, name), ignore=shutil.ignore_patterns("__pycache__")
                )
            elif os.path.isfile(src):
                shutil.copy(src, tmp)
        # The installed package, not a stray source checkout on sys.path.
        probe = "import iocp, iocp._core; print('testing', iocp.__file__, iocp.backends())"
        check = subprocess.run([sys.executable, "-c", probe], cwd=tmp)
        if check.returncode != 0:
            return check.returncode
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-ra",
            "-o",
            "faulthandler_timeout=300",
            "tests",
            *extra,
        ]
        return subprocess.run(cmd, cwd=tmp).returncode
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
