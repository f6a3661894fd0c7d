"""A target whose worker can be held before it is ready, and its handler.

The pool's environment names a file in ``PREFORK_HOLD_IF``: a worker that
imports this module while that file exists stops itself (SIGSTOP) before
it is ready, so that a test can keep a restarted worker down while
connections wait for it, then let it go on (SIGCONT).
"""

from __future__ import annotations

import os
import signal

import anyio
from anyio.abc import SocketStream

_FLAG = os.environ.get("PREFORK_HOLD_IF")
if "AIOFDPASS_CHANNEL_FD" in os.environ and _FLAG and os.path.exists(_FLAG):
    os.kill(os.getpid(), signal.SIGSTOP)


async def numbered(stream: SocketStream, meta: dict[str, object]) -> None:
    """Read to the end; raise unless the client wrote ``meta["n"]`` and a newline."""
    data = b""
    while True:
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            break
    if data != f"{meta['n']}\n".encode():
        raise ValueError(f"connection {meta} got {data!r}")
