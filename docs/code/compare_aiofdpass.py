"""The task with aiofdpass: FdChannel.send and FdChannel.receive."""

from __future__ import annotations

import os
import tempfile

import anyio

import aiofdpass


async def main() -> None:
    left, right = aiofdpass.channel_pair()
    async with left, right:
        with tempfile.TemporaryFile() as file:
            file.write(b"file contents\n")
            file.flush()
            file.seek(0)
            r, w = os.pipe()
            os.write(w, b"pipe contents\n")
            os.close(w)

            await left.send(b"a file and a pipe", [file, r])
            os.close(r)

        with await right.receive() as msg:  # one whole record; owned Fds
            fds = msg.fds
            print(
                msg.data,
                len(fds),
                "inheritable:",
                [os.get_inheritable(fd.fileno()) for fd in fds],
            )
            with fds[0].to_file() as f, fds[1].to_file() as p:
                print(f.read(), p.read())


anyio.run(main)
