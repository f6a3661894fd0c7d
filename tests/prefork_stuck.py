"""A target whose import never finishes: it stops its own process (SIGSTOP)."""

from __future__ import annotations

import os
import signal

from anyio.abc import SocketStream

os.kill(os.getpid(), signal.SIGSTOP)


async def handler(stream: SocketStream, meta: dict[str, object]) -> None:
    """Never runs: the worker is stopped while it imports this module."""
