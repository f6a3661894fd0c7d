"""FdDatagramSocket: datagrams with descriptors, addresses and credentials."""

from __future__ import annotations

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
    Datagram,
    DescriptorsLostError,
    FdDatagramSocket,
    LimitError,
    Limits,
    PeerCredentials,
    ProtocolError,
    create_datagram_socket,
)

from .helpers import copies_of, identity, limit_with_free_slots, pipe, rights

pytestmark = pytest.mark.anyio


def abstract(name: str) -> bytes:
    return f"\0aiofdpass-test-{os.getpid()}-{name}".encode()


async def test_send_and_reply_between_two_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # short relative paths: sun_path is 108 bytes
    async with (
        await create_datagram_socket("server.sock") as server,
        await create_datagram_socket("client.sock") as client,
    ):
        with pipe() as (r, w):
            await client.send(b"request", [r, w], to="server.sock")
            datagram = await server.receive()
            assert isinstance(datagram, Datagram)
            message, address, credentials = datagram
            assert address == "client.sock"
            assert credentials is None
            with message:
                assert message.data == b"request"
                assert [identity(fd.fileno()) for fd in message.fds] == [
                    identity(r),
                    identity(w),
                ]
                await server.send(b"reply", message.fds[:1], to=address)
            with (await client.receive()).message as reply:
                assert reply.data == b"reply"
                assert identity(reply.fds[0].fileno()) == identity(r)
        assert server.local_address == "server.sock"
    assert not (tmp_path / "server.sock").exists()
    assert not (tmp_path / "client.sock").exists()


async def test_unbound_sender_and_abstract_names() -> None:
    async with (
        await create_datagram_socket(abstract("srv")) as server,
        await create_datagram_socket() as unbound,
    ):
        await unbound.send(b"hi", to=abstract("srv"))
        datagram = await server.receive()
        assert datagram.message.data == b"hi"
        assert datagram.address is None
        assert server.local_address == abstract("srv")


async def test_credentials_and_the_autobound_name() -> None:
    async with (
        await create_datagram_socket(abstract("creds"), pass_credentials=True) as srv,
        await create_datagram_socket(pass_credentials=True) as sender,
    ):
        await sender.send(b"", to=abstract("creds"))
        datagram = await srv.receive()
        assert datagram.credentials == PeerCredentials(
            os.getpid(), os.geteuid(), os.getegid()
        )
        # SO_PASSCRED on an unbound sender: the kernel bound it to an
        # abstract name, which the receiver sees and can reply to.
        assert isinstance(datagram.address, bytes)
        assert datagram.address.startswith(b"\0")
        assert datagram.address == sender.local_address
        await srv.send(b"back", to=datagram.address)
        assert (await sender.receive()).message.data == b"back"


async def test_empty_datagrams_with_and_without_descriptors() -> None:
    async with await create_datagram_socket(abstract("empty")) as srv:
        with pipe() as (r, _), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
            c.sendto(b"", abstract("empty"))
            c.sendmsg([b""], rights(r), 0, abstract("empty"))
            assert (await srv.receive()).message.data == b""
            with (await srv.receive()).message as message:
                assert message.data == b""
                assert identity(message.fds[0].fileno()) == identity(r)


async def test_oversized_datagram_raises_once_and_the_socket_goes_on() -> None:
    name = abstract("big")
    async with await create_datagram_socket(name, limits=Limits(max_payload=4)) as s:
        with pipe() as (r, _), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
            before = copies_of(r)
            c.sendmsg([b"12345"], rights(r, r), 0, name)
            c.sendmsg([b"1234"], rights(r), 0, name)
            with pytest.raises(ProtocolError, match="5-byte packet"):
                await s.receive()
            assert copies_of(r) == before  # never installed here
            with (await s.receive()).message as message:
                assert (message.data, len(message.fds)) == (b"1234", 1)


async def test_datagram_with_more_descriptors_than_max_fds() -> None:
    name = abstract("fds")
    async with await create_datagram_socket(name, limits=Limits(max_fds=1)) as s:
        with pipe() as (r, _), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
            before = copies_of(r)
            c.sendmsg([b"x"], rights(r, r), 0, name)
            c.sendmsg([b"y"], rights(r), 0, name)
            with pytest.raises(ProtocolError, match="2 descriptors"):
                await s.receive()
            assert copies_of(r) == before
            with (await s.receive()).message as message:
                assert message.data == b"y"


async def test_send_checks_limits_and_reports_a_missing_receiver(
    tmp_path: Path,
) -> None:
    async with await create_datagram_socket(limits=Limits(max_payload=3)) as s:
        with pytest.raises(LimitError, match="max_payload"):
            await s.send(b"four", to=abstract("nobody"))
        with pytest.raises(ConnectionRefusedError):
            await s.send(b"ok", to=abstract("nobody"))
        with pytest.raises(FileNotFoundError):
            await s.send(b"ok", to=tmp_path / "missing")
        async with await create_datagram_socket(abstract("there")) as there:
            await s.send(b"ok", to=abstract("there"))
            assert (await there.receive()).message.data == b"ok"


async def test_a_flood_of_datagrams_with_descriptors_loses_nothing() -> None:
    # The receiver's queue holds a few datagrams; the sender waits for room
    # (no event says when: it backs off), and every descriptor arrives once.
    name = abstract("flood")
    count = 300
    async with (
        await create_datagram_socket(name) as receiver,
        await create_datagram_socket() as sender,
    ):
        with pipe() as (r, _):
            before = copies_of(r)
            async with anyio.create_task_group() as tg:

                async def send_all() -> None:
                    for i in range(count):
                        await sender.send(b"%d" % i, [r], to=name)

                tg.start_soon(send_all)
                for i in range(count):
                    with (await receiver.receive()).message as message:
                        assert message.data == b"%d" % i
                        assert len(message.fds) == 1
            assert copies_of(r) == before


async def test_async_for_and_aclose_wakes_a_receiver() -> None:
    name = abstract("iter")
    dsock = await create_datagram_socket(name)
    got: list[bytes] = []
    two = anyio.Event()

    async def consume() -> None:
        try:
            async for datagram in dsock:
                got.append(datagram.message.data)
                if len(got) == 2:
                    two.set()
        except anyio.ClosedResourceError:
            got.append(b"closed")

    async with anyio.create_task_group() as tg:
        tg.start_soon(consume)
        async with await create_datagram_socket() as sender:
            await sender.send(b"a", to=name)
            await sender.send(b"b", to=name)
        await two.wait()
        await anyio.wait_all_tasks_blocked()
        await dsock.aclose()
    await dsock.aclose()  # again: nothing
    assert got == [b"a", b"b", b"closed"]
    with pytest.raises(anyio.ClosedResourceError):
        await dsock.send(b"x", to=name)


async def test_from_socket_connected_pair_and_wrong_kinds() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    async with (
        FdDatagramSocket.from_socket(a) as da,
        FdDatagramSocket.from_fd(b.detach()) as db,
    ):
        await da.send(b"connected")  # to=None: the connected peer
        assert (await db.receive()).message.data == b"connected"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
        with pytest.raises(ValueError, match="SOCK_DGRAM"):
            FdDatagramSocket.from_socket(stream)
        fd = stream.fileno()
        with pytest.raises(ValueError, match="SOCK_DGRAM"):
            FdDatagramSocket.from_fd(fd)
        os.fstat(fd)  # still the caller's


async def test_local_path_mode_and_what_is_never_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    old_umask = os.umask(0o022)
    try:
        async with await create_datagram_socket("m.sock", mode=0o640):
            assert stat.S_IMODE(os.stat("m.sock").st_mode) == 0o640
            # A live datagram socket is never replaced.
            with pytest.raises(OSError, match="another process") as info:
                await create_datagram_socket("m.sock")
            assert info.value.errno == errno.EADDRINUSE
        # A live socket of another type (EPROTOTYPE) is alive too.
        async with await aiofdpass.listen("l.sock"):
            with pytest.raises(OSError, match="another process") as info:
                await create_datagram_socket("l.sock")
            assert info.value.errno == errno.EADDRINUSE
        # A stale socket file is replaced.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        stale.bind("stale.sock")
        stale.close()
        async with await create_datagram_socket("stale.sock") as replaced:
            assert replaced.local_address == "stale.sock"
        # A file that is not a socket is never touched.
        with open("file", "w") as f:  # noqa: ASYNC230 - a test fixture
            f.write("keep")
        with pytest.raises(FileExistsError, match="not a socket"):
            await create_datagram_socket("file")
        assert os.stat("file").st_size == 4
        with pytest.raises(ValueError, match="too long"):
            await create_datagram_socket("x" * 120)
    finally:
        os.umask(old_umask)


async def test_a_flood_of_refused_datagrams_leaks_nothing() -> None:
    # A hostile sender fills our queue with datagrams of 253 descriptors,
    # over max_fds: each receive refuses one and closes what it brought, the
    # socket holds nothing between calls, and a good datagram still gets in.
    name = abstract("hostile")
    async with await create_datagram_socket(name, limits=Limits(max_fds=4)) as s:
        with pipe() as (r, _), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as c:
            c.setblocking(False)
            before = copies_of(r)
            sent = 0
            try:
                while True:
                    c.sendmsg([b"flood"], rights(*[r] * 253), 0, name)
                    sent += 1
            except BlockingIOError:
                pass  # the kernel's queue is full: that bounds the flood
            assert sent >= 1
            for _ in range(sent):
                with pytest.raises(ProtocolError, match="253 descriptors"):
                    await s.receive()
            assert copies_of(r) == before
            c.sendmsg([b"good"], rights(r), 0, name)
            with (await s.receive()).message as message:
                assert (message.data, len(message.fds)) == (b"good", 1)


async def test_cancelled_send_sends_nothing_and_cancelled_receive_loses_nothing() -> (
    None
):
    name = abstract("cancel")
    async with (
        await create_datagram_socket(name) as receiver,
        await create_datagram_socket() as sender,
    ):
        with pipe() as (r, _):
            before = copies_of(r)
            queued = 0
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:

                    async def fill() -> None:
                        nonlocal queued
                        while True:  # until the receiver's queue is full
                            await sender.send(b"%d" % queued, [r], to=name)
                            queued += 1

                    tg.start_soon(fill)
                    await anyio.wait_all_tasks_blocked()
                    scope.cancel()  # the send waiting for room is cancelled
            assert queued > 0
            with anyio.CancelScope() as scope:
                scope.cancel()
                await receiver.receive()  # cancelled before it reads
            for i in range(queued):
                with (await receiver.receive()).message as message:
                    assert message.data == b"%d" % i
            assert copies_of(r) == before
            # Nothing else arrived: the cancelled send sent nothing.
            raw_receiver = receiver.extra(anyio.abc.SocketAttribute.raw_socket)
            with pytest.raises(BlockingIOError):
                raw_receiver.recv(10)


async def test_bad_arguments_and_the_small_api() -> None:
    with pytest.raises(TypeError, match="Limits"):
        await create_datagram_socket(limits=4)  # type: ignore[arg-type]
    name = abstract("api")
    async with await create_datagram_socket(name, limits=Limits(max_fds=1)) as s:
        assert s.limits == Limits(max_fds=1)
        assert repr(s) == f"<FdDatagramSocket fd={s.fileno()} address={name!r} open>"
        assert not s.closed
        assert s.fileno() >= 0
        assert s.local_address == name
        with pytest.raises(TypeError, match="bytes-like"):
            await s.send("text", to=name)  # type: ignore[arg-type]
        with pipe() as (r, w):
            with pytest.raises(LimitError, match="max_fds of 1"):
                await s.send(b"two", [r, w], to=name)
            with pytest.raises(OSError, match="not open"):
                await s.send(b"closed fd", [w + 1000], to=name)
            # One descriptor, or bytes, for fds: each byte is not a number.
            with pytest.raises(TypeError, match=rf"pass \[{r}\]"):
                await s.send(b"x", r, to=name)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="data goes in the first argument"):
                await s.send(b"x", bytes([r]), to=name)
        room = s.extra(anyio.abc.SocketAttribute.raw_socket).getsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF
        )
        with pytest.raises(OSError) as info:  # noqa: PT011
            await s.send(b"x" * (room - 31), to=name)  # over SO_SNDBUF less 32
        assert info.value.errno == errno.EMSGSIZE

        async def second_receiver() -> None:
            with pytest.raises(anyio.BusyResourceError):
                await s.receive()

        async with anyio.create_task_group() as tg:
            tg.start_soon(s.receive)
            await anyio.wait_all_tasks_blocked()
            await second_receiver()
            tg.cancel_scope.cancel()
    assert s.closed
    assert s.fileno() == -1
    assert repr(s) == "<FdDatagramSocket fd=-1 closed>"


def test_a_dropped_socket_warns_and_closes() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    fd = sock.fileno()
    dsock = FdDatagramSocket.from_socket(sock)
    with pytest.warns(ResourceWarning, match="unclosed FdDatagramSocket"):
        del dsock  # the last reference: collected at once
    with pytest.raises(OSError):  # noqa: PT011
        os.fstat(fd)


async def test_lost_descriptors_raise_once_among_senders_and_the_socket_goes_on() -> (
    None
):
    # MSG_CTRUNC at a low RLIMIT_NOFILE: that datagram's receive raises with
    # what arrived closed; the next datagram, from another sender, is whole.
    async with (
        await create_datagram_socket(abstract("ctrunc")) as server,
        await create_datagram_socket(abstract("ctrunc-a")) as a,
        await create_datagram_socket(abstract("ctrunc-b")) as b,
    ):
        with pipe() as (r, _):
            before = copies_of(r)
            await a.send(b"many", [r] * 50, to=abstract("ctrunc"))
            await b.send(b"next", [r], to=abstract("ctrunc"))
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit_with_free_slots(2), hard))
            try:
                with pytest.raises(DescriptorsLostError, match="MSG_CTRUNC"):
                    await server.receive()
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert copies_of(r) == before
            message, address, _ = await server.receive()
            with message:
                assert (message.data, len(message.fds), address) == (
                    b"next",
                    1,
                    abstract("ctrunc-b"),
                )


async def test_aclose_leaves_a_socket_file_that_replaced_its_own(
    tmp_path: Path,
) -> None:
    path = tmp_path / "d.sock"
    first = await create_datagram_socket(path)
    os.rename(path, tmp_path / "moved.sock")
    async with await create_datagram_socket(path) as second:
        theirs = identity_of(path)
        await first.aclose()
        assert identity_of(path) == theirs  # not the first socket's file
        assert (tmp_path / "moved.sock").exists()  # nor its moved one
        await second.send(b"still here", to=path)
        assert (await second.receive()).message.data == b"still here"
    assert not path.exists()


def identity_of(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_dev, st.st_ino


async def test_a_failed_send_with_close_fds_closes_nothing(tmp_path: Path) -> None:
    # Nobody at the path, not a socket, a stream socket, a directory, over
    # the limits: each raises, nothing is sent, the caller keeps its
    # descriptors; the socket goes on, and close_fds closes on success.
    (tmp_path / "file").write_bytes(b"")
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with stream, pipe() as (r, _):
        stream.bind(str(tmp_path / "stream.sock"))
        stream.listen()
        async with (
            await create_datagram_socket(limits=Limits(max_fds=1)) as s,
            await create_datagram_socket(abstract("close-fds")) as there,
        ):
            failures: list[tuple[Path | bytes, type[BaseException], int]] = [
                (tmp_path / "missing", FileNotFoundError, 1),
                (tmp_path / "file", ConnectionRefusedError, 1),
                (tmp_path, ConnectionRefusedError, 1),
                (tmp_path / "stream.sock", OSError, 1),
                (abstract("close-fds"), LimitError, 2),
            ]
            for to, error, count in failures:
                mine = [os.dup(r) for _ in range(count)]
                try:
                    with pytest.raises(error):
                        await s.send(b"x", mine, to=to, close_fds=True)
                    for fd in mine:
                        os.fstat(fd)  # still open: still the caller's
                finally:
                    for fd in mine:
                        os.close(fd)
            mine = [os.dup(r)]
            await s.send(b"sent", mine, to=abstract("close-fds"), close_fds=True)
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.fstat(mine[0])  # closed, and nothing opened since
            message = (await there.receive()).message
            with message:
                assert (message.data, len(message.fds)) == (b"sent", 1)
