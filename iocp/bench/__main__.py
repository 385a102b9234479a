"""python -m iocp.bench [--quick|--full] ...: the same command as ``iocp bench``."""

import sys

from iocp.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
