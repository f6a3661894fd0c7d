"""Handlers for test_prefork.py's worker pools, and a master to kill.

As a target, ``tests.prefork_child:lines`` answers each line a client sends
with ``"<worker pid> <the line>"``; the line ``raise`` makes it raise,
``exit`` kills its worker (``os._exit(3)``), ``meta`` and ``loop`` are
answered with the connection's metadata and the worker's event loop.

Run as ``python prefork_child.py BACKEND``, it is a master: it starts a
pool of two workers, reports their pids over its channel, then dispatches
every connection the test sends it.
"""

from __future__ import annotations

import json
import os
import sys

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

import aiofdpass
from aiofdpass.prefork import WorkerPool, _current_backend


async def lines(stream: SocketStream, meta: dict[str, object]) -> None:
    """Answer each line with ``"<pid> <line>"`` until the client closes."""
    reader = BufferedByteReceiveStream(stream)
    prefix = f"{os.getpid()} ".encode()
    while True:
        try:
            line = await reader.receive_until(b"\n", 4096)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            return
        if line == b"raise":
            raise ValueError("asked to raise")
        if line == b"exit":
            os._exit(3)
        if line == b"meta":
            line = json.dumps(meta).encode()
        elif line == b"loop":
            line = _current_backend().encode()
        await stream.send(prefix + line + b"\n")


async def master() -> None:
    """Start a pool, report its pids, dispatch what the test sends, forever."""
    async with (
        aiofdpass.channel_from_env() as test,
        WorkerPool("tests.prefork_child:lines", workers=2) as pool,
    ):
        pids = [w.pid for w in pool.statistics().workers]
        await test.send(json.dumps({"pids": pids}).encode())
        async for message in test:
            with message:
                await pool.dispatch(message.fds[0].fileno())
            await test.send(b"dispatched")


if __name__ == "__main__":
    backend = sys.argv[1]
    anyio.run(
        master,
        backend="trio" if backend == "trio" else "asyncio",
        backend_options={"use_uvloop": True} if backend == "uvloop" else {},
    )
