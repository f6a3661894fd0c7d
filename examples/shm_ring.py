"""Shared-memory ring: a memfd for the data and eventfds for wake-ups, in one record.

The producer (this process) creates a ``memfd`` for a ring buffer, seals its
size, and makes two ``eventfd``s: "data" (the producer adds the number of
bytes it wrote) and "space" (the consumer adds the number of bytes it has
finished with). It starts the consumer as a child process and passes all
three descriptors in one record. From then on the bytes never touch a
socket: the producer copies into the mapped ring and kicks "data"; the
consumer reads in place from its own mapping of the same memory and kicks
"space".

The eventfd counters carry the byte counts, so there are no head/tail
indexes in shared memory and no memory-ordering subtleties: every copy into
the ring happens before the ``write()`` that announces it, and every read
after the ``read()`` that collected it (system calls order memory).

For comparison the same bytes then go through the channel itself, as
records. The consumer checks a CRC-32 of everything it got in both cases.

    python examples/shm_ring.py               # 256 MiB each way; prints MB/s
    python examples/shm_ring.py --self-test   # 8 MiB; the ring wraps mid-write
    python examples/shm_ring.py --megabytes 1024 --backend trio

Every mode takes ``--backend asyncio|uvloop|trio``.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import mmap
import os
import random
import sys
import time
import zlib
from collections.abc import Iterator
from typing import Any

import anyio

import aiofdpass

from _common import argument_parser, run

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


async def collect(efd: int) -> int:
    """Read an eventfd's counter (and reset it), waiting until it is non-zero."""
    while True:
        try:
            return os.eventfd_read(efd)
        except BlockingIOError:
            await anyio.wait_readable(efd)


def chunks(total: int, size: int) -> Iterator[memoryview]:
    """Yield ``total`` bytes of fixed pseudo-random data in pieces of ``size``."""
    block = memoryview(random.Random(42).randbytes(1 << 20))
    sent = 0
    while sent < total:
        n = min(size, total - sent, len(block))
        start = sent % (len(block) - n + 1)
        yield block[start : start + n]
        sent += n


# -- the producer ---------------------------------------------------------------


async def produce_shm(
    consumer: aiofdpass.FdChannel, total: int, ring_size: int, chunk: int
) -> dict[str, Any]:
    """Stream ``total`` bytes through a shared ring; return the consumer's report."""
    memfd = os.memfd_create("shm-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(memfd, ring_size)
    # The consumer maps this memory: sealing the size means it can never
    # shrink under the mapping (which would crash the reader with SIGBUS).
    fcntl.fcntl(memfd, fcntl.F_ADD_SEALS, SEALS)
    data = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    space = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    setup = {"mode": "shm", "total": total, "ring": ring_size}
    try:
        with mmap.mmap(memfd, ring_size) as ring:
            await consumer.send(json.dumps(setup).encode(), [memfd, data, space])
            os.close(memfd)  # the mapping keeps the memory; the consumer has its fd
            free, pos = ring_size, 0
            for piece in chunks(total, chunk):
                n = len(piece)
                while free < n:
                    free += await collect(space)
                first = min(n, ring_size - pos)  # up to the end of the ring ...
                ring[pos : pos + first] = piece[:first]
                ring[: n - first] = piece[first:]  # ... and the rest from its start
                pos = (pos + n) % ring_size
                free -= n
                os.eventfd_write(data, n)
            report: dict[str, Any] = json.loads((await consumer.receive()).data)
            return report
    finally:
        for fd in (data, space):
            os.close(fd)


async def produce_channel(
    consumer: aiofdpass.FdChannel, total: int, chunk: int
) -> dict[str, Any]:
    """Send the same bytes as records on the channel; return the consumer's report."""
    await consumer.send(json.dumps({"mode": "channel", "total": total}).encode())
    for piece in chunks(total, chunk):
        await consumer.send(piece)
    report: dict[str, Any] = json.loads((await consumer.receive()).data)
    return report


# -- the consumer (a child process) ---------------------------------------------


async def consume_shm(setup: dict[str, Any], message: aiofdpass.Message) -> int:
    """Read ``setup["total"]`` bytes from the shared ring; return their CRC-32."""
    memfd, data, space = (fd.take() for fd in message.fds)
    try:
        if fcntl.fcntl(memfd, fcntl.F_GET_SEALS) & SEALS != SEALS:
            raise ValueError("the memfd is not sealed: it could shrink under us")
        size = setup["ring"]
        with mmap.mmap(memfd, size) as ring, memoryview(ring) as view:
            crc, got, pos = 0, 0, 0
            while got < setup["total"]:
                n = await collect(data)  # every byte written since the last read
                first = min(n, size - pos)
                crc = zlib.crc32(view[pos : pos + first], crc)  # in place: no copy
                crc = zlib.crc32(view[: n - first], crc)
                pos, got = (pos + n) % size, got + n
                os.eventfd_write(space, n)
        return crc
    finally:
        for fd in (memfd, data, space):
            os.close(fd)


async def consumer() -> None:
    """Take each setup record from the producer, consume, report bytes and CRC."""
    async with aiofdpass.channel_from_env() as producer:
        async for message in producer:
            with message:
                setup = json.loads(message.data)
                if setup["mode"] == "shm":
                    crc = await consume_shm(setup, message)
                else:
                    crc, got = 0, 0
                    while got < setup["total"]:
                        record = await producer.receive()
                        crc = zlib.crc32(record.data, crc)
                        got += len(record.data)
            await producer.send(json.dumps({"crc": crc}).encode())


# -- the run --------------------------------------------------------------------


async def both_ways(
    channel: aiofdpass.FdChannel, total: int, ring_size: int, chunk: int
) -> bool:
    """Move the bytes through the ring, then the channel; print MB/s; check CRCs."""
    expected = 0
    for piece in chunks(total, chunk):
        expected = zlib.crc32(piece, expected)
    ok = True
    for name in ("shared memory ring", "channel records"):
        start = time.perf_counter()
        if name == "shared memory ring":
            report = await produce_shm(channel, total, ring_size, chunk)
        else:
            report = await produce_channel(channel, total, chunk)
        seconds = time.perf_counter() - start
        good = report["crc"] == expected
        ok = ok and good
        print(
            f"{name:>18}: {total >> 20} MiB in {seconds:.3f}s = "
            f"{total / seconds / 1e6:.0f} MB/s, CRC-32 {'ok' if good else 'WRONG'}",
            flush=True,
        )
    return ok


async def compare(args: argparse.Namespace) -> bool:
    """Start the consumer, move the bytes both ways, report."""
    total, ring_size, chunk = args.megabytes << 20, args.ring_kib << 10, args.chunk
    command = [
        sys.executable,
        __file__,
        "--backend",
        args.backend,
        "--role",
        "consumer",
    ]
    process, channel = await aiofdpass.open_child_process(command)
    async with process, channel:
        try:
            ok = await both_ways(channel, total, ring_size, chunk)
        except BaseException:
            process.kill()  # it may be waiting on an eventfd nobody will kick
            raise
        await channel.send_eof()
        ok = await process.wait() == 0 and ok
    print(
        f"shm_ring self-test: {'PASS' if ok else 'FAIL'}: {total >> 20} MiB through "
        f"a {ring_size >> 10} KiB ring in {chunk}-byte writes and through the "
        f"channel, CRC-32 checked ({args.backend})"
    )
    return ok


def main() -> None:
    """Parse the command line and run the chosen mode."""
    parser = argument_parser(__doc__)
    parser.add_argument(
        "--megabytes", type=int, default=256, help="MiB to move each way"
    )
    parser.add_argument("--ring-kib", type=int, default=1024, help="ring size in KiB")
    parser.add_argument("--chunk", type=int, default=65536, help="bytes per write")
    parser.add_argument("--self-test", action="store_true", help="small sizes, checked")
    parser.add_argument("--role", choices=["consumer"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "consumer":
        run(consumer, backend=args.backend)
        return
    if args.self_test:
        # A chunk size that does not divide the ring: writes wrap mid-chunk.
        args.megabytes, args.ring_kib, args.chunk = 8, 64, 20000
    sys.exit(0 if run(compare, args, backend=args.backend) else 1)


if __name__ == "__main__":
    main()
