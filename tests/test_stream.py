"""FdStream: the unframed layer."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import anyio
import pytest

import aiofdpass
from aiofdpass import FdStream, LimitError, stream_pair

from .helpers import identity, pipe

pytestmark = pytest.mark.anyio


async def test_fds_come_with_the_first_byte_of_their_send() -> None:
    a, b = stream_pair()
    with pipe() as (r, w):
        async with a, b:
            await a.send(b"plain")
            await a.send(b"withfd", [r])
            await a.send(b"second", [w])
            got = b""
            fds: list[aiofdpass.Fd] = []
            while len(got) < 17:
                data, new = await b.receive_with_fds()
                # The read that returns a send's fds also returns that
                # send's first byte (offset 5 for r, 11 for w).
                for i, _ in enumerate(new, start=len(fds)):
                    first_byte = (5, 11)[i]
                    assert len(got) <= first_byte < len(got) + len(data)
                got += data
                fds.extend(new)
            assert got == b"plainwithfdsecond"
            assert [identity(fd.fileno()) for fd in fds] == [identity(r), identity(w)]
            for fd in fds:
                fd.close()


async def test_small_reads_split_bytes_but_never_drop_fds() -> None:
    a, b = stream_pair()
    with pipe() as (r, _):
        async with a, b:
            await a.send(b"abcdef", [r, r])
            data, fds = await b.receive_with_fds(2)
            assert data == b"ab" and len(fds) == 2
            for fd in fds:
                fd.close()
            assert await b.receive_with_fds(100) == (b"cdef", [])
            await a.send_eof()
            with pytest.raises(anyio.EndOfStream):
                await b.receive_with_fds()


async def test_stream_argument_errors() -> None:
    a, b = stream_pair()
    with pipe() as (r, _):
        async with a, b:
            with pytest.raises(ValueError, match="at least one byte"):
                await a.send(b"", [r])
            with pytest.raises(LimitError):
                await a.send(b"x", [r] * 254)
            with pytest.raises(ValueError, match="max_bytes"):
                await b.receive_with_fds(0)
            await a.send(b"")  # nothing to do
            await a.send(b"x", [r], close_fds=False)
            data, fds = await b.receive_with_fds()
            assert data == b"x"
            fds[0].close()


async def test_stream_from_fd_socket_and_connect(tmp_path: Path) -> None:
    s1, s2 = socket.socketpair()
    a = FdStream.from_fd(s1.detach())
    b = FdStream.from_socket(s2)
    async with a, b:
        await a.send(b"x")
        assert (await b.receive_with_fds())[0] == b"x"
    with socket.socket(socket.AF_INET) as tcp:
        fd = tcp.fileno()
        with pytest.raises(ValueError, match="AF_UNIX"):
            FdStream.from_fd(fd)
        os.fstat(fd)
    path = tmp_path / "s.sock"
    async with await aiofdpass.listen(path) as listener:
        async with await aiofdpass.connect_stream(path) as stream:
            async with await listener.accept() as chan:
                await stream.send(aiofdpass._codec.encode_header(2, 0) + b"ok")
                assert (await chan.receive()).data == b"ok"


async def test_stream_close_and_busy() -> None:
    a, b = stream_pair()
    async with a:
        async with anyio.create_task_group() as tg:

            async def reader() -> None:
                with pytest.raises(anyio.ClosedResourceError):
                    await b.receive_with_fds()

            tg.start_soon(reader)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(anyio.BusyResourceError):
                await b.receive_with_fds()
            await b.aclose()
        with pytest.raises(anyio.ClosedResourceError):
            await b.receive_with_fds()
