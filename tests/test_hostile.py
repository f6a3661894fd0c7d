"""A hostile or broken peer, over real socketpairs: clear errors, no leaked fd.

The peer here writes raw bytes and ``SCM_RIGHTS`` with ``socket.send_fds``,
so it can lie in every way the framing allows. Each test also checks that
the receiver released the descriptors at the moment it raised: the peer sends
the write end of a pipe and closes its own copy, so the read end sees end of
file only once no copy is left anywhere (the autouse fixture then checks the
descriptor table as a whole).
"""

from __future__ import annotations

import os
import socket
import struct
import tracemalloc
from collections.abc import Iterator

import anyio
import pytest

from aiofdpass import Limits, ProtocolError, channel_pair
from aiofdpass._codec import READ_SIZE

from .helpers import raw, small_buffers

pytestmark = pytest.mark.anyio


def header(
    nfds: int = 0,
    length: int = 0,
    *,
    magic: bytes = b"FD",
    version: int = 1,
    flags: int = 0,
    reserved: int = 0,
) -> bytes:
    return struct.pack("!2sBBHHI", magic, version, flags, nfds, reserved, length)


class Probe:
    """A pipe whose write end is what gets sent; tells whether copies remain."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)

    def copies(self, n: int) -> list[int]:
        return [self.w] * n

    def drop_mine(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    def released(self) -> bool:
        """True once no write end is open anywhere (this process or in flight)."""
        try:
            return os.read(self.r, 1) == b""
        except BlockingIOError:
            return False

    def close(self) -> None:
        self.drop_mine()
        os.close(self.r)


@pytest.fixture
def probe() -> Iterator[Probe]:
    p = Probe()
    yield p
    p.close()


@pytest.mark.parametrize(
    ("bad", "nfds", "match"),
    [
        (header(version=2), 0, "unsupported protocol version 2"),
        (header(version=0, nfds=2, length=3) + b"abc", 2, "version 0"),
        (header(flags=0x80, nfds=1, length=1) + b"x", 1, "flags 0x80"),
        (header(reserved=1), 0, "reserved 0x1"),
        (header(magic=b"DF", nfds=1, length=1) + b"x", 1, "bad magic"),
        (header(nfds=5, length=1) + b"x", 5, "5 descriptors in one record"),
        (header(nfds=3, length=2) + b"ab", 2, "announced 3 descriptor"),
    ],
    ids=[
        "version-2",
        "version-0",
        "flags",
        "reserved",
        "magic",
        "nfds-over-max_fds",
        "fewer-fds-than-announced",
    ],
)
async def test_bad_record_breaks_the_channel_and_closes_its_fds(
    probe: Probe, bad: bytes, nfds: int, match: str
) -> None:
    a, b = channel_pair(limits=Limits(max_fds=4))
    async with a, b:
        socket.send_fds(raw(a), [header(1, 4) + b"good"], probe.copies(1))
        if nfds:
            socket.send_fds(raw(a), [bad], probe.copies(nfds))
        else:
            raw(a).sendall(bad)
        probe.drop_mine()
        with await b.receive() as msg:  # the good record before it is intact
            assert msg.data == b"good" and len(msg.fds) == 1
        with pytest.raises(ProtocolError, match=match):
            await b.receive()
        assert probe.released()  # every fd of the bad record is closed
        with pytest.raises(anyio.BrokenResourceError):
            await b.receive()
        with pytest.raises(anyio.BrokenResourceError):
            await b.send(b"x")
        with pytest.raises(anyio.EndOfStream):  # the peer sees the break
            await a.receive()


async def test_oversized_payload_header_does_not_grow_memory() -> None:
    # A header announcing 4 GiB - 1 followed by as much junk as the socket
    # holds: refused from the header, after at most one 64 KiB read.
    a, b = channel_pair()
    async with a, b:
        junk = header(0, 2**32 - 1) + b"\xaa" * 200_000
        raw(a).setblocking(True)
        raw(a).settimeout(5)
        sent = raw(a).send(junk)
        assert sent > 2 * READ_SIZE
        tracemalloc.start()
        try:
            with pytest.raises(ProtocolError, match="4294967295-byte payload"):
                await b.receive()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 256 * 1024, peak


async def test_payload_over_max_payload_by_one_byte(probe: Probe) -> None:
    a, b = channel_pair(limits=Limits(max_payload=1000))
    async with a, b:
        socket.send_fds(raw(a), [header(1, 1001) + b"y" * 1001], probe.copies(1))
        probe.drop_mine()
        with pytest.raises(ProtocolError, match="1001-byte payload"):
            await b.receive()
        assert probe.released()
        # Exactly at the limit is fine on a fresh channel.
        c, d = channel_pair(limits=Limits(max_payload=1000))
        async with c, d:
            await c.send(b"z" * 1000)
            assert (await d.receive()).data == b"z" * 1000


async def test_more_fds_than_announced_then_eof(probe: Probe) -> None:
    a, b = channel_pair()
    async with b:
        socket.send_fds(raw(a), [header(1, 3) + b"one"], probe.copies(3))
        probe.drop_mine()
        await a.aclose()
        with await b.receive() as msg:  # the record takes the first fd
            assert msg.data == b"one" and len(msg.fds) == 1
        with pytest.raises(ProtocolError, match="2 descriptor.*no record claimed"):
            await b.receive()
        assert probe.released()


async def test_more_fds_than_announced_on_a_live_connection(probe: Probe) -> None:
    # Two records announcing no fds carry 200 each: more than 253 are
    # unclaimed once both are taken, and the peer keeps the connection open.
    a, b = channel_pair()
    async with a, b:
        for tag in (b"r1", b"r2"):
            socket.send_fds(raw(a), [header(0, 2) + tag], probe.copies(200))
        probe.drop_mine()
        assert (await b.receive()).data == b"r1"
        assert (await b.receive()).data == b"r2"
        with pytest.raises(ProtocolError, match="400 descriptors arrived that no"):
            await b.receive()
        assert probe.released()


@pytest.mark.parametrize(
    ("first", "match"),
    [
        (b"\0", "bad magic"),  # IO::FDPass, APUE's send_fd: one NUL byte
        (b"FD\x07", "unsupported protocol version 7"),
    ],
    ids=["one-nul-byte", "version-in-a-fragment"],
)
async def test_a_foreign_peer_fails_at_its_first_bytes_not_at_a_whole_header(
    probe: Probe, first: bytes, match: str
) -> None:
    # The peer sends fewer bytes than a header and waits for an answer (it
    # keeps its end open): receive() must not wait for a header that will
    # never come, and must point at FdStream, the layer for such peers.
    a, b = channel_pair()
    async with a, b:
        socket.send_fds(raw(a), [first], probe.copies(1))
        probe.drop_mine()
        with anyio.fail_after(10), pytest.raises(ProtocolError, match=match) as info:
            await b.receive()
        assert "FdStream" in str(info.value)
        assert probe.released()
        with pytest.raises(anyio.BrokenResourceError):
            await b.receive()


async def test_fds_sent_with_no_bytes_are_dropped_by_the_kernel(
    probe: Probe,
) -> None:
    # A sendmsg with descriptors and no data: Linux accepts it and drops the
    # descriptors. Nothing reaches the receiver, and nothing stays open.
    a, b = channel_pair()
    async with a, b:
        assert (
            raw(a).sendmsg(
                [],
                [
                    (
                        socket.SOL_SOCKET,
                        socket.SCM_RIGHTS,
                        struct.pack("3i", *probe.copies(3)),
                    )
                ],
            )
            == 0
        )
        probe.drop_mine()
        assert probe.released()
        await a.send(b"next")
        with await b.receive() as msg:
            assert msg.data == b"next" and msg.fds == ()


async def test_fds_attached_to_a_header_fragment_then_eof(probe: Probe) -> None:
    a, b = channel_pair()
    async with b:
        socket.send_fds(raw(a), [header(2, 10)[:5]], probe.copies(2))
        probe.drop_mine()
        await a.aclose()
        with pytest.raises(ProtocolError, match="middle of a record"):
            await b.receive()
        assert probe.released()


async def test_peer_closes_in_the_middle_of_its_send(probe: Probe) -> None:
    # A library peer blocked in a large send is closed by another task: the
    # receiver gets the truncated record's fd and then a ProtocolError.
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    async with b:
        async with anyio.create_task_group() as tg:

            async def send_big() -> None:
                with pytest.raises(anyio.ClosedResourceError):
                    await a.send(b"x" * 2_000_000, probe.copies(1))

            tg.start_soon(send_big)
            await anyio.wait_all_tasks_blocked()
            await a.aclose()
        probe.drop_mine()
        with pytest.raises(ProtocolError, match="middle of a record"):
            await b.receive()
        assert probe.released()


async def test_peer_half_closes_in_the_middle_of_a_record(probe: Probe) -> None:
    a, b = channel_pair()
    async with a, b:
        socket.send_fds(raw(a), [header(1, 100) + b"partial"], probe.copies(1))
        probe.drop_mine()
        raw(a).shutdown(socket.SHUT_WR)  # still reading
        with pytest.raises(ProtocolError, match="middle of a record"):
            await b.receive()
        assert probe.released()
        with pytest.raises(anyio.BrokenResourceError):
            await b.send(b"reply")
        # The half-closed peer, still reading, sees the receiver go away.
        with pytest.raises(anyio.EndOfStream):
            await a.receive()


async def test_peer_half_closes_between_records_and_still_reads(
    probe: Probe,
) -> None:
    a, b = channel_pair()
    async with a, b:
        await a.send(b"last", probe.copies(1))
        await a.send_eof()
        with await b.receive() as msg:
            assert msg.data == b"last" and len(msg.fds) == 1
        with pytest.raises(anyio.EndOfStream):
            await b.receive()
        # Not broken: the other direction carries records and fds.
        await b.send(b"reply", probe.copies(2))
        with await a.receive() as reply:
            assert reply.data == b"reply" and len(reply.fds) == 2
        probe.drop_mine()
        assert probe.released()
