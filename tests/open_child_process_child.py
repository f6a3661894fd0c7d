"""The child for test_open_child_process.py.

Run as ``python open_child_process_child.py MODE BACKEND``.

It gets its channel from :func:`aiofdpass.channel_from_env`.
"""

from __future__ import annotations

import json
import os
import sys

import anyio

import aiofdpass


async def echo(chan: aiofdpass.FdChannel) -> None:
    """Report the environment, then echo each record with its descriptors."""
    report = {
        "env_var_left": aiofdpass.CHANNEL_FD_ENV in os.environ,
        "extra_fd_open": _is_open(int(os.environ.get("EXTRA_FD", "-1"))),
    }
    await chan.send(json.dumps(report).encode())
    async for msg in chan:
        with msg:
            await chan.send(msg)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def main(mode: str) -> None:
    async with aiofdpass.channel_from_env() as chan:
        if mode == "echo":
            await echo(chan)
        elif mode == "exit":
            sys.exit(3)


if __name__ == "__main__":
    mode, backend = sys.argv[1], sys.argv[2]
    anyio.run(
        main,
        mode,
        backend="trio" if backend == "trio" else "asyncio",
        backend_options={"use_uvloop": True} if backend == "uvloop" else {},
    )
