"""FdChannel over real socketpairs, on asyncio, asyncio+uvloop and trio."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import os
import resource
import socket
import tempfile
from typing import Any

import anyio
import pytest
from anyio.abc import SocketAttribute

import aiofdpass
from aiofdpass import (
    DescriptorsLostError,
    Fd,
    FdChannel,
    LimitError,
    Limits,
    Message,
    ProtocolError,
    channel_pair,
)
from aiofdpass._codec import encode_header

from .helpers import (
    check_from_fd_refusals,
    identity,
    limit_with_free_slots,
    open_fds,
    pipe,
    raw,
    small_buffers,
)

pytestmark = pytest.mark.anyio


async def test_pipe_file_socket_memfd_all_work_after_passing() -> None:
    a, b = channel_pair()
    r, w = os.pipe()
    f = tempfile.TemporaryFile()
    s1, s2 = socket.socketpair()
    m = os.memfd_create("test")
    os.write(m, b"shared")
    f.write(b"file-content")
    f.flush()
    async with a, b:
        await a.send(b"four", [r, f, s1, m])
        ids = [identity(x) for x in (r, f.fileno(), s1.fileno(), m)]
        for x in (r, w, m):
            os.close(x)
        f.close()
        s1.close()
        # The sender closed everything: the files live on in the message.
        with await b.receive() as msg:
            assert msg.data == b"four"
            assert [identity(fd.fileno()) for fd in msg.fds] == ids
            rfd, ffd, sfd, mfd = msg.fds
            assert os.read(rfd.fileno(), 1) == b""  # the write end is gone
            with ffd.to_file("rb") as g:
                g.seek(0)
                assert g.read() == b"file-content"
            with sfd.to_socket() as sock:
                sock.sendall(b"via-passed-socket")
                assert s2.recv(100) == b"via-passed-socket"
            assert os.pread(mfd.fileno(), 6, 0) == b"shared"
    s2.close()


async def test_fd_kinds_accepted_by_send(anyio_backend_name: str) -> None:
    a, b = channel_pair()
    s1, s2 = socket.socketpair()
    with pipe() as (r, w), s1, s2:
        fd_obj = Fd(os.dup(r))
        pyfile = os.fdopen(os.dup(w), "wb")
        sources: list[Any] = [r, pyfile, s1, fd_obj]
        expected = [identity(r), identity(w), identity(s1.fileno()), identity(r)]
        if anyio_backend_name == "trio":
            import trio

            sources.append(trio.socket.from_stdlib_socket(s2.dup()))
            expected.append(identity(s2.fileno()))
        async with a, b:
            await a.send(b"", sources, close_fds=True)
            with await b.receive() as msg:
                assert [identity(fd.fileno()) for fd in msg.fds] == expected
            assert fd_obj.closed and pyfile.closed
            assert s1.fileno() == -1
            # close_fds closed the int too: r is gone.
            with pytest.raises(OSError):  # noqa: PT011
                os.fstat(r)
            r2 = os.dup(w)
            os.dup2(r2, r)  # give `pipe()` something to close
            os.close(r2)


async def test_anyio_socket_stream_is_sent_by_its_raw_socket(tmp_path: Any) -> None:
    path = str(tmp_path / "anyio.sock")
    async with await anyio.create_unix_listener(path) as listener:
        stream = await anyio.connect_unix(path)
        server_side = await listener.accept()
        a, b = channel_pair()
        async with a, b, stream, server_side:
            await a.send(b"stream", [stream], close_fds=True)
            with await b.receive() as msg, msg.fds[0].to_socket() as s:
                s.sendall(b"hi")
                assert await server_side.receive() == b"hi"


async def test_forward_a_received_message() -> None:
    a, b = channel_pair()
    c, d = channel_pair()
    async with a, b, c, d:
        with pipe() as (r, w):
            await a.send(b"fwd", [r, w])
            msg = await b.receive()
            await c.send(msg, close_fds=True)
            assert all(fd.closed for fd in msg.fds)
            with await d.receive() as out:
                assert out.data == b"fwd"
                assert [identity(fd.fileno()) for fd in out.fds] == [
                    identity(r),
                    identity(w),
                ]
            with pytest.raises(ValueError, match="not both"):
                await c.send(msg, [r])


async def test_forward_a_message_whose_fds_were_read() -> None:
    # Reading msg.fds makes Fd objects; forwarding then sends those, and
    # close_fds closes them (without it, the message still owns them).
    a, b = channel_pair()
    async with a, b:
        with pipe() as (r, w):
            await a.send(b"one", [r, w, r])
            msg = await b.receive()
            wrapped = msg.fds
            await a.send(msg)  # the same message, not closed
            assert not any(fd.closed for fd in wrapped)
            await b.send(msg, close_fds=True)
            assert all(fd.closed for fd in wrapped)
            for chan in (b, a):
                with await chan.receive() as out:
                    assert [identity(fd.fileno()) for fd in out.fds] == [
                        identity(r),
                        identity(w),
                        identity(r),
                    ]


async def test_empty_record_and_no_fds() -> None:
    a, b = channel_pair()
    async with a, b:
        await a.send()
        await a.send(bytearray(b"ba"))
        await a.send(memoryview(b"\x01\x02\x03\x04").cast("I"))
        assert (await b.receive()) == Message(b"")
        assert (await b.receive()).data == b"ba"
        assert (await b.receive()).data == b"\x01\x02\x03\x04"


async def test_async_for_ends_at_clean_eof() -> None:
    a, b = channel_pair()
    async with b:
        async with a:
            for i in range(5):
                await a.send(str(i).encode())
        got = [msg.data async for msg in b]
        assert got == [b"0", b"1", b"2", b"3", b"4"]
        with pytest.raises(anyio.EndOfStream):
            await b.receive()


async def test_concurrent_senders_never_interleave() -> None:
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    n_tasks, per_task = 8, 30
    with pipe() as (r, w):
        ids = {identity(r), identity(w)}

        async def sender(t: int) -> None:
            for i in range(per_task):
                size = (t * 7919 + i * 104729) % 50_000
                await a.send(bytes([t]) * size + f"|{t}:{i}".encode(), [r, w][: i % 3])

        async with a, b:
            received: dict[int, list[int]] = {t: [] for t in range(n_tasks)}
            async with anyio.create_task_group() as tg:
                for t in range(n_tasks):
                    tg.start_soon(sender, t)
                for _ in range(n_tasks * per_task):
                    with await b.receive() as msg:
                        body, tag = msg.data.rsplit(b"|", 1)
                        t, i = map(int, tag.split(b":"))
                        assert body == bytes([t]) * len(body)
                        assert len(msg.fds) == i % 3
                        assert {identity(fd.fileno()) for fd in msg.fds} <= ids
                        received[t].append(i)
            assert all(v == list(range(per_task)) for v in received.values())


async def test_concurrent_receive_is_busy() -> None:
    a, b = channel_pair()
    async with a, b, anyio.create_task_group() as tg:
        tg.start_soon(b.receive)
        await anyio.wait_all_tasks_blocked()
        with pytest.raises(anyio.BusyResourceError):
            await b.receive()
        tg.cancel_scope.cancel()


async def test_large_record_with_partial_writes() -> None:
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    payload = os.urandom(4 * 1024 * 1024 + 3)
    with pipe() as (r, w):

        async def send_both() -> None:
            await a.send(payload, [r])
            await a.send(b"after", [w])

        async with a, b, anyio.create_task_group() as tg:
            tg.start_soon(send_both)
            with await b.receive() as first, await b.receive() as second:
                assert first.data == payload
                assert identity(first.fds[0].fileno()) == identity(r)
                assert second.data == b"after"
                assert identity(second.fds[0].fileno()) == identity(w)


async def test_eof_inside_a_record_is_a_protocol_error() -> None:
    a, b = channel_pair()
    with pipe() as (r, _):
        wire = encode_header(10, 1) + b"12345"
        socket.send_fds(raw(a), [wire], [r])
        await a.aclose()
        async with b:
            with pytest.raises(ProtocolError, match="middle of a record"):
                await b.receive()
            with pytest.raises(anyio.BrokenResourceError):
                await b.receive()
            with pytest.raises(anyio.BrokenResourceError):
                await b.send(b"x")


async def test_garbage_breaks_the_channel_and_closes_fds() -> None:
    a, b = channel_pair()
    with pipe() as (r, _):
        async with a, b:
            await a.send(b"good", [r])
            with await b.receive() as msg:
                assert msg.data == b"good"
            raw(a).sendall(b"garbage!garbage!")
            with pytest.raises(ProtocolError, match="bad magic"):
                await b.receive()
            # The peer sees the connection go away.
            with pytest.raises(anyio.EndOfStream):
                await a.receive()


async def test_receiver_limits_are_checked_from_the_header() -> None:
    a, b = channel_pair(limits=Limits(max_payload=100))
    async with a, b:
        with pytest.raises(LimitError, match="max_payload of 100"):
            await a.send(b"x" * 101)
        raw(a).sendall(encode_header(1_000_000, 0))
        with pytest.raises(ProtocolError, match="max_payload"):
            await b.receive()


async def test_limit_errors_write_nothing_and_keep_fds() -> None:
    a, b = channel_pair(limits=Limits(max_fds=2))
    assert a.limits.max_fds == 2
    with pipe() as (r, w):
        async with a, b:
            with pytest.raises(LimitError, match="max_fds of 2"):
                await a.send(b"x", [r, w, r], close_fds=True)
            os.fstat(r)  # still open: send raised, so nothing was closed
            await a.send(b"next")
            assert (await b.receive()).data == b"next"


async def test_more_than_253_fds_is_refused_before_writing() -> None:
    a, b = channel_pair()
    with pipe() as (r, _):
        async with a, b:
            with pytest.raises(LimitError, match="254 descriptors"):
                await a.send(b"x", [r] * 254)
            await a.send(b"max", [r] * 253)
            with await b.receive() as msg:
                assert len(msg.fds) == 253


@pytest.mark.parametrize(
    ("bad", "exc"),
    [
        ("text", TypeError),
        (3.5, TypeError),
        (True, TypeError),
        (-2, ValueError),
    ],
)
async def test_bad_descriptors_are_rejected(bad: object, exc: type[Exception]) -> None:
    a, b = channel_pair()
    async with a, b:
        with pytest.raises(exc):
            await a.send(b"x", [bad])
        with pytest.raises(TypeError, match="bytes-like"):
            await a.send("a string")  # type: ignore[arg-type]
        await a.send(b"ok")
        assert (await b.receive()).data == b"ok"


async def test_closed_descriptors_give_ebadf_and_nothing_is_written() -> None:
    a, b = channel_pair()
    f = tempfile.TemporaryFile()
    f.close()
    s = socket.socket()
    s.close()
    fd = Fd(os.dup(0))
    fd.close()
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    async with a, b:
        for dead in (f, s, fd, r):
            with pytest.raises(OSError) as info:  # noqa: PT011
                await a.send(b"x", [dead])
            assert info.value.errno == errno.EBADF
        await a.send(b"after")
        assert (await b.receive()).data == b"after"


async def test_received_fds_are_close_on_exec() -> None:
    a, b = channel_pair()
    with pipe() as (r, _):
        os.set_inheritable(r, True)
        async with a, b:
            await a.send(b"x", [r])
            with await b.receive() as msg:
                flags = fcntl.fcntl(msg.fds[0].fileno(), fcntl.F_GETFD)
                assert flags & fcntl.FD_CLOEXEC


async def test_aclose_wakes_a_blocked_receiver_and_closes_buffered_fds() -> None:
    a, b = channel_pair()
    with pipe() as (r, w):
        async with a:
            await a.send(b"one", [r])
            await a.send(b"two", [w])
            await a.send(b"partial-record-ahead", [r])
            # b reads everything in one go; one record is taken, the rest
            # (with their fds) stay buffered until aclose.
            with await b.receive() as first:
                assert first.data == b"one"
            async with anyio.create_task_group() as tg:

                async def wait_forever() -> None:
                    with pytest.raises(anyio.ClosedResourceError):  # noqa: PT012
                        while True:
                            (await b.receive()).close()

                tg.start_soon(wait_forever)
                await anyio.wait_all_tasks_blocked()
                await b.aclose()
            await b.aclose()  # idempotent
            assert b.closed
            with pytest.raises(anyio.ClosedResourceError):
                await b.receive()
            with pytest.raises(anyio.ClosedResourceError):
                await b.send(b"x")


async def test_buffered_records_are_closed_with_the_channel() -> None:
    a, b = channel_pair()
    with pipe() as (r, w):
        async with a:
            for _ in range(3):
                await a.send(b"rec", [r, w])
            msg = await b.receive()  # reads all three, returns the first
            msg.close()
            await b.aclose()  # the leak check proves the other four fds closed


async def test_aclose_wakes_a_blocked_sender() -> None:
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    async with b:
        async with anyio.create_task_group() as tg:

            async def send_big() -> None:
                with pytest.raises(anyio.ClosedResourceError):
                    await a.send(b"x" * 10_000_000)

            tg.start_soon(send_big)
            await anyio.wait_all_tasks_blocked()
            await a.aclose()


async def test_send_eof() -> None:
    a, b = channel_pair()
    async with a, b:
        await a.send(b"last")
        await a.send_eof()
        with pytest.raises(anyio.ClosedResourceError, match="send_eof"):
            await a.send(b"more")
        assert (await b.receive()).data == b"last"
        with pytest.raises(anyio.EndOfStream):
            await b.receive()
        # The other direction still works.
        await b.send(b"reply")
        assert (await a.receive()).data == b"reply"


async def test_send_to_a_closed_peer_is_broken() -> None:
    a, b = channel_pair()
    await b.aclose()
    async with a:
        with pytest.raises(anyio.BrokenResourceError) as info:  # noqa: PT012
            for _ in range(10):
                await a.send(b"x" * 100_000)
        assert isinstance(info.value.__cause__, BrokenPipeError | ConnectionResetError)
        with pytest.raises(anyio.BrokenResourceError):
            await a.send(b"x")


async def test_cancelled_receive_loses_nothing() -> None:
    a, b = channel_pair()
    with pipe() as (r, _):
        async with a, b:
            with anyio.move_on_after(0.05) as scope:
                await b.receive()
            assert scope.cancelled_caught
            for i in range(40):
                await a.send(str(i).encode(), [r])
            got = [await b.receive()]  # reads every record; returns the first
            # In a cancelled scope, receive may still hand out buffered
            # records (it checks for cancellation when it waits and every
            # 16th call) but never drops one.
            with anyio.CancelScope() as scope:
                scope.cancel()
                while True:
                    got.append(await b.receive())
            assert scope.cancelled_caught
            while len(got) < 40:
                got.append(await b.receive())
            assert [m.data for m in got] == [str(i).encode() for i in range(40)]
            assert all(len(m.fds) == 1 for m in got)
            for m in got:
                m.close()


async def test_a_cancelled_send_never_delivers_and_returned_sends_always_do() -> None:
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    filler = encode_header(0, 0)
    count = 0
    while True:
        try:
            assert raw(a).send(filler) == len(filler)
        except BlockingIOError:
            break
        count += 1
    with pipe() as (r, _):
        async with a, b:
            # The socket is full: small records queue until the queue is
            # full, then send waits (backpressure) and is cancelled there.
            returned = 0
            with anyio.move_on_after(0.2) as scope:
                while True:
                    await a.send(returned.to_bytes(4, "big") * 250, [r])
                    returned += 1
            assert scope.cancelled_caught
            assert returned > 0
            async with anyio.create_task_group() as tg:
                tg.start_soon(a.send, b"after", [r])
                for _ in range(count):
                    assert (await b.receive()).data == b""
                for i in range(returned):
                    with await b.receive() as msg:
                        assert msg.data == i.to_bytes(4, "big") * 250
                        assert len(msg.fds) == 1
                with await b.receive() as msg:
                    assert msg.data == b"after"
                    assert len(msg.fds) == 1


async def test_cancelled_send_after_part_of_a_record_breaks_the_channel() -> None:
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    with pipe() as (r, _):
        async with a, b:
            with anyio.move_on_after(0.1) as scope:
                await a.send(b"x" * 5_000_000, [r])
            assert scope.cancelled_caught
            with pytest.raises(anyio.BrokenResourceError, match="interrupted"):
                await a.send(b"next")
            # The peer never gets a truncated record: it sees the break,
            # and its library closes the fd that came with the first bytes.
            with pytest.raises(ProtocolError, match="middle of a record"):
                await b.receive()


async def test_descriptors_lost_at_the_fd_limit() -> None:
    a, b = channel_pair()
    with pipe() as (r, _):
        async with a, b:
            await a.send(b"fill", [r] * 50)
            await anyio.wait_all_tasks_blocked()
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_with_free_slots(2), hard))
            try:
                with pytest.raises(DescriptorsLostError, match="RLIMIT_NOFILE"):
                    await b.receive()
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            with pytest.raises(anyio.BrokenResourceError, match="MSG_CTRUNC"):
                await b.receive()


async def test_so_passcred_does_not_leak_or_truncate() -> None:
    a, b = channel_pair()
    raw(b).setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    so_passpidfd = 76  # Linux 6.5+
    with contextlib.suppress(OSError):
        raw(b).setsockopt(socket.SOL_SOCKET, so_passpidfd, 1)
    with pipe() as (r, _):
        async with a, b:
            await a.send(b"max", [r] * 253)
            await a.send(b"one", [r])
            with await b.receive() as msg:
                assert len(msg.fds) == 253
            with await b.receive() as msg:
                assert len(msg.fds) == 1


async def test_from_fd_and_from_socket() -> None:
    s1, s2 = socket.socketpair()
    a = FdChannel.from_fd(s1.detach())
    b = FdChannel.from_socket(s2)
    async with a, b:
        await a.send(b"hi")
        assert (await b.receive()).data == b"hi"
        assert a.extra(SocketAttribute.family) == socket.AF_UNIX
        assert a.extra(SocketAttribute.local_address) == ""
        assert a.extra(SocketAttribute.remote_address) == ""
        assert a.fileno() >= 0
    assert a.fileno() == -1


async def test_from_fd_takes_an_fd_only_on_success() -> None:
    # As FdStream.from_fd: an Fd is taken once the channel owns the socket;
    # a refusal (wrong socket kind, bad limits) leaves it the caller's.
    s1, s2 = socket.socketpair()
    owned = Fd(s1.detach())
    with pytest.raises(TypeError, match="limits must be a Limits"):
        FdChannel.from_fd(owned, limits=3)  # type: ignore[arg-type]
    assert not owned.closed
    a = FdChannel.from_fd(owned, close_timeout=1)
    assert owned.closed  # taken: the channel owns the number now
    async with a, FdChannel.from_socket(s2) as b:
        assert a.close_timeout == 1
        await a.send(b"x")
        assert (await b.receive()).data == b"x"
    check_from_fd_refusals(FdChannel.from_fd)


async def test_from_socket_refuses_the_wrong_kind() -> None:
    with socket.socket(socket.AF_INET) as tcp:
        with pytest.raises(ValueError, match="AF_UNIX"):
            FdChannel.from_socket(tcp)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
        with pytest.raises(ValueError, match="SOCK_DGRAM.*FdDatagramSocket"):
            FdChannel.from_socket(dgram)
        fd = dgram.fileno()
        with pytest.raises(ValueError, match="SOCK_STREAM or SOCK_SEQPACKET"):
            FdChannel.from_fd(fd)
        os.fstat(fd)  # from_fd failed: the caller still owns it
    with pytest.raises(TypeError):
        FdChannel.from_socket(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        FdChannel.from_fd("3")  # type: ignore[arg-type]
    s = socket.socket(socket.AF_UNIX)
    s.close()
    with pytest.raises(OSError):  # noqa: PT011
        FdChannel.from_socket(s)


def test_public_names_exist() -> None:
    assert aiofdpass.channel_pair is channel_pair


async def test_a_break_closes_buffered_fds_at_once() -> None:
    a, b = channel_pair()

    def open_copies(fd: int) -> int:
        target = os.readlink(f"/proc/self/fd/{fd}")
        return sum(
            os.readlink(f"/proc/self/fd/{x}") == target
            for x in os.listdir("/proc/self/fd")
            if x != str(fd) and os.path.exists(f"/proc/self/fd/{x}")
        )

    with pipe() as (r, w):
        async with a, b:
            # Half a record with its fd: b buffers both and waits for more.
            socket.send_fds(raw(a), [encode_header(10, 1) + b"12345"], [r])
            with anyio.move_on_after(0.05):
                await b.receive()
            assert open_copies(w) == 2  # r and the buffered copy
            await a.aclose()
            small_buffers(raw(b))
            with pytest.raises(anyio.BrokenResourceError):  # noqa: PT012
                for _ in range(20):
                    await b.send(b"x" * 100_000)
            # Only sending broke: what the peer sent is still read, and the
            # half record's fd is closed when its end of stream shows.
            assert open_copies(w) == 2
            with pytest.raises(ProtocolError, match="middle of a record"):
                await b.receive()
            assert open_copies(w) == 1  # only r


async def test_many_fds_in_coalesced_records_are_owned_and_closed_exactly() -> None:
    # Three records of 64 fds in one sendmsg (192 fds, as a coalescing
    # sender writes them): each message owns exactly its 64, whether it is
    # wrapped and partly taken, closed unwrapped, or wrapped late.
    a, b = channel_pair()
    with pipe() as (r, _):
        async with a, b:
            baseline = open_fds()
            wire = b"".join(encode_header(1, 64) + bytes([i]) for i in range(3))
            socket.send_fds(raw(a), [wire], [r] * 192)
            first, second, third = [await b.receive() for _ in range(3)]
            assert [m.data for m in (first, second, third)] == [b"\0", b"\1", b"\2"]
            assert [m.nfds for m in (first, second, third)] == [64] * 3
            arrived = open_fds() - baseline
            assert len(arrived) == 192
            fds = first.fds
            assert all(identity(fd.fileno()) == identity(r) for fd in fds)
            numbers = {fd.fileno() for fd in fds}
            kept = fds[10].take()
            first.close()
            assert all(fd.closed for fd in fds)
            left = open_fds() - baseline
            assert left == arrived - numbers | {kept}
            assert len(left) == 128 + 1
            second.close()  # never wrapped
            left = open_fds() - baseline
            assert len(left) == 64 + 1 and kept in left
            # What is left is exactly the third message's (and the taken one).
            with third:
                assert {fd.fileno() for fd in third.fds} == left - {kept}
            assert open_fds() - baseline == {kept}
            os.close(kept)


async def test_a_dropped_received_message_closes_its_fds_and_warns() -> None:
    a, b = channel_pair()
    with pipe() as (r, _):
        async with a, b:
            baseline = open_fds()
            await a.send(b"x", [r] * 8)
            msg = await b.receive()
            assert len(open_fds() - baseline) == 8
            with pytest.warns(ResourceWarning, match="unclosed Message with 8"):  # noqa: PT031
                del msg
                gc.collect()
            assert open_fds() == baseline
