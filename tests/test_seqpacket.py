"""SOCK_SEQPACKET channels: one record per packet, no header, the kernel frames."""

from __future__ import annotations

import array
import errno
import os
import resource
import socket
import stat
from pathlib import Path

import anyio
import pytest

import aiofdpass
from aiofdpass import (
    DescriptorsLostError,
    FdChannel,
    LimitError,
    Limits,
    ProtocolError,
    channel_pair,
)

from .helpers import (
    copies_of,
    identity,
    limit_with_free_slots,
    pipe,
    rights,
    small_buffers,
)

pytestmark = pytest.mark.anyio


def packets_pair(
    *, small: bool = False, **kwargs: object
) -> tuple[FdChannel, socket.socket]:
    """A SEQPACKET channel and a plain socket playing its peer (blocking).

    ``small``: the channel's send buffer holds about ten small packets (a
    connected SEQPACKET socket is limited by the sender's SO_SNDBUF only).
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if small:
        small_buffers(a)
    return FdChannel.from_socket(a, **kwargs), b  # type: ignore[arg-type]


def read_packet(sock: socket.socket) -> tuple[bytes, list[int]]:
    data, ancdata, flags, _ = sock.recvmsg(1 << 20, socket.CMSG_SPACE(253 * 4))
    assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
    fds: list[int] = []
    for level, kind, raw in ancdata:
        assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
        fds.extend(array.array("i", raw))
    return data, fds


async def test_a_record_is_exactly_one_packet_with_no_header() -> None:
    chan, peer = packets_pair()
    async with chan:
        with peer, pipe() as (r, w):
            await chan.send(b"hello", [r, w])
            data, fds = await anyio.to_thread.run_sync(read_packet, peer)
            assert data == b"hello"
            assert [identity(fd) for fd in fds] == [identity(r), identity(w)]
            for fd in fds:
                os.close(fd)
            peer.sendmsg([b"from a C-like peer"], rights(w))
            with await chan.receive() as msg:
                assert msg.data == b"from a C-like peer"
                assert [identity(fd.fileno()) for fd in msg.fds] == [identity(w)]


async def test_records_sent_in_a_burst_stay_separate_packets() -> None:
    # Records sent one after another are coalesced on a stream; on a packet
    # socket each is its own sendmsg, also when the send buffer is full
    # (small: about ten packets) and they wait in the channel's queue.
    chan, peer = packets_pair(small=True)
    sent = [b"%d" % i * (i % 7) for i in range(200)]
    async with chan:
        with peer, pipe() as (r, _):

            def read_all() -> list[tuple[bytes, int]]:
                got = []
                for _ in sent:
                    data, fds = read_packet(peer)
                    got.append((data, len(fds)))
                    for fd in fds:
                        os.close(fd)
                return got

            async with anyio.create_task_group() as tg:
                result: list[list[tuple[bytes, int]]] = []

                async def reader() -> None:
                    result.append(await anyio.to_thread.run_sync(read_all))

                tg.start_soon(reader)
                for i, data in enumerate(sent):
                    await chan.send(data, [r] * (i % 3))
            assert result[0] == [(data, i % 3) for i, data in enumerate(sent)]


async def test_large_record_is_one_packet() -> None:
    a, b = channel_pair(kind="seqpacket")
    payload = os.urandom(150_000)  # over 64 KiB: the direct path
    async with a, b:
        with pipe() as (r, _):
            await a.send(payload, [r] * 20)
            await a.send(b"", [r] * 20)  # the direct path with no bytes
            await a.send(b"after")
            with await b.receive() as msg:
                assert msg.data == payload
                assert len(msg.fds) == 20
            with await b.receive() as msg:
                assert (msg.data, len(msg.fds)) == (b"", 20)
            assert (await b.receive()).data == b"after"


async def test_empty_packet_is_a_record_and_the_end_is_the_end() -> None:
    chan, peer = packets_pair()
    async with chan:
        with pipe() as (r, _):
            peer.send(b"")  # no descriptors: SO_PASSCRED tells it from the end
            peer.sendmsg([b""], rights(r))
            await chan.send(b"")
            assert (await chan.receive()).data == b""
            with await chan.receive() as msg:
                assert msg.data == b""
                assert identity(msg.fds[0].fileno()) == identity(r)
            assert peer.recv(10) == b""
            peer.close()
            with pytest.raises(anyio.EndOfStream):
                await chan.receive()
            with pytest.raises(anyio.EndOfStream):
                await chan.receive()


async def test_oversized_packet_is_refused_and_the_next_is_intact() -> None:
    chan, peer = packets_pair(limits=Limits(max_payload=10))
    async with chan:
        with peer, pipe() as (r, _):
            before = copies_of(r)
            peer.sendmsg([b"x" * 11], rights(r, r))
            peer.send(b"0123456789")
            with pytest.raises(ProtocolError, match="11-byte packet"):
                await chan.receive()
            assert copies_of(r) == before  # never installed in this process
            assert (await chan.receive()).data == b"0123456789"


async def test_packet_with_too_many_descriptors_is_refused() -> None:
    chan, peer = packets_pair(limits=Limits(max_fds=2))
    async with chan:
        with peer, pipe() as (r, _):
            before = copies_of(r)
            peer.sendmsg([b"three"], rights(r, r, r))
            peer.sendmsg([b"two"], rights(r, r))
            with pytest.raises(ProtocolError, match="3 descriptors"):
                await chan.receive()
            assert copies_of(r) == before
            with await chan.receive() as msg:
                assert (msg.data, len(msg.fds)) == (b"two", 2)


async def test_lost_descriptors_raise_and_the_channel_goes_on() -> None:
    a, b = channel_pair(kind="seqpacket")
    async with a, b:
        with pipe() as (r, _):
            await a.send(b"many", [r] * 50)
            await a.send(b"next", [r])
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_with_free_slots(2), hard))
            try:
                with pytest.raises(
                    DescriptorsLostError, match="arrived and were closed"
                ):
                    await b.receive()
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            with await b.receive() as msg:
                assert (msg.data, len(msg.fds)) == (b"next", 1)


async def test_send_over_the_packet_size_is_refused_before_anything_is_sent() -> None:
    a, b = channel_pair(kind="seqpacket")
    async with a, b:
        room = a.extra(anyio.abc.SocketAttribute.raw_socket).getsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF
        )
        with pytest.raises(LimitError, match="SO_SNDBUF"):
            await a.send(b"x" * (room - 31))
        await a.send(b"x" * (room - 32))
        assert len((await b.receive()).data) == room - 32


async def test_listen_and_connect_seqpacket(tmp_path: Path) -> None:
    path = tmp_path / "seq.sock"
    async with await aiofdpass.listen(path, kind="seqpacket", mode=0o640) as listener:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        with pytest.raises(OSError, match="Protocol wrong type") as info:
            await aiofdpass.connect(path)  # a stream socket: the wrong kind
        assert info.value.errno == errno.EPROTOTYPE
        client = await aiofdpass.connect(path, kind="seqpacket")
        server = await listener.accept()
        async with client, server:
            raw = server.extra(anyio.abc.SocketAttribute.raw_socket)
            assert raw.type == socket.SOCK_SEQPACKET
            await client.send(b"")
            await client.send(b"two")
            assert [(await server.receive()).data for _ in range(2)] == [b"", b"two"]
    assert not path.exists()


async def test_kind_is_checked() -> None:
    with pytest.raises(ValueError, match="create_datagram_socket"):
        channel_pair(kind="dgram")
    with pytest.raises(ValueError, match="'stream' or 'seqpacket'"):
        await aiofdpass.listen("\0aiofdpass-kind-test", kind="datagram")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as listening:
        listening.bind(f"\0aiofdpass-seqpacket-{os.getpid()}")
        listening.listen()
        with pytest.raises(ValueError, match="listening, not connected"):
            FdChannel.from_socket(listening)


async def test_a_packet_that_looks_like_a_header_is_just_data() -> None:
    # No header on SEQPACKET: a peer cannot lie about lengths or counts; the
    # kernel's boundaries and the attached descriptors are all there is.
    chan, peer = packets_pair()
    async with chan:
        with peer, pipe() as (r, _):
            lie = b"FD\x01\x00\x00\x05\x00\x00\xff\xff\xff\xff"  # "5 fds, 4 GiB"
            peer.sendmsg([lie], rights(r))
            with await chan.receive() as msg:
                assert msg.data == lie
                assert len(msg.fds) == 1


async def test_a_cancelled_receive_loses_no_packet() -> None:
    a, b = channel_pair(kind="seqpacket")
    async with a, b:
        with pipe() as (r, _):
            async with anyio.create_task_group() as tg:
                tg.start_soon(b.receive)  # waits: nothing sent yet
                await anyio.wait_all_tasks_blocked()
                tg.cancel_scope.cancel()
            await a.send(b"after", [r])
            with await b.receive() as msg:
                assert (msg.data, len(msg.fds)) == (b"after", 1)


async def test_a_live_listener_of_either_kind_is_never_replaced(tmp_path: Path) -> None:
    # The liveness probe is a stream socket: a SEQPACKET listener answers it
    # with EPROTOTYPE, which means alive.
    path = tmp_path / "live.sock"
    async with await aiofdpass.listen(path, kind="seqpacket"):
        for kind in ("stream", "seqpacket"):
            with pytest.raises(OSError, match="another process") as info:
                await aiofdpass.listen(path, kind=kind)
            assert info.value.errno == errno.EADDRINUSE
        async with await aiofdpass.connect(path, kind="seqpacket"):
            pass


async def test_each_record_is_written_at_once_when_the_socket_has_room() -> None:
    # On a stream the second of two back-to-back sends waits for the loop's
    # flush (coalescing); a packet socket writes each one at once.
    chan, peer = packets_pair()
    async with chan:
        with peer:
            peer.setblocking(False)
            await chan.send(b"first")
            await chan.send(b"second")
            assert peer.recv(100) == b"first"
            assert peer.recv(100) == b"second"


async def test_queued_packets_dropped_at_close_are_logged_and_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    chan, peer = packets_pair(small=True)
    with peer, pipe() as (r, _):
        before = copies_of(r)
        for i in range(50):  # the peer never reads: most wait in the queue
            await chan.send(b"%d" % i, [r])
        assert copies_of(r) > before  # the queue's own duplicates
        chan.close_timeout = 0
        await chan.aclose()
        assert copies_of(r) == before  # the kernel still holds the sent ones
    dropped = [
        rec.getMessage() for rec in caplog.records if "dropped" in rec.getMessage()
    ]
    assert len(dropped) == 1
    assert "queued record(s) that were never written" in dropped[0]


async def test_seqpacket_listener_keeps_allow_and_stale_socket_rules(
    tmp_path: Path,
) -> None:
    path = tmp_path / "seq.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: replaced
    others = {os.getuid() + 1}
    async with await aiofdpass.listen(path, kind="seqpacket", allow=others) as lst:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lst.accept)  # never returns: the peer is refused
            async with await aiofdpass.connect(path, kind="seqpacket") as client:
                with pytest.raises(anyio.EndOfStream):
                    await client.receive()  # closed unread by the listener
            tg.cancel_scope.cancel()


async def test_packets_sent_before_a_reset_are_delivered() -> None:
    # The peer sends two records and closes without reading ours: Linux
    # reports ECONNRESET once, before those two packets (a stream reports it
    # after its data). Nothing the peer sent is lost; then end of stream.
    chan, peer = packets_pair()
    async with chan:
        with pipe() as (r, _):
            peer.send(b"one")
            peer.sendmsg([b"two"], rights(r))
            await chan.send(b"never read")
            peer.close()
            assert (await chan.receive()).data == b"one"
            with await chan.receive() as msg:
                assert (msg.data, len(msg.fds)) == (b"two", 1)
            with pytest.raises(anyio.EndOfStream):
                await chan.receive()
            with pytest.raises(anyio.BrokenResourceError):
                await chan.send(b"to nobody")


async def test_statistics_count_packets_without_a_header() -> None:
    a, b = channel_pair(kind="seqpacket")
    async with a, b:
        with pipe() as (r, _):
            await a.send(b"ab", [r])
            await a.send(b"")
            for _ in range(2):
                (await b.receive()).close()
        sent, got = a.statistics(), b.statistics()
        assert (sent.records_sent, sent.bytes_sent, sent.fds_sent) == (2, 2, 1)
        assert (got.records_received, got.bytes_received, got.fds_received) == (
            2,
            2,
            1,
        )
    chan, peer = packets_pair(small=True)
    with peer:
        async with chan:
            for _ in range(50):  # the peer never reads: most wait queued
                await chan.send(b"x")
            queued = chan.statistics()
            assert queued.records_queued > 0
            assert queued.bytes_queued == queued.records_queued  # 1 byte each
            chan.close_timeout = 0


@pytest.mark.parametrize("size", [20_000, 100_000], ids=["small-path", "direct"])
async def test_a_send_buffer_shrunk_after_the_channel_was_made_refuses_cleanly(
    size: int,
) -> None:
    # The channel checks a packet's size against SO_SNDBUF when it is made;
    # if the buffer shrinks later, the kernel's EMSGSIZE must still be a
    # LimitError with nothing sent, the descriptors the caller's, and the
    # channel usable (it used to break the channel).
    chan, peer = packets_pair()
    async with chan:
        with peer, pipe() as (r, _):
            raw = chan.extra(anyio.abc.SocketAttribute.raw_socket)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            before = copies_of(r)
            with pytest.raises(LimitError, match="EMSGSIZE"):
                await chan.send(b"x" * size, [r])
            assert copies_of(r) == before
            peer.setblocking(False)
            with pytest.raises(BlockingIOError):
                peer.recv(1)  # nothing was sent
            await chan.send(b"small", [r])
            peer.setblocking(True)
            data, fds = read_packet(peer)
            for fd in fds:
                os.close(fd)
            assert (data, len(fds)) == (b"small", 1)


async def test_empty_packets_sent_before_the_channel_was_made_are_records() -> None:
    # The channel turns SO_PASSCRED on when it is made; the kernel attaches
    # credentials when a packet is read, so empty packets already queued
    # (with and without descriptors) are still told from the end.
    a, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with pipe() as (r, _):
        with peer:
            peer.send(b"")
            peer.sendmsg([b""], rights(r))
            peer.send(b"")
        chan = FdChannel.from_socket(a)
        async with chan:
            assert (await chan.receive()).data == b""
            with await chan.receive() as msg:
                assert (msg.data, len(msg.fds)) == (b"", 1)
            assert (await chan.receive()).data == b""
            with pytest.raises(anyio.EndOfStream):
                await chan.receive()
