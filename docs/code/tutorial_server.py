"""Tutorial, step 5: a server with ``listen`` and ``serve()``.

Run ``python tutorial_server.py [asyncio|trio]``. The server admits only
this user's processes (``allow=same_user()``) and runs a handler for each
connection; here three clients (tasks of the same program, for brevity)
each send it the write end of a pipe, and the server writes its answer into
the pipe rather than on the channel.
"""

from __future__ import annotations

import os
import sys
import tempfile

import anyio

import aiofdpass


async def handle(channel: aiofdpass.FdChannel) -> None:
    # serve() runs this in a task of its own, and closes the channel after.
    async for msg in channel:
        with msg, msg.fds[0].to_file("w") as pipe:
            pipe.write(f"hello, {msg.data.decode()}\n")


async def client(path: str, name: str, answers: list[str]) -> None:
    r, w = os.pipe()
    try:
        async with await aiofdpass.connect(path) as channel:
            await channel.send(name.encode(), [w], close_fds=True)
        await anyio.wait_readable(r)
        answers.append(os.read(r, 100).decode().strip())  # one small write
    finally:
        os.close(r)


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "server.sock")
        answers: list[str] = []
        listener = await aiofdpass.listen(path, allow=aiofdpass.same_user())
        async with listener, anyio.create_task_group() as server:
            server.start_soon(listener.serve, handle)
            async with anyio.create_task_group() as clients:
                for name in ("ann", "bob", "cy"):
                    clients.start_soon(client, path, name, answers)
            server.cancel_scope.cancel()  # stop serving
        print(*sorted(answers), sep="\n")


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
