"""One side of one benchmark run: ``python workers.py IMPL WORKLOAD ROLE FD N``.

Every implementation closes every descriptor it receives, so nobody is timed
for leaking. The timed side prints one JSON line: elapsed seconds, units
done, peak RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import selectors
import socket
import sys
import time
from typing import Any

import anyio
from anyio.abc import UNIXSocketStream

import aiofdpass

MIB = 1024 * 1024
WORKLOADS: dict[str, tuple[int, int]] = {
    # name: (payload bytes, fds per record)
    "w1": (64, 1),
    "w2": (64, 1),
    "w3": (MIB, 1),
    "w4": (0, 64),
    "w5": (64, 1),
}
FAN_IN = 100


def report(elapsed: float, units: float) -> None:
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"elapsed": elapsed, "units": units, "rss_kib": rss_kib}))


def payload_for(workload: str, impl: str) -> bytes:
    size, _ = WORKLOADS[workload]
    if size == 0 and not impl.startswith("aiofdpass"):
        size = 1  # the baselines cannot send descriptors with no bytes
    return b"x" * size


def open_fd_count() -> int:
    """Descriptors open in this process: the receivers check, untimed, that
    they closed every one they received."""
    return len(os.listdir("/proc/self/fd"))


def units(workload: str, n: int, got_bytes: int, got_fds: int) -> float:
    if workload == "w3":
        return got_bytes / 1e6  # MB
    if workload == "w4":
        return got_fds
    return n


# -- stdlib: a blocking loop over socket.send_fds / recv_fds ----------------


def stdlib(workload: str, role: str, fd: int, n: int) -> None:
    _, nfds = WORKLOADS[workload]
    payload = payload_for(workload, "stdlib")
    if workload == "w5":
        return stdlib_fan_in(role, n)
    sock = socket.socket(fileno=fd)
    passed = [PASSED_FD] * nfds
    if role == "send":
        for _ in range(n):
            socket.send_fds(sock, [payload], passed)
        if workload != "w2":
            sock.shutdown(socket.SHUT_WR)
            sock.recv(1)
        return
    if role == "echo":
        for _ in range(n):
            data, fds, _, _ = socket.recv_fds(sock, 65536, nfds)
            socket.send_fds(sock, [data], fds)
            for f in fds:
                os.close(f)
        return
    if role == "pingpong":
        start = time.perf_counter()
        for _ in range(n):
            socket.send_fds(sock, [payload], passed)
            _, fds, _, _ = socket.recv_fds(sock, 65536, nfds)
            for f in fds:
                os.close(f)
        report(time.perf_counter() - start, n)
        return
    # receive: count bytes and fds until the sender shuts down
    total = len(payload) * n
    got = got_fds = 0
    start = 0.0
    bufsize = 65536  # one read size for all (a 1 MiB buffer costs more)
    opened = open_fd_count()
    while got < total:
        data, fds, _, _ = socket.recv_fds(sock, bufsize, 253)
        if not start:
            start = time.perf_counter()
        got += len(data)
        got_fds += len(fds)
        for f in fds:
            os.close(f)
    elapsed = time.perf_counter() - start
    assert got_fds == n * nfds, (got_fds, n * nfds)
    assert open_fd_count() == opened
    sock.close()
    report(elapsed, units(workload, n, got, got_fds))


def stdlib_fan_in(role: str, n: int) -> None:
    path = PATH
    payload = payload_for("w5", "stdlib")
    if role == "send":
        socks = [socket.socket(socket.AF_UNIX) for _ in range(FAN_IN)]
        for s in socks:
            s.connect(path)
        for _ in range(n // FAN_IN):
            for s in socks:
                socket.send_fds(s, [payload], [PASSED_FD])
        for s in socks:
            s.close()
        return
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(FAN_IN)
    print("ready", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    got = 0
    start = 0.0
    total = (n // FAN_IN) * FAN_IN
    while got < total:
        for key, _ in sel.select():
            s = key.fileobj
            assert isinstance(s, socket.socket)
            if s is listener:
                conn, _ = listener.accept()
                sel.register(conn, selectors.EVENT_READ)
                continue
            data, fds, _, _ = socket.recv_fds(s, 64 * len(payload), 1)
            if not data:
                sel.unregister(s)
                s.close()
                continue
            if not start:
                start = time.perf_counter()
            got += 1
            for f in fds:
                os.close(f)
    report(time.perf_counter() - start, got)
    listener.close()


# -- anyio: UNIXSocketStream.send_fds / receive_fds --------------------------


async def anyio_impl(workload: str, role: str, fd: int, n: int) -> None:
    _, nfds = WORKLOADS[workload]
    payload = payload_for(workload, "anyio")
    if workload == "w5":
        return await anyio_fan_in(role, n)
    stream: UNIXSocketStream = await UNIXSocketStream.from_socket(fd)
    passed = [PASSED_FD] * nfds
    async with stream:
        if role == "send":
            for _ in range(n):
                await stream.send_fds(payload, passed)
            if workload != "w2":
                await stream.send_eof()
                with contextlib.suppress(anyio.EndOfStream):
                    await stream.receive(1)  # until the receiver is done
            return
        if role == "echo":
            for _ in range(n):
                data, fds = await stream.receive_fds(65536, nfds)
                await stream.send_fds(data, fds)
                for f in fds:
                    os.close(f)
            return
        if role == "pingpong":
            start = time.perf_counter()
            for _ in range(n):
                await stream.send_fds(payload, passed)
                _, fds = await stream.receive_fds(65536, nfds)
                for f in fds:
                    os.close(f)
            report(time.perf_counter() - start, n)
            return
        total = len(payload) * n
        got = got_fds = 0
        start = 0.0
        bufsize = 65536  # one read size for all (a 1 MiB buffer costs more)
        opened = open_fd_count()
        while got < total:
            data, fds = await stream.receive_fds(bufsize, 253)
            if not start:
                start = time.perf_counter()
            got += len(data)
            got_fds += len(fds)
            for f in fds:
                os.close(f)
        elapsed = time.perf_counter() - start
        assert got_fds == n * nfds, (got_fds, n * nfds)
        assert open_fd_count() == opened
        report(elapsed, units(workload, n, got, got_fds))


async def anyio_fan_in(role: str, n: int) -> None:
    payload = payload_for("w5", "anyio")
    per = n // FAN_IN
    if role == "send":

        async def client() -> None:
            async with await anyio.connect_unix(PATH) as s:
                for _ in range(per):
                    await s.send_fds(payload, [PASSED_FD])

        async with anyio.create_task_group() as tg:
            for _ in range(FAN_IN):
                tg.start_soon(client)
        return
    state: dict[str, Any] = {"got": 0, "start": 0.0}
    done = anyio.Event()

    async def handle(s: Any) -> None:
        async with s:
            while True:
                try:
                    _, fds = await s.receive_fds(64 * len(payload), 1)
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    return
                for f in fds:
                    os.close(f)
                if not state["start"]:
                    state["start"] = time.perf_counter()
                state["got"] += 1
                if state["got"] == per * FAN_IN:
                    done.set()

    async with await anyio.create_unix_listener(PATH) as listener:
        print("ready", flush=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            await done.wait()
            report(time.perf_counter() - state["start"], state["got"])
            tg.cancel_scope.cancel()


# -- aiofdpass ---------------------------------------------------------------


async def aiofdpass_impl(workload: str, role: str, fd: int, n: int) -> None:
    _, nfds = WORKLOADS[workload]
    payload = payload_for(workload, "aiofdpass")
    if workload == "w5":
        return await aiofdpass_fan_in(role, n)
    chan = aiofdpass.FdChannel.from_fd(fd)
    passed = [PASSED_FD] * nfds
    async with chan:
        if role == "send":
            for _ in range(n):
                await chan.send(payload, passed)
            if workload != "w2":
                await chan.send_eof()
                async for _ in chan:
                    pass
            return
        if role == "echo":
            for _ in range(n):
                msg = await chan.receive()
                await chan.send(msg, close_fds=True)
            return
        if role == "pingpong":
            start = time.perf_counter()
            for _ in range(n):
                await chan.send(payload, passed)
                (await chan.receive()).close()
            report(time.perf_counter() - start, n)
            return
        got = got_fds = count = 0
        start = 0.0
        opened = open_fd_count()
        async for msg in chan:
            if not start:
                start = time.perf_counter()
            count += 1
            got += len(msg.data)
            # The count without making an Fd object per descriptor (the
            # message still owns them all, and close() closes them).
            got_fds += msg.nfds if HAS_NFDS else len(msg.fds)
            msg.close()
        elapsed = time.perf_counter() - start
        assert count == n, count
        assert got_fds == n * nfds, got_fds
        assert open_fd_count() == opened
        report(elapsed, units(workload, n, got, got_fds))


async def aiofdpass_fan_in(role: str, n: int) -> None:
    payload = payload_for("w5", "aiofdpass")
    per = n // FAN_IN
    if role == "send":

        async def client() -> None:
            async with await aiofdpass.connect(PATH) as chan:
                for _ in range(per):
                    await chan.send(payload, [PASSED_FD])

        async with anyio.create_task_group() as tg:
            for _ in range(FAN_IN):
                tg.start_soon(client)
        return
    state: dict[str, Any] = {"got": 0, "start": 0.0}
    done = anyio.Event()

    async def handle(chan: aiofdpass.FdChannel) -> None:
        async for msg in chan:
            msg.close()
            if not state["start"]:
                state["start"] = time.perf_counter()
            state["got"] += 1
            if state["got"] == per * FAN_IN:
                done.set()

    async with await aiofdpass.listen(PATH) as listener:
        print("ready", flush=True)
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            await done.wait()
            report(time.perf_counter() - state["start"], state["got"])
            tg.cancel_scope.cancel()


PATH = os.environ.get("BENCH_SOCKET_PATH", "")
# Message.nfds is new; an older aiofdpass (bench.py --baseline-src) counts
# with len(msg.fds), as its users did.
HAS_NFDS = hasattr(aiofdpass.Message, "nfds")
# What every implementation passes: the read end of a pipe, an ordinary
# descriptor. (Passing AF_UNIX sockets would add the kernel's garbage
# collection bookkeeping per sendmsg, which favours whoever calls it less.)
PASSED_FD, _PIPE_WRITE_END = os.pipe()


# -- floors: the event loop alone (bench/floors.py) ---------------------------


def floor(loop: str, workload: str, role: str, fd: int, n: int) -> None:
    """W2: the bare-loop ping-pong; W4: a bare asyncio receiver (close_range)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import floors

    sock = socket.socket(fileno=fd)
    if workload == "w4":
        if role == "send":
            stdlib(workload, role, sock.detach(), n)
            return
        fds_per_s = asyncio.run(floors.asyncio_many_fds(sock, "close_range", n))
        report(n * 64 / fds_per_s, n * 64)
        return
    floor_role = "ping" if role == "pingpong" else "echo"
    if loop == "trio":
        import trio

        elapsed = trio.run(floors.trio_pingpong, sock, floor_role, n)
    elif loop == "uvloop":
        import uvloop

        elapsed = uvloop.run(floors.asyncio_pingpong(sock, floor_role, n))
    else:
        elapsed = asyncio.run(floors.asyncio_pingpong(sock, floor_role, n))
    if role == "pingpong":
        report(elapsed, n)


def main() -> None:
    impl, workload, role, fd, n = sys.argv[1:6]
    if impl == "stdlib":
        stdlib(workload, role, int(fd), int(n))
        return
    family, _, loop = impl.partition("-")
    if family == "floor":
        floor(loop, workload, role, int(fd), int(n))
        return
    backend = "trio" if loop == "trio" else "asyncio"
    options = {"use_uvloop": True} if loop == "uvloop" else {}
    # "base" is aiofdpass from another source tree (bench.py --baseline-src).
    func = anyio_impl if family == "anyio" else aiofdpass_impl
    anyio.run(
        func, workload, role, int(fd), int(n), backend=backend, backend_options=options
    )


if __name__ == "__main__":
    main()
