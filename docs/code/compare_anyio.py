"""The task with anyio: UNIXSocketStream.send_fds and receive_fds."""

from __future__ import annotations

import os
import socket
import tempfile

import anyio
from anyio.abc import UNIXSocketStream


async def main() -> None:
    a, b = socket.socketpair()
    left = await UNIXSocketStream.from_socket(a)
    right = await UNIXSocketStream.from_socket(b)
    async with left, right:
        with tempfile.TemporaryFile() as file:
            file.write(b"file contents\n")
            file.flush()
            file.seek(0)
            r, w = os.pipe()
            os.write(w, b"pipe contents\n")
            os.close(w)

            await left.send_fds(b"a file and a pipe", [file, r])
            os.close(r)

        data, fds = await right.receive_fds(1024, 2)  # bare ints, yours to close
        print(data, len(fds), "inheritable:", [os.get_inheritable(fd) for fd in fds])
        try:
            print(os.read(fds[0], 100), os.read(fds[1], 100))
        finally:
            for fd in fds:
                os.close(fd)


anyio.run(main)
