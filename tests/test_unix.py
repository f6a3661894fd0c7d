"""listen / connect / FdListener over real socket files and abstract names."""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import stat
from pathlib import Path

import anyio
import pytest
from anyio.abc import Listener, SocketAttribute

import aiofdpass
from aiofdpass import FdChannel, FdStream, LimitError, Limits, ProtocolError

from .helpers import identity, pipe

pytestmark = pytest.mark.anyio


async def test_connect_accept_and_pass_fds(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with await aiofdpass.listen(path) as listener:
        assert listener.path == str(path)
        assert listener.extra(SocketAttribute.local_address) == str(path)
        assert listener.extra(SocketAttribute.family) == socket.AF_UNIX
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        async with await aiofdpass.connect(path) as client:
            async with await listener.accept() as server:
                with pipe() as (r, _):
                    await client.send(b"hello", [r])
                    with await server.receive() as msg:
                        assert identity(msg.fds[0].fileno()) == identity(r)
                await server.send(b"back")
                assert (await client.receive()).data == b"back"
                assert server.extra(SocketAttribute.raw_socket).fileno() >= 0
    assert not path.exists()  # aclose removed the file it created


@pytest.mark.parametrize("kind", [str, bytes, Path])
async def test_path_types(tmp_path: Path, kind: type) -> None:
    path = kind(
        os.fsencode(tmp_path / "p.sock") if kind is bytes else tmp_path / "p.sock"
    )
    async with await aiofdpass.listen(path, mode=0o660) as listener:
        assert stat.S_IMODE(os.stat(tmp_path / "p.sock").st_mode) == 0o660
        async with await aiofdpass.connect(path), await listener.accept():
            pass


async def test_abstract_namespace() -> None:
    name = f"\0aiofdpass-test-{os.getpid()}-{id(object())}"
    async with await aiofdpass.listen(name) as listener:
        async with await aiofdpass.connect(name.encode()) as client:
            async with await listener.accept() as server:
                await client.send(b"abstract")
                assert (await server.receive()).data == b"abstract"


async def test_listen_refuses_a_path_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "regular"
    path.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        await aiofdpass.listen(path)
    assert path.read_text() == "precious"
    with pytest.raises(ValueError, match="empty"):
        await aiofdpass.listen("")


async def test_listen_replaces_a_stale_socket_but_not_a_live_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: stale
    async with await aiofdpass.listen(path):
        with pytest.raises(OSError) as info:  # noqa: PT011
            await aiofdpass.listen(path)
        assert info.value.errno == errno.EADDRINUSE


async def test_aclose_leaves_a_successor_socket_alone(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    first = await aiofdpass.listen(path)
    os.unlink(path)
    async with await aiofdpass.listen(path):
        await first.aclose()
        assert path.exists()


async def test_connect_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sock"
    with pytest.raises(FileNotFoundError, match="missing.sock"):
        await aiofdpass.connect(missing)
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()
    with pytest.raises(ConnectionRefusedError, match="dead.sock"):
        await aiofdpass.connect_stream(dead)


async def test_connect_waits_when_the_backlog_is_full(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with await aiofdpass.listen(path, backlog=1) as listener:
        channels: list[FdChannel] = []
        try:
            async with anyio.create_task_group() as tg:

                async def client() -> None:
                    channels.append(await aiofdpass.connect(path))

                for _ in range(6):
                    tg.start_soon(client)
                await anyio.sleep(0.05)
                for _ in range(6):
                    channels.append(await listener.accept())
            assert len(channels) == 12
        finally:
            for chan in channels:
                await chan.aclose()


async def test_limits_apply_to_accepted_and_connected_channels(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with await aiofdpass.listen(path, limits=Limits(max_payload=10)) as listener:
        async with await aiofdpass.connect(path, limits=Limits(max_payload=10)) as c:
            with pytest.raises(LimitError):
                await c.send(b"x" * 11)
            async with await listener.accept() as server:
                c.extra(SocketAttribute.raw_socket).sendall(
                    aiofdpass._codec.encode_header(11, 0)
                )
                with pytest.raises(ProtocolError):
                    await server.receive()


async def test_serve_runs_handlers_and_survives_their_errors(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.sock"
    handled = []

    async def handler(chan: FdChannel) -> None:
        msg = await chan.receive()
        with msg:
            if msg.data == b"boom":
                raise RuntimeError("handler failed")
            await chan.send(msg.data.upper(), msg.fds)
        handled.append(msg.data)

    caplog.set_level(logging.ERROR, logger="aiofdpass")
    async with (
        await aiofdpass.listen(path) as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, handler)
        async with await aiofdpass.connect(path) as bad:
            await bad.send(b"boom")
            with pytest.raises(anyio.EndOfStream):
                await bad.receive()  # the server closed this channel
        for i in range(20):
            with pipe() as (r, _):
                async with await aiofdpass.connect(path) as c:
                    await c.send(f"req{i}".encode(), [r])
                    with await c.receive() as reply:
                        assert reply.data == f"REQ{i}".encode()
                        assert identity(reply.fds[0].fileno()) == identity(r)
        tg.cancel_scope.cancel()
    assert len(handled) == 20
    assert "handler failed" in caplog.text


async def test_serve_ends_when_the_listener_closes(tmp_path: Path) -> None:
    listener = await aiofdpass.listen(tmp_path / "s.sock")

    async def handler(chan: FdChannel) -> None:
        pass

    async with anyio.create_task_group() as tg:

        async def serve() -> None:
            with pytest.raises(anyio.ClosedResourceError):
                await listener.serve(handler, tg)

        tg.start_soon(serve)
        await anyio.wait_all_tasks_blocked()
        await listener.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        await listener.accept()


async def test_concurrent_accept_is_busy(tmp_path: Path) -> None:
    async with await aiofdpass.listen(tmp_path / "s.sock") as listener:
        async with anyio.create_task_group() as tg:
            tg.start_soon(listener.accept)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(anyio.BusyResourceError):
                await listener.accept()
            tg.cancel_scope.cancel()


async def test_paths_longer_than_sun_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    path = deep / "a-socket-with-a-long-name.sock"
    assert len(os.fsencode(path)) > 108
    async with await aiofdpass.listen(path) as listener:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        async with await aiofdpass.connect(path) as client:
            async with await listener.accept() as server:
                await client.send(b"long")
                assert (await server.receive()).data == b"long"
        with pytest.raises(OSError) as info:  # noqa: PT011
            await aiofdpass.listen(path)
        assert info.value.errno == errno.EADDRINUSE
    assert not path.exists()
    assert os.listdir(deep) == []  # no temporary directory left behind


async def test_serve_closes_a_channel_whose_peer_never_reads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.sock"
    finished = anyio.Event()

    async def handler(chan: FdChannel) -> None:
        # Queue far more than the socket holds; the client never reads.
        with pipe() as (r, _):
            with anyio.move_on_after(0.3):
                while True:
                    await chan.send(b"x" * 1000, [r])
        finished.set()

    async with (
        await aiofdpass.listen(path, close_timeout=0.2) as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, handler)
        async with await aiofdpass.connect(path):
            await finished.wait()
            before = len(os.listdir("/proc/self/fd"))
            with anyio.fail_after(5):
                # The server gave up on the queue and closed the channel.
                while len(os.listdir("/proc/self/fd")) >= before:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    # ... and said how many records it dropped.
    assert re.search(r"dropped \d+ queued record", caplog.text)


async def test_listen_stream_accepts_fdstreams_with_listens_guarantees(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # a stale socket file is replaced
    async with await aiofdpass.listen_stream(path, mode=0o640) as listener:
        assert isinstance(listener, Listener)
        assert listener.path == str(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        # A foreign front-end: plain sendmsg, one NUL byte and a descriptor.
        with pipe() as (r, _), socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            socket.send_fds(client, [b"\0"], [r])
            async with await listener.accept() as server:
                assert isinstance(server, FdStream)
                data, fds = await server.receive_exactly(1)
                assert data == b"\0"
                assert [identity(fd.fileno()) for fd in fds] == [identity(r)]
                await server.send(b"ok", fds, close_fds=True)
                client.setblocking(True)
                msg, got, _, _ = socket.recv_fds(client, 10, 1)
                assert msg == b"ok"
                assert [identity(fd) for fd in got] == [identity(r)]
                os.close(got[0])
        for make in (aiofdpass.listen, aiofdpass.listen_stream):
            with pytest.raises(OSError) as info:  # noqa: PT011
                await make(path)
            assert info.value.errno == errno.EADDRINUSE
    assert not path.exists()  # aclose removed the file it created
    regular = tmp_path / "regular"
    regular.write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        await aiofdpass.listen_stream(regular)
    assert regular.read_text() == "precious"


async def test_listen_stream_refuses_peers_that_allow_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiofdpass")
    path = tmp_path / "s.sock"
    seen = []

    def every_other(creds: aiofdpass.PeerCredentials) -> bool:
        seen.append(creds)
        return len(seen) % 2 == 0

    with pipe() as (r, _):
        async with await aiofdpass.listen_stream(path, allow=every_other) as listener:
            first = await aiofdpass.connect_stream(path)
            second = await aiofdpass.connect_stream(path)
            async with first, second:
                await first.send(b"first", [r])
                await second.send(b"second")
                async with await listener.accept() as server:
                    assert await server.receive_exactly(6) == (b"second", [])
                    assert server.queued_fds == 0
                # The refused peer was closed unread.
                with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError)):
                    await first.receive()
    assert len(seen) == 2
    assert "refused a connection" in caplog.text


async def test_listen_stream_serve_runs_handlers_and_closes_their_streams(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # serve() is FdListener's (tests above); here: it hands out FdStreams,
    # logs a handler's error, and closes each stream after its handler.
    path = tmp_path / "s.sock"

    async def handler(stream: FdStream) -> None:
        line, fds = await stream.receive_until(b"\n", 100)
        if not fds:
            raise RuntimeError(f"no descriptor with {line!r}")
        await stream.send(line.upper(), fds, close_fds=True)

    caplog.set_level(logging.ERROR, logger="aiofdpass")
    async with (
        await aiofdpass.listen_stream(path) as listener,
        anyio.create_task_group() as tg,
        await aiofdpass.connect_stream(path) as bare,
        await aiofdpass.connect_stream(path) as client,
    ):
        tg.start_soon(listener.serve, handler)
        await bare.send(b"bare\n")
        with pipe() as (r, _):
            await client.send(b"with a pipe\n", [r])
            data, fds = await client.receive_exactly(11)
            assert data == b"WITH A PIPE"
            assert [identity(fd.fileno()) for fd in fds] == [identity(r)]
            fds[0].close()
        for end in (bare, client):
            with pytest.raises(anyio.EndOfStream):
                await end.receive()  # the handler returned: its stream is closed
        tg.cancel_scope.cancel()
    assert "no descriptor with b'bare'" in caplog.text
