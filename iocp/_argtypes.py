"""argparse types for the numeric options of the ``iocp`` commands.

Each factory returns a ``type=`` callable that parses one value and rejects
anything out of range with a one-line message (argparse prints it as
``argument --rounds: invalid count -1: must be >= 1``), so a bad option
stops the command before it starts instead of failing somewhere inside
it, or worse, being accepted.  Shared by ``iocp`` (serve, client) and
``iocp bench`` with its helper programs.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

# The longest duration any option accepts (about 11.5 days): far beyond any
# real use, and far below what time.monotonic() arithmetic and
# threading's TIMEOUT_MAX can take, so inf or 1e300 never reaches them.
MAX_SECONDS = 1_000_000.0


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _bounds(lo: float, hi: float | None, lo_open: bool = False) -> str:
    low = f"> {_num(lo)}" if lo_open else f">= {_num(lo)}"
    if hi is None:
        return f"must be {low}"
    if lo_open:
        return f"must be {low} and <= {_num(hi)}"
    return f"must be between {_num(lo)} and {_num(hi)}"


def int_option(lo: int, hi: int | None = None, what: str = "count") -> Callable[[str], int]:
    """An integer in ``[lo, hi]`` (``hi=None``: no upper bound)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid {what} {text!r}: not an integer") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"invalid {what} {value}: {_bounds(lo, hi)}")
        return value

    parse.__name__ = what.replace(" ", "_")
    return parse


def float_option(
    lo: float = 0.0,
    hi: float | None = MAX_SECONDS,
    *,
    lo_open: bool = False,
    what: str = "duration",
) -> Callable[[str], float]:
    """A finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``); no nan, no inf."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid {what} {text!r}: not a number") from None
        if (not math.isfinite(value) or value < lo or (lo_open and value == lo)
                or (hi is not None and value > hi)):
            raise argparse.ArgumentTypeError(
                f"invalid {what} {text}: {_bounds(lo, hi, lo_open)}")
        return value

    parse.__name__ = what.replace(" ", "_")
    return parse


port_number = int_option(0, 65535, "port")
"""A TCP port; 0 lets the system pick one."""
