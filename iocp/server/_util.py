"""Small helpers shared by the modules of :mod:`iocp.server`.

Design note: nothing here knows about connections or servers; the names are
kept private (and re-exported from nowhere) so that the package's public
surface stays the one of the former ``iocp/server.py``.
"""

from __future__ import annotations

import logging
import socket
from typing import Any, Dict, Tuple, Union

#: Every module of the package logs under the one name the single module used.
log = logging.getLogger("iocp.server")

DEFAULT_PORT = 9527

Address = Union[Tuple[Any, ...], str, None]


def _noop(*_args: Any) -> None:
    return None


def _fmt_addr(addr: Address) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = addr[0]
        return f"[{host}]:{addr[1]}" if ":" in str(host) else f"{host}:{addr[1]}"
    if isinstance(addr, (bytes, bytearray)):
        addr = addr.decode("utf-8", "backslashreplace")
    return str(addr) if addr else "unix"


def _fmt_stats(stats: Dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in stats.items())


def _close_quietly(sock: Any) -> None:
    try:
        sock.close()
    except Exception:
        pass


def _unregister_close(port: Any, sock: socket.socket) -> None:
    try:
        port.unregister(sock)
    except (OSError, ValueError):
        pass
    _close_quietly(sock)
