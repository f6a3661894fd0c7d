"""Tutorial, step 2: the same on trio, with a sender and a receiver task."""

from __future__ import annotations

import tempfile

import trio

import aiofdpass
from aiofdpass import FdChannel


async def sender(channel: FdChannel) -> None:
    async with channel:  # closing it ends the receiver's loop
        for n in range(3):
            with tempfile.TemporaryFile() as file:
                file.write(f"file number {n}\n".encode())
                file.seek(0)
                await channel.send(f"record {n}".encode(), [file])


async def receiver(channel: FdChannel) -> None:
    async with channel:
        async for msg in channel:
            with msg, msg.fds[0].to_file("rb") as file:
                print(msg.data, file.read())


async def main() -> None:
    left, right = aiofdpass.channel_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender, left)
        nursery.start_soon(receiver, right)


trio.run(main)
