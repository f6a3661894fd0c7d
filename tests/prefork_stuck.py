"""A target whose import never finishes: it stops its own process (SIGSTOP).

Only in a worker (a child joined by a channel), never in the test run itself.
"""

from __future__ import annotations

import os
import signal

from anyio.abc import SocketStream

if "AIOFDPASS_CHANNEL_FD" in os.environ:
    os.kill(os.getpid(), signal.SIGSTOP)


async def handler(stream: SocketStream, meta: dict[str, object]) -> None:
    """Never runs: the worker is stopped while it imports this module."""
