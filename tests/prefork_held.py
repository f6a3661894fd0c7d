"""A target whose worker can be held before it is ready, and its handler.

The pool's environment names a file in ``PREFORK_HOLD_IF``: a worker that
imports this module while that file exists stops itself (SIGSTOP) before
it is ready, so that a test can keep a restarted worker down while
connections wait for it, then let it go on (SIGCONT).

With ``PREFORK_ACK_INLINE=1`` in its environment the worker runs
:func:`acknowledging_inline` instead of aiofdpass's own loop.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from typing import Any

import anyio
from anyio.abc import SocketStream

import aiofdpass
from aiofdpass import prefork

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


async def acknowledging_inline(
    handler: prefork.Handler, channel: aiofdpass.FdChannel | None = None
) -> None:
    """A worker that sends each "taken" before it reads the next record.

    The protocol allows it (aiofdpass's own worker acknowledges from each
    connection's task, so its reading never waits on its reports): while
    the master does not read its reports, this one stops reading what the
    master sends it.
    """
    channel = aiofdpass.channel_from_env() if channel is None else channel
    async with channel, anyio.create_task_group() as tg:
        await channel.send(b'{"ready": %d}' % os.getpid())
        async for message in channel:
            with message:
                order = json.loads(message.data)
                if "stop" in order:
                    break
                sock = message.fds[0].to_socket()
            with sock:
                await channel.send(b'{"taken": %d}' % order["id"])
                tg.start_soon(serve, handler, channel, sock.detach(), order)


async def serve(
    handler: prefork.Handler, channel: aiofdpass.FdChannel, fd: int, order: Any
) -> None:
    """Run the handler on one connection, then report it done."""
    async with await SocketStream.from_socket(socket.socket(fileno=fd)) as stream:
        await handler(stream, order["meta"])
    await channel.send(b'{"done": %d, "error": null}' % order["id"])


if os.environ.get("PREFORK_ACK_INLINE") == "1":
    prefork._run_worker = acknowledging_inline  # what _worker_main runs
