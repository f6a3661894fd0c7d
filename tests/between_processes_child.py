"""The peer process for test_between_processes.py.

Run as ``python between_processes_child.py MODE FD BACKEND``.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
import socket
import sys
import tempfile

import anyio
import anyio.lowlevel

import aiofdpass
from aiofdpass import DescriptorsLostError, FdChannel, LimitError
from aiofdpass._codec import encode_header


async def send_kinds(chan: FdChannel) -> None:
    """Send a pipe, a file, a socket and a memfd; then serve the socket."""
    r, w = os.pipe()
    os.write(w, b"pipe-data")
    os.close(w)
    f = tempfile.TemporaryFile()
    f.write(b"file-data")
    f.seek(0)
    mine, theirs = socket.socketpair()
    m = os.memfd_create("child")
    os.write(m, b"memfd-data")
    await chan.send(b"kinds", [r, f, theirs, m], close_fds=True)
    assert mine.recv(4) == b"ping"
    mine.sendall(b"pong")
    mine.close()


async def at_fd_limit(chan: FdChannel) -> None:
    """Receive at a lowered RLIMIT_NOFILE; report what happened."""
    used = {int(x) for x in os.listdir("/proc/self/fd")}
    limit = next(n for n in range(1, 10_000) if n - len(used & set(range(n))) == 2)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    await chan.send(b"ready")
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        await chan.receive()
    except DescriptorsLostError:
        print("lost", flush=True)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit + 10, hard))
    # The process is fine: it can still make and use new channels.
    a, b = aiofdpass.channel_pair()
    async with a, b:
        await a.send(b"still-works", [0])
        with await b.receive() as msg:
            print(msg.data.decode(), len(msg.fds), flush=True)


async def die_mid_record(chan: FdChannel) -> None:
    """Write half a record with its fd, then die by SIGKILL."""
    sock = chan.extra(anyio.abc.SocketAttribute.raw_socket)
    r, _ = os.pipe()
    socket.send_fds(sock, [encode_header(100, 1) + b"half"], [r])
    os.kill(os.getpid(), signal.SIGKILL)


def drop_capabilities() -> None:
    """Drop every capability: CAP_SYS_RESOURCE and CAP_SYS_ADMIN lift the limit."""
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: none
    if ctypes.CDLL(None, use_errno=True).capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset failed")


async def too_many_refs(chan: FdChannel) -> None:
    """Send 40-fd records at RLIMIT_NOFILE 64 until ETOOMANYREFS; report."""
    drop_capabilities()
    r, w = os.pipe()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
    sent = 0
    while True:
        try:
            await chan.send(b"batch", [r] * 40)
        except LimitError as exc:
            error = str(exc)
            break
        sent += 1
    print(error, flush=True)  # the parent starts receiving only now
    await chan.send(f"refused after {sent}".encode())
    # Once the peer has received (nothing in flight), the same channel works.
    assert (await chan.receive()).data == b"drained"
    await chan.send(b"after", [r, w])


async def too_many_refs_queued(chan: FdChannel) -> None:
    """Hit ETOOMANYREFS while flushing coalesced records: they wait, not drop."""
    drop_capabilities()
    r, _ = os.pipe()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
    await chan.send(b"big", [r] * 253)  # direct: 253 in flight, under 300
    # Records written at once: each follows a wait for the event loop with
    # nothing queued (the "n" record, queued behind it, is flushed by the
    # loop). The kernel checks the count in flight before adding, so the
    # fourth (301 > 300 in flight) meets ETOOMANYREFS: queued, not refused.
    for i in range(4):
        await chan.send(b"iso%d" % i, [r] * 16)
        await chan.send(b"n")
        await anyio.lowlevel.checkpoint()
    for i in range(16):  # 16 x 16 fds queued, more than the limit allows
        await chan.send(b"small%d" % i, [r] * 16)
    print("queued", flush=True)  # the parent starts receiving only now
    await chan.send_eof()  # waits until every queued record is written


MODES = {
    "send-kinds": send_kinds,
    "too-many-refs-queued": too_many_refs_queued,
    "fd-limit": at_fd_limit,
    "die": die_mid_record,
    "too-many-refs": too_many_refs,
}


async def main(mode: str, fd: int) -> None:
    async with FdChannel.from_fd(fd) as chan:
        await MODES[mode](chan)


if __name__ == "__main__":
    mode, fd, backend = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    options = {"use_uvloop": True} if backend == "uvloop" else {}
    anyio.run(
        main,
        mode,
        fd,
        backend="trio" if backend == "trio" else "asyncio",
        backend_options=options,
    )
