"""Tutorial, step 3: hand an open file and a live connection to another process.

Run ``python tutorial_processes.py [asyncio|trio]``. The script is the
parent: it listens on a UNIX socket path, starts itself again as a worker
process, and passes the worker two descriptors: an open file, and a TCP
connection that the parent accepted. The worker reads the file and answers
on the connection; the parent closed its copy and never touches it again.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile

import anyio
from anyio.abc import SocketStream

import aiofdpass


async def worker(path: str) -> None:
    async with await aiofdpass.connect(path) as channel:
        with await channel.receive() as msg, msg.fds[0].to_file("r") as file:
            greeting = file.read().strip()
        with await channel.receive() as msg:
            conn = await SocketStream.from_socket(msg.fds[0].to_socket())
        async with conn:
            name = (await conn.receive()).decode()
            await conn.send(f"{greeting}, {name}! (pid {os.getpid()})".encode())


async def parent(backend: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "worker.sock")
        async with await aiofdpass.listen(path) as listener:
            command = [sys.executable, __file__, "--worker", path, backend]
            async with await anyio.open_process(command, stdout=None) as proc:
                async with await listener.accept() as channel:
                    # 1. An open file: the worker reads it, by descriptor.
                    with tempfile.TemporaryFile("w+") as file:
                        file.write("Hello\n")
                        file.flush()
                        file.seek(0)
                        await channel.send(b"greeting", [file])

                    # 2. A TCP connection accepted here, served there.
                    with socket.create_server(("127.0.0.1", 0)) as server:
                        host, port = server.getsockname()[:2]
                        client = await anyio.connect_tcp(host, port)
                        conn, _ = server.accept()  # already queued: no wait
                    await channel.send(b"connection", [conn], close_fds=True)

                    async with client:
                        await client.send(b"tutorial")
                        reply = (await client.receive()).decode()
                print(reply)
                print("answered by the worker:", reply.endswith(f"(pid {proc.pid})"))
            print("worker exit status:", proc.returncode)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        anyio.run(worker, sys.argv[2], backend=sys.argv[3])
    else:
        backend = sys.argv[1] if len(sys.argv) > 1 else "asyncio"
        anyio.run(parent, backend, backend=backend)
