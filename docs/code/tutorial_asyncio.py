"""Tutorial, step 1: a first channel, on asyncio."""

from __future__ import annotations

import asyncio
import tempfile

import aiofdpass


async def main() -> None:
    left, right = aiofdpass.channel_pair()
    async with left, right:
        with tempfile.TemporaryFile() as file:
            file.write(b"hello from a file\n")
            file.flush()
            file.seek(0)
            await left.send(b"here is a file", [file])
        # Our copy is closed now; the one in flight stays open.

        with await right.receive() as msg:  # closes msg.fds on exit
            print(msg.data, msg.fds)
            with msg.fds[0].to_file("rb") as received:
                print(received.read())


asyncio.run(main())
