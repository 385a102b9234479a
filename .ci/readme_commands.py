"""Prints the commands of README.md's Quick start, one per line, exactly as written.

    python3 .ci/readme_commands.py [README.md]

.ci/run types these very lines, so CI can never drift from what a newcomer
reads.  The Quick start must hold one ```sh block of one-line commands
(comments and blank lines are skipped): the main job (``iocp bench``) first,
then the test command.  Anything else is an error (exit 2), never a guess.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import List


def quick_start_commands(readme: str) -> List[str]:
    """The command lines of the first ```sh block under '## Quick start'."""
    section = re.search(r"^## Quick start\n(.*?)(?=^## |\Z)", readme, re.S | re.M)
    if section is None:
        raise ValueError("no '## Quick start' section")
    block = re.search(r"^```sh\n(.*?)^```", section.group(1), re.S | re.M)
    if block is None:
        raise ValueError("no ```sh block in the Quick start")
    commands = []
    for line in block.group(1).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            raise ValueError(f"continued line in the Quick start: {line!r}")
        commands.append(line)
    if len(commands) != 2 or "iocp bench" not in commands[0] or "pytest" not in commands[1]:
        raise ValueError(f"expected the bench command then the test command, got {commands}")
    return commands


def main(argv: List[str]) -> int:
    path = Path(argv[1] if len(argv) > 1 else "README.md")
    try:
        commands = quick_start_commands(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        print(f"readme_commands.py: {path}: {exc}", file=sys.stderr)
        return 2
    for command in commands:
        print(command)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
