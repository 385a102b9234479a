"""python -m iocp.bench [--quick|--full] ..."""

import argparse
import sys

from iocp.bench import cli


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m iocp.bench", description=cli.DESCRIPTION)
    cli.configure_parser(parser)
    return cli.run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
