"""FdStream: the unframed layer."""

from __future__ import annotations

import os
import resource
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import ByteStream
from anyio.streams.buffered import BufferedByteReceiveStream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aiofdpass
from aiofdpass import DescriptorsLostError, Fd, FdStream, LimitError, stream_pair

from .helpers import (
    check_from_fd_refusals,
    copies_of,
    examples,
    identity,
    limit_with_free_slots,
    pipe,
    raw,
)

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


async def test_a_blocked_read_is_busy_for_others_and_aclose_wakes_it() -> None:
    # A receive_until has read bytes and a descriptor and waits for its
    # delimiter: every other receiving call is busy (and takes nothing);
    # aclose() from two tasks at once wakes it and closes the queue.
    a, b = stream_pair()
    with pipe() as (_, w):
        async with a:
            await a.send(b"no delimiter yet", [w])
            async with anyio.create_task_group() as tg:

                async def reader() -> None:
                    with pytest.raises(anyio.ClosedResourceError):
                        await b.receive_until(b";", 100)

                tg.start_soon(reader)
                await anyio.wait_all_tasks_blocked()
                assert b.queued_fds == 1
                for call in (
                    b.receive(),
                    b.receive_with_fds(),
                    b.receive_exactly(1),
                    b.receive_until(b"y", 100),
                ):
                    with pytest.raises(anyio.BusyResourceError):
                        await call
                assert b.queued_fds == 1
                tg.start_soon(b.aclose)
                tg.start_soon(b.aclose)
            assert b.queued_fds == 0
            assert copies_of(w) == 2  # the pipe's own ends: the copy is closed


@contextmanager
def memfds(n: int) -> Iterator[list[int]]:
    """``n`` distinct open files (memfds), closed on the way out."""
    fds = [os.memfd_create(f"fd{i}", os.MFD_CLOEXEC) for i in range(n)]
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def ids(fds: list[Fd], files: list[int]) -> list[int]:
    """Which of ``files`` each received descriptor is (its index), closing them."""
    known = [identity(f) for f in files]
    out = [known.index(identity(fd.fileno())) for fd in fds]
    for fd in fds:
        fd.close()
    return out


async def test_fdstream_is_an_anyio_byte_stream() -> None:
    a, b = stream_pair()
    async with a, b:
        assert isinstance(a, ByteStream)
        await a.send(b"bytes")
        assert await b.receive() == b"bytes"
        with pytest.raises(ValueError, match="max_bytes"):
            await b.receive(0)


async def test_receive_returns_bytes_and_queues_the_fds() -> None:
    a, b = stream_pair()
    with memfds(3) as files:
        async with a, b:
            await a.send(b"abc", files[:2])
            await a.send(b"def", files[2:])
            assert await b.receive(2) == b"ab"
            assert b.queued_fds == 2
            # The kernel glues the rest of the first send to the second.
            assert await b.receive() == b"cdef"
            assert b.queued_fds == 3
            assert b.take_fds(0) == []
            assert b.queued_fds == 3
            assert ids(b.take_fds(1), files) == [0]
            assert ids(b.take_fds(5), files) == [1, 2]  # at most what is queued
            assert b.take_fds() == []
            assert b.queued_fds == 0
            with pytest.raises(ValueError, match="0 or more"):
                b.take_fds(-1)
            with pytest.raises(TypeError, match="int or None"):
                b.take_fds(True)


async def test_a_full_descriptor_queue_refuses_to_read_and_loses_nothing() -> None:
    a, b = stream_pair()
    with memfds(4) as files:
        async with a, b:
            assert b.max_queued_fds == 256
            b.max_queued_fds = 2
            for i in range(4):
                await a.send(bytes([65 + i]), files[i : i + 1])
            assert await b.receive(1) == b"A"
            assert await b.receive(1) == b"B"
            assert b.queued_fds == 2
            for read in (
                b.receive(),
                b.receive_with_fds(),
                b.receive_exactly(1),
                b.receive_until(b"D", 10),
            ):
                with pytest.raises(LimitError, match="take_fds"):
                    await read
            assert b.queued_fds == 2  # nothing was read, nothing dropped
            assert ids(b.take_fds(), files) == [0, 1]
            data, fds = await b.receive_exactly(2)
            assert (data, ids(fds, files)) == (b"CD", [2, 3])
            with pytest.raises(ValueError, match="at least 1"):
                b.max_queued_fds = 0
            with pytest.raises(TypeError, match="int"):
                b.max_queued_fds = 2.0  # type: ignore[assignment]


async def test_buffered_bytes_come_first_without_a_read() -> None:
    a, b = stream_pair()
    with memfds(2) as files:
        async with a, b:
            await a.send(b"ab;cd", files[:1])
            data, fds = await b.receive_until(b";", 100)  # reads all five
            assert (data, ids(fds, files)) == (b"ab", [0])
            await a.send(b"ef", files[1:])
            assert await b.receive() == b"cd"
            assert b.queued_fds == 0  # nothing was read for it
            assert await b.receive() == b"ef"
            assert ids(b.take_fds(), files) == [1]


async def test_buffered_byte_receive_stream_wraps_an_fdstream() -> None:
    a, b = stream_pair()
    with memfds(1) as files:
        async with a, BufferedByteReceiveStream(b) as buffered:
            await a.send(b"GET / HTTP/1.0\r\n")
            await a.send(b"\x00\x00\x00\x05hello", files)
            await a.send_eof()
            assert await buffered.receive_until(b"\r\n", 100) == b"GET / HTTP/1.0"
            size = int.from_bytes(await buffered.receive_exactly(4), "big")
            assert await buffered.receive_exactly(size) == b"hello"
            with pytest.raises(anyio.EndOfStream):
                await buffered.receive()
            # The descriptor waited in the stream's queue.
            assert ids(b.take_fds(), files) == [0]
        assert b.closed


async def test_a_huge_max_bytes_reads_what_is_there() -> None:
    # max_bytes is the most to return, not a buffer to allocate: a caller
    # that means "whatever is there" must not get OverflowError/MemoryError.
    a, b = stream_pair()
    with memfds(1) as files:
        async with a, b:
            await a.send(b"abc")
            assert await b.receive(sys.maxsize) == b"abc"
            await a.send(b"def", files)
            data, fds = await b.receive_with_fds(sys.maxsize)
            assert (data, ids(fds, files)) == (b"def", [0])
            await a.send(b"g;")
            assert await b.receive_until(b";", sys.maxsize) == (b"g", [])


async def test_receive_exactly_across_chunk_boundaries() -> None:
    a, b = stream_pair()
    with memfds(2) as files:
        async with a, b:
            await a.send(b"he")
            await a.send(b"llo", files[:1])
            await a.send(b"wor")
            await a.send(b"ld", files[1:])
            data, fds = await b.receive_exactly(7)
            assert data == b"hellowo"
            assert ids(fds, files) == [0]
            data, fds = await b.receive_exactly(3)
            assert data == b"rld"
            assert ids(fds, files) == [1]
            assert await b.receive_exactly(0) == (b"", [])
            with pytest.raises(ValueError, match="nbytes"):
                await b.receive_exactly(-1)
            with pytest.raises(TypeError, match="nbytes must be an int"):
                await b.receive_exactly(2.0)  # type: ignore[arg-type]


async def test_byte_by_byte_arrival_with_a_descriptor_on_every_byte() -> None:
    a, b = stream_pair()
    with memfds(8) as files:
        async with a, b:
            for i, f in enumerate(files):
                await a.send(bytes([i]), [f])
            # Each call asks the kernel only for what it needs: exact.
            for i in range(3):
                data, fds = await b.receive_exactly(1)
                assert data == bytes([i])
                assert ids(fds, files) == [i]
            data, fds = await b.receive_exactly(5)
            assert data == bytes(range(3, 8))
            assert ids(fds, files) == [3, 4, 5, 6, 7]


async def test_a_descriptor_glued_to_earlier_bytes_comes_no_later() -> None:
    # KERNEL-NOTES: send(b"plain"); send_fds(b"withfd") can come back as one
    # read. receive_exactly asks for 5 bytes only, so it is exact; a reader
    # that asks for more gets the descriptor with the earlier bytes.
    a, b = stream_pair()
    with memfds(2) as files:
        async with a, b:
            for f in files:
                await a.send(b"plain")
                await a.send(b"withfd", [f])
            assert await b.receive_exactly(5) == (b"plain", [])
            data, fds = await b.receive_exactly(6)
            assert (data, ids(fds, files)) == (b"withfd", [0])
            data, fds = await b.receive_until(b"n", 100)
            assert data == b"plai"  # the read brought b"plainwithfd" and its fd
            assert ids(fds, files) == [1]
            assert await b.receive_exactly(6) == (b"withfd", [])


async def test_bytes_read_ahead_bring_their_descriptors_early() -> None:
    # receive_exactly is exact only for what it reads itself. Bytes an
    # earlier call read ahead (a receive_until that found no delimiter, a
    # cancelled or incomplete read for more) come from the buffer, with the
    # descriptors of the reads that brought them: the kernel glues b"xy" to
    # b"z" and its descriptor, so "xy" returns it, one call early.
    a, b = stream_pair()
    with memfds(2) as files:
        async with a, b:
            for i, read_ahead in enumerate((True, False)):
                await a.send(b"xy")
                await a.send(b"z", files[i : i + 1])
                if read_ahead:
                    with pytest.raises(anyio.DelimiterNotFound):
                        await b.receive_until(b";", 2)  # reads b"xyz" and the fd
                first, with_first = await b.receive_exactly(2)
                second, with_second = await b.receive_exactly(1)
                assert (first, second) == (b"xy", b"z")
                early = ids(with_first, files), ids(with_second, files)
                assert early == (([i], []) if read_ahead else ([], [i]))


async def test_receive_until() -> None:
    a, b = stream_pair()
    with memfds(3) as files:
        async with a, b:
            await a.send(b"HEL")
            await a.send(b"LO\r")
            await a.send(b"\nline", files[:1])
            await a.send(b"two\r")
            await a.send(b"\n", files[1:2])  # rides on the delimiter
            data, fds = await b.receive_until(b"\r\n", 100)
            assert data == b"HELLO"
            # The descriptor came with "\nline": a byte of the delimiter.
            assert ids(fds, files) == [0]
            data, fds = await b.receive_until(b"\r\n", 100)
            assert data == b"linetwo"
            assert ids(fds, files) == [1]
            await a.send(b"x" * 10)
            with pytest.raises(anyio.DelimiterNotFound):
                await b.receive_until(b";", 9)
            await a.send(b";", files[2:])
            data, fds = await b.receive_until(b";", 10)  # nothing was lost
            assert data == b"x" * 10
            assert ids(fds, files) == [2]
            with pytest.raises(ValueError, match="delimiter"):
                await b.receive_until(b"", 10)
            with pytest.raises(TypeError, match="delimiter must be bytes"):
                await b.receive_until(";", 10)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="max_bytes"):
                await b.receive_until(b";", 0)


async def test_eof_in_the_middle_of_an_exact_read_keeps_what_arrived() -> None:
    a, b = stream_pair()
    with memfds(2) as files:
        async with a, b:
            # A read stops after the descriptors of one sendmsg: two reads.
            await a.send(b"ab", files[:1])
            await a.send(b"cde", files[1:])
            await a.send_eof()
            with pytest.raises(anyio.IncompleteRead, match="5 byte.*2 queued"):
                await b.receive_exactly(12)
            assert b.queued_fds == 2
            # The second descriptor arrived with byte 2: it stays queued
            # until a call returns byte 2.
            data, fds = await b.receive_with_fds(2)
            assert (data, ids(fds, files)) == (b"ab", [0])
            assert b.queued_fds == 1
            data, fds = await b.receive_with_fds()
            assert (data, ids(fds, files)) == (b"cde", [1])
            for _ in range(2):
                with pytest.raises(anyio.EndOfStream):
                    await b.receive_with_fds()
                with pytest.raises(anyio.IncompleteRead):
                    await b.receive_exactly(1)


async def test_delimiter_not_found_and_eof_before_it_keep_everything() -> None:
    a, b = stream_pair()
    with memfds(2) as files:
        async with a, b:
            await a.send(b"ab", files[:1])
            await a.send(b"cde", files[1:])
            with pytest.raises(anyio.DelimiterNotFound):
                await b.receive_until(b";", 4)
            assert b.queued_fds == 2
            data, fds = await b.receive_exactly(2)
            assert (data, ids(fds, files)) == (b"ab", [0])
            await a.send_eof()
            with pytest.raises(anyio.IncompleteRead, match="delimiter b';'"):
                await b.receive_until(b";", 100)
            data, fds = await b.receive_exactly(3)
            assert (data, ids(fds, files)) == (b"cde", [1])


async def test_descriptors_sent_with_no_bytes_never_arrive() -> None:
    # Linux drops descriptors that a sendmsg carries with no data (the
    # sendmsg returns 0); FdStream.send refuses to send them that way.
    a, b = stream_pair()
    with memfds(1) as files:
        async with a, b:
            assert socket.send_fds(raw(a), [b""], files) == 0
            with pytest.raises(ValueError, match="at least one byte"):
                await a.send(b"", files)
            await a.send(b"x")
            await a.send_eof()
            assert await b.receive_with_fds() == (b"x", [])
            with pytest.raises(anyio.EndOfStream):
                await b.receive()
            assert b.queued_fds == 0


async def test_lost_descriptors_close_what_the_stream_buffered() -> None:
    # MSG_CTRUNC breaks the stream, as it breaks a channel: the descriptors
    # queued before it (with bytes still buffered) are closed at once, not
    # held open, unreachable by any read, until aclose().
    a, b = stream_pair()
    with pipe() as (_, w):
        async with a, b:
            await a.send(b"ab", [w])
            with pytest.raises(anyio.DelimiterNotFound):
                await b.receive_until(b";", 1)  # "ab" buffered, w queued
            assert b.queued_fds == 1
            await a.send(b"cd", [w] * 50)
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_with_free_slots(2), hard))
            try:
                with pytest.raises(DescriptorsLostError, match="RLIMIT_NOFILE"):
                    await b.receive_exactly(4)
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert b.queued_fds == 0
            assert b.take_fds() == []
            assert copies_of(w) == 2  # the pipe's own ends: every copy is closed
            with pytest.raises(anyio.BrokenResourceError, match="MSG_CTRUNC"):
                await b.receive()


async def test_aclose_closes_the_queued_descriptors() -> None:
    a, b = stream_pair()
    r, w = os.pipe()
    try:
        async with a:
            await a.send(b"abc", [w], close_fds=True)
            await b.receive()
            assert b.queued_fds == 1
            await b.aclose()
            assert b.queued_fds == 0
        # No copy of the write end is left anywhere: the pipe reads EOF.
        assert os.read(r, 1) == b""
    finally:
        os.close(r)


async def test_a_dropped_stream_closes_its_queue_and_warns() -> None:
    # Dropped without aclose(): its finaliser closes the socket and the
    # descriptors queued in the stream, and says so.
    a, b = stream_pair()
    with pipe() as (_, w):
        async with a:
            await a.send(b"abc", [w])
            with pytest.raises(anyio.DelimiterNotFound):
                await b.receive_until(b";", 2)  # bytes buffered, w queued
            assert b.queued_fds == 1
            with pytest.warns(ResourceWarning, match="unclosed FdStream"):
                del b  # the last reference
            assert copies_of(w) == 2  # the pipe's own ends: the copy is closed
            with pytest.raises(anyio.EndOfStream):
                await a.receive()


async def test_a_cancelled_exact_read_loses_nothing() -> None:
    a, b = stream_pair()
    with memfds(1) as files:
        async with a, b:
            await a.send(b"head", files)
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def reader() -> None:
                        await b.receive_exactly(10)

                    tg.start_soon(reader)
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()
            assert scope.cancelled_caught
            await a.send(b"-tail-")
            data, fds = await b.receive_exactly(10)
            assert (data, ids(fds, files)) == (b"head-tail-", [0])


async def test_from_fd_takes_an_fd_only_on_success() -> None:
    s1, s2 = socket.socketpair()
    owned = Fd(s1.detach())
    a = FdStream.from_fd(owned)
    assert owned.closed  # taken: the stream owns the number now
    async with a, FdStream.from_socket(s2) as b:
        await a.send(b"x")
        assert await b.receive() == b"x"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
        refused = Fd(os.dup(dgram.fileno()))
        with pytest.raises(ValueError, match="FdStream is a byte stream"):
            FdStream.from_fd(refused)
        assert not refused.closed  # still the caller's
        refused.close()
    check_from_fd_refusals(FdStream.from_fd)
    with pytest.raises(TypeError, match="descriptor number or an Fd"):
        FdStream.from_fd("3")  # type: ignore[arg-type]


async def test_send_takes_a_list_of_buffers_and_names_its_parameter() -> None:
    a, b = stream_pair()
    with memfds(1) as files:
        async with a, b:
            await a.send([b"head", bytearray(b"-"), memoryview(b"body")], files)
            await a.send((b"", b"!"))
            data, fds = await b.receive_exactly(10)
            assert (data, ids(fds, files)) == (b"head-body!", [0])
            with pytest.raises(TypeError, match=r"send\(data\).*not str"):
                await a.send(["text"])  # type: ignore[list-item]
            with pytest.raises(TypeError, match=r"send\(data\).*not int"):
                await a.send(3)  # type: ignore[arg-type]
            # A str is a sequence, but never bytes-like, even when empty.
            for text in ("", "text"):
                with pytest.raises(TypeError, match=r"send\(data\).*not str"):
                    await a.send(text)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="not C-contiguous"):
                await a.send(memoryview(b"abcd")[::2])
            with pytest.raises(ValueError, match="at least one byte"):
                await a.send([b"", b""], files)
            many = [b"%d," % i for i in range(2000)]  # over IOV_MAX (1024)
            await a.send(many, files)
            data, fds = await b.receive_exactly(len(b"".join(many)))
            assert data == b"".join(many)
            assert ids(fds, files) == [0]


# -- the rule, as a property --------------------------------------------------

#: A sendmsg (bytes, how many descriptors), or a receiving call and its size.
Step = tuple[str, bytes, int]
OPS = ("exactly", "until", "receive", "with_fds", "take")

sends = st.tuples(
    st.just("send"), st.text("ab;", max_size=20).map(str.encode), st.integers(0, 3)
)
calls = st.tuples(st.sampled_from(OPS), st.just(b""), st.integers(0, 40))


@settings(
    max_examples=examples(150),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    steps=st.lists(st.one_of(sends, calls), max_size=40),
    delimiter=st.sampled_from([b";", b";a"]),
)
async def test_property_descriptors_come_with_the_first_byte_of_their_send(
    steps: list[Step], delimiter: bytes
) -> None:
    """Random sends (descriptors on any byte) and random reads of every kind.

    Always: the bytes come in order, every descriptor exactly once and in
    order, and never later than the first call that returns a byte of its
    sendmsg. While no call read more than it returned (no receive_until
    yet), exactly then, and the queue holds exactly what the kernel handed
    over.
    """
    ours, theirs = socket.socketpair()
    stream = FdStream(theirs)
    files: list[int] = []  # every descriptor sent, in order
    starts: list[int] = []  # for each one that travels: its send's first byte
    arriving: list[int] = []  # their indexes in `files`
    sent = bytearray()
    got = bytearray()
    returned: list[int] = []  # indexes, in the order calls returned them
    exact = True

    def due(end: int) -> int:
        """How many descriptors rode on a send that began before ``end``."""
        return sum(1 for start in starts if start < end)

    def check_returned(fds: list[Fd]) -> None:
        new = ids(fds, files)
        assert new == arriving[len(returned) : len(returned) + len(new)]
        returned.extend(new)
        # Never later: every descriptor of a send begun in what was returned.
        assert len(returned) >= due(len(got))
        if exact:
            assert len(returned) == due(len(got))

    try:
        async with stream:
            for kind, data, n in steps:
                avail = bytes(sent[len(got) :])
                if kind == "send":
                    new = [os.memfd_create("f", os.MFD_CLOEXEC) for _ in range(n)]
                    files.extend(new)
                    assert socket.send_fds(ours, [data], new) == len(data)
                    if data:  # with no bytes, Linux drops the descriptors
                        starts.extend([len(sent)] * n)
                        arriving.extend(range(len(files) - n, len(files)))
                    sent += data
                elif kind == "exactly" and n <= len(avail):
                    chunk, fds = await stream.receive_exactly(n)
                    assert chunk == avail[:n]
                    got += chunk
                    check_returned(fds)
                elif kind == "until" and n >= 1:
                    index = avail.find(delimiter)
                    if 0 <= index <= n:
                        chunk, fds = await stream.receive_until(delimiter, n)
                        assert chunk == avail[:index]
                        got += avail[: index + len(delimiter)]
                        exact = False  # its reads may bring bytes after it
                        check_returned(fds)
                    elif len(avail) >= n + len(delimiter):
                        with pytest.raises(anyio.DelimiterNotFound):
                            await stream.receive_until(delimiter, n)
                        exact = False
                elif kind in ("receive", "with_fds") and n >= 1 and avail:
                    if kind == "receive":
                        chunk = await stream.receive(n)
                    else:
                        chunk, fds = await stream.receive_with_fds(n)
                    assert 1 <= len(chunk) <= n
                    assert chunk == avail[: len(chunk)]
                    got += chunk
                    if kind == "with_fds":
                        check_returned(fds)
                    elif exact:  # the kernel handed over what it returned
                        assert stream.queued_fds == due(len(got)) - len(returned)
                elif kind == "take":
                    queued = stream.queued_fds
                    taken = stream.take_fds(n)
                    assert len(taken) == min(n, queued)
                    new = ids(taken, files)
                    assert new == arriving[len(returned) : len(returned) + len(new)]
                    returned.extend(new)
            # End of stream in the middle of an exact read keeps everything.
            ours.shutdown(socket.SHUT_WR)
            missing = len(sent) - len(got)
            with pytest.raises(anyio.IncompleteRead):
                await stream.receive_exactly(missing + 1)
            assert stream.queued_fds == len(arriving) - len(returned)
            exact = False  # that read brought bytes the calls below return
            while True:
                try:
                    chunk, fds = await stream.receive_with_fds(7)
                except anyio.EndOfStream:
                    break
                got += chunk
                check_returned(fds)
            check_returned(stream.take_fds())
            assert got == sent
            assert returned == arriving
    finally:
        ours.close()
        for f in files:
            os.close(f)
