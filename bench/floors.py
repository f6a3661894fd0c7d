"""What the event loops and the kernel allow, with no library at all.

``python bench/floors.py`` measures, in separate processes as in bench.py:

- W2 floor: ping-pong with 64 bytes + 1 fd, each hop being the loop's own
  readiness wait, one ``recvmsg`` and one ``sendmsg`` (no framing, no
  ownership objects), on asyncio, uvloop and trio.
- W4 floor: an asyncio receiver of records of 1 byte + 64 fds from a
  blocking sender, closing each fd, or all 64 with one ``close_range``.

No implementation built on these event loops can beat these numbers; the
benchmark page compares the targets with them.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

N_PINGPONG = 20_000
N_MANY = 10_000
ANC = socket.CMSG_SPACE(4 * 253)
# Passed in every message, as in bench/workers.py: an ordinary descriptor.
PASSED_FD, _PIPE_WRITE_END = os.pipe()


def rights(fd: int, count: int = 1) -> list[tuple[int, int, array.array[int]]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd] * count))]


def close_all(anc: list[tuple[int, int, bytes]]) -> None:
    for _, _, data in anc:
        for fd in array.array("i", data[: len(data) - len(data) % 4]):
            os.close(fd)


async def asyncio_recv(
    sock: socket.socket,
) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, anc, _, _ = sock.recvmsg(65536, ANC)
            return data, anc
        except BlockingIOError:
            fut = loop.create_future()
            loop.add_reader(sock.fileno(), fut.set_result, None)
            try:
                await fut
            finally:
                loop.remove_reader(sock.fileno())


async def asyncio_pingpong(
    sock: socket.socket, role: str, n: int = N_PINGPONG
) -> float:
    sock.setblocking(False)
    start = time.perf_counter()
    for _ in range(n):
        if role == "ping":
            sock.sendmsg([b"x" * 64], rights(PASSED_FD))
            close_all((await asyncio_recv(sock))[1])
        else:
            data, anc = await asyncio_recv(sock)
            sock.sendmsg([data], rights(PASSED_FD))
            close_all(anc)
    return time.perf_counter() - start


async def trio_pingpong(sock: socket.socket, role: str, n: int = N_PINGPONG) -> float:
    import trio

    sock.setblocking(False)

    async def recv() -> tuple[bytes, list[tuple[int, int, bytes]]]:
        while True:
            try:
                data, anc, _, _ = sock.recvmsg(65536, ANC)
                return data, anc
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)

    start = time.perf_counter()
    for _ in range(n):
        if role == "ping":
            sock.sendmsg([b"x" * 64], rights(PASSED_FD))
            close_all((await recv())[1])
        else:
            data, anc = await recv()
            sock.sendmsg([data], rights(PASSED_FD))
            close_all(anc)
    return time.perf_counter() - start


async def asyncio_many_fds(sock: socket.socket, mode: str, n: int = N_MANY) -> float:
    sock.setblocking(False)
    start = 0.0
    for _ in range(n):
        _, anc = await asyncio_recv(sock)
        start = start or time.perf_counter()
        for _, _, data in anc:
            fds = array.array("i", data[: len(data) - len(data) % 4])
            if mode == "each":
                for fd in fds:
                    os.close(fd)
            elif max(fds) - min(fds) == len(fds) - 1 == len(set(fds)) - 1:
                os.closerange(min(fds), max(fds) + 1)  # exactly these fds
            else:
                for fd in fds:
                    os.close(fd)
    return n * 64 / (time.perf_counter() - start)


def child(kind: str, role: str, fd: int) -> None:
    sock = socket.socket(fileno=fd)
    if kind == "many":
        print(json.dumps({"fds_per_s": asyncio.run(asyncio_many_fds(sock, role))}))
        return
    if kind == "trio":
        import trio

        elapsed = trio.run(trio_pingpong, sock, role)
    elif kind == "uvloop":
        import uvloop

        elapsed = uvloop.run(asyncio_pingpong(sock, role))
    else:
        elapsed = asyncio.run(asyncio_pingpong(sock, role))
    if role == "ping":
        print(json.dumps({"round_trips_per_s": N_PINGPONG / elapsed}))


def spawn(*args: str, fd: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args, str(fd)],
        pass_fds=[fd],
        stdout=subprocess.PIPE,
        text=True,
    )


def main() -> None:
    for kind in ("asyncio", "uvloop", "trio"):
        a, b = socket.socketpair()
        echo = spawn(kind, "echo", fd=b.fileno())
        ping = spawn(kind, "ping", fd=a.fileno())
        a.close()
        b.close()
        print(f"W2 floor, {kind}: {ping.communicate()[0].strip()}")
        echo.wait()
    for mode in ("each", "close_range"):
        a, b = socket.socketpair()
        receiver = spawn("many", mode, fd=b.fileno())
        b.close()
        for _ in range(N_MANY):
            a.sendmsg([b"x"], rights(PASSED_FD, 64))
        result = receiver.communicate()[0].strip()
        print(f"W4 floor, asyncio receiver, close {mode}: {result}")
        a.close()


if __name__ == "__main__":
    if len(sys.argv) > 1:
        child(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    else:
        main()
