"""Tutorial, step 4: a child process, a memfd and an eventfd.

Run ``python tutorial_child.py [asyncio|trio]``. The parent puts text in a
memfd (an anonymous file in memory), starts a child joined by a channel
with ``open_child_process``, and sends it the memfd and an eventfd in one
record. The child counts the words, writes the count back into the memfd
and rings the eventfd; the parent, woken by the eventfd, reads the answer
from the same memory.
"""

from __future__ import annotations

import mmap
import os
import sys

import anyio

import aiofdpass

TEXT = b"descriptors travel between processes, data does not " * 1000


async def child() -> None:
    async with aiofdpass.channel_from_env() as channel:
        with await channel.receive() as msg:
            memfd, eventfd = msg.fds
            with mmap.mmap(memfd.fileno(), 0) as memory:
                words = len(memory[: int(msg.data)].split())
                answer = str(words).encode()
                memory[: len(answer) + 1] = answer + b"\n"
            os.eventfd_write(eventfd.fileno(), 1)  # wake the parent


async def parent(backend: str) -> None:
    memfd = os.memfd_create("tutorial")
    eventfd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        os.write(memfd, TEXT)
        command = [sys.executable, __file__, "--child", backend]
        process, channel = await aiofdpass.open_child_process(command)
        async with process, channel:
            # The record's data says how many bytes of the memfd count.
            await channel.send(str(len(TEXT)).encode(), [memfd, eventfd])
            await anyio.wait_readable(eventfd)  # the child rang it
            print("eventfd counter:", os.eventfd_read(eventfd))
            answer = os.pread(memfd, 20, 0).split(b"\n")[0].decode()
            print("words counted by the child:", answer)
        print("child exit status:", process.returncode)
    finally:
        os.close(memfd)
        os.close(eventfd)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        anyio.run(child, backend=sys.argv[2])
    else:
        backend = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
        anyio.run(parent, backend, backend=backend)
