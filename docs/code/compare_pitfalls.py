"""Three situations where anyio's send_fds/receive_fds and aiofdpass differ.

Run ``python compare_pitfalls.py``: each line says what anyio did, then what
aiofdpass did, with the same peers and the same descriptors.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
from collections.abc import Iterator

import anyio
from anyio.abc import UNIXSocketStream

import aiofdpass


async def anyio_pair() -> tuple[UNIXSocketStream, UNIXSocketStream]:
    a, b = socket.socketpair()
    return await UNIXSocketStream.from_socket(a), await UNIXSocketStream.from_socket(b)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


@contextlib.contextmanager
def room_for(n: int) -> Iterator[None]:
    """Lower RLIMIT_NOFILE so that exactly ``n`` more descriptors fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = free = 0
    while free < n:
        try:
            os.fstat(limit)
        except OSError:
            free += 1
        limit += 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def a_socket_as_descriptor() -> None:
    """Send a connected socket object."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        left, right = await anyio_pair()
        async with left, right:
            # anyio annotates fds as int | IOBase; at run time a socket is
            # dropped with no error (mypy would catch it, a plain run does not).
            await left.send_fds(b"a socket", [theirs])  # type: ignore[list-item]
            data, fds = await right.receive_fds(1024, 1)
            print("socket object, anyio:    ", data, f"{len(fds)} fds")
            close_all(fds)
        left2, right2 = aiofdpass.channel_pair()
        async with left2, right2:
            await left2.send(b"a socket", [theirs])
            with await right2.receive() as msg:
                print("socket object, aiofdpass:", msg.data, f"{len(msg.fds)} fds")


async def plain_bytes_then_descriptors() -> None:
    """Send b"hello " with no descriptor, then b"world" with one."""
    r, w = os.pipe()
    try:
        left, right = await anyio_pair()
        async with left, right:
            await left.send(b"hello ")
            await left.send_fds(b"world", [r])
            data, fds = await right.receive_fds(1024, 1)
            print("two messages, anyio:     ", data, f"{len(fds)} fds")
            close_all(fds)
        left2, right2 = aiofdpass.channel_pair()
        async with left2, right2:
            await left2.send(b"hello ")
            await left2.send(b"world", [r])
            for _ in range(2):
                with await right2.receive() as msg:
                    print("two messages, aiofdpass: ", msg.data, f"{len(msg.fds)} fds")
    finally:
        os.close(r)
        os.close(w)


async def receiver_out_of_descriptors() -> None:
    """Send three descriptors to a receiver with room for one more."""
    r, w = os.pipe()
    try:
        left, right = await anyio_pair()
        async with left, right:
            await left.send_fds(b"three", [r, r, r])
            with room_for(1):
                data, fds = await right.receive_fds(1024, 3)
            print("fd limit, anyio:         ", data, f"{len(fds)} fds")
            close_all(fds)
        left2, right2 = aiofdpass.channel_pair()
        async with left2, right2:
            await left2.send(b"three", [r, r, r])
            with room_for(1):
                try:
                    await right2.receive()
                except aiofdpass.DescriptorsLostError as exc:
                    print("fd limit, aiofdpass:     ", type(exc).__name__)
    finally:
        os.close(r)
        os.close(w)


async def main() -> None:
    await a_socket_as_descriptor()
    await plain_bytes_then_descriptors()
    await receiver_out_of_descriptors()


anyio.run(main)
