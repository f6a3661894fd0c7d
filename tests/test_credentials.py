"""Who may connect: SO_PEERCRED, listen(allow=...), the socket file's mode."""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process, SocketAttribute
from anyio.streams.buffered import BufferedByteReceiveStream

import aiofdpass
from aiofdpass import FdChannel, FdPassAttribute, PeerCredentials, same_user
from aiofdpass._codec import encode_header

from .helpers import pipe

pytestmark = pytest.mark.anyio

ME = PeerCredentials(os.getpid(), os.geteuid(), os.getegid())


async def test_peer_credentials_of_a_channel_and_a_stream() -> None:
    a, b = aiofdpass.channel_pair()
    s, t = aiofdpass.stream_pair()
    async with a, b, s, t:
        for conn in (a, b, s, t):
            assert conn.peer_credentials == ME
            assert conn.extra(FdPassAttribute.peer_credentials) == ME
        pid, uid, gid = a.peer_credentials  # unpacks like a tuple
        assert (pid, uid, gid) == tuple(ME)
    # Once read, they stay readable after close.
    assert a.peer_credentials == ME
    # Closed before they were ever read: a clear error, not EBADF.
    c, d = aiofdpass.channel_pair()
    await c.aclose()
    await d.aclose()
    with pytest.raises(anyio.ClosedResourceError):
        _ = c.peer_credentials


async def connecting_child(path: Path) -> Process:
    """Start a child that connects to ``path``, then waits for one byte."""
    client = textwrap.dedent(
        f"""
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.connect({str(path)!r})
        s.recv(1)
        """
    )
    return await anyio.open_process(
        [sys.executable, "-c", client], stdin=subprocess.DEVNULL
    )


async def test_peer_credentials_name_the_connecting_process(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with await aiofdpass.listen(path) as listener:
        async with await connecting_child(path) as proc:
            async with await listener.accept() as server:
                creds = server.peer_credentials
                assert creds == PeerCredentials(proc.pid, os.geteuid(), os.getegid())
                assert server.extra(FdPassAttribute.peer_credentials) == creds
            await proc.wait()
        # And the client sees the listening process.
        async with await aiofdpass.connect(path) as c, await listener.accept():
            assert c.peer_credentials == ME


def test_same_user_policy() -> None:
    policy = same_user()
    assert policy(PeerCredentials(1, os.geteuid(), 12345))
    assert not policy(PeerCredentials(os.getpid(), os.geteuid() + 1, os.getegid()))
    assert str(os.geteuid()) in repr(policy)


@pytest.mark.parametrize("bad", ["1000", b"0", 1000, [1.5], [True], {"root"}])
async def test_bad_allow_is_rejected_before_anything_is_created(
    tmp_path: Path, bad: object
) -> None:
    with pytest.raises(TypeError, match="allow"):
        await aiofdpass.listen(tmp_path / "s.sock", allow=bad)  # type: ignore[arg-type]
    assert os.listdir(tmp_path) == []


async def refused_client(path: Path) -> None:
    """Connect, send a record with a pipe's write end; expect a reset.

    The reset (not a clean end of stream) is the kernel saying the server
    closed with our record still unread in its receive queue; the pipe's
    read end then sees EOF, so the descriptor in flight was released, not
    installed anywhere.
    """
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        # Connect and send with no await in between, so the server cannot
        # have refused us before our record is queued.
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(path))
        socket.send_fds(sock, [encode_header(9, 1) + b"let me in"], [w])
        os.close(w)
        async with FdChannel.from_socket(sock) as chan:
            # The server closed with our record unread (ECONNRESET): its
            # direction ended, and our next send finds nobody.
            with pytest.raises(anyio.EndOfStream):
                await chan.receive()
            with pytest.raises(anyio.BrokenResourceError):
                await chan.send(b"anyone?")
        assert os.read(r, 1) == b""  # no write end is left anywhere
    finally:
        os.close(r)


async def admitted_client(path: Path, tag: bytes) -> None:
    with pipe() as (r, _):
        async with await aiofdpass.connect(path) as chan:
            await chan.send(tag, [r])
            with await chan.receive() as reply:
                assert reply.data == tag.upper()
                assert len(reply.fds) == 1


async def echo_once(chan: FdChannel) -> None:
    with await chan.receive() as msg:
        await chan.send(msg.data.upper(), msg.fds)


@pytest.mark.parametrize("kind", ["uids", "callable"])
async def test_refused_peer_is_closed_unread_and_the_server_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    caplog.set_level(logging.WARNING, logger="aiofdpass")
    gate = {"open": False}
    refuse_path, path = tmp_path / "refuse.sock", tmp_path / "s.sock"

    def policy(creds: PeerCredentials) -> bool:
        assert creds == ME
        return gate["open"]

    allow_none: object = {os.geteuid() + 1} if kind == "uids" else policy
    allow_me: object = [os.geteuid()] if kind == "uids" else policy
    async with (
        await aiofdpass.listen(refuse_path, allow=allow_none) as refusing,  # type: ignore[arg-type]
        await aiofdpass.listen(path, allow=allow_me) as listener,  # type: ignore[arg-type]
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(refusing.serve, echo_once)
        tg.start_soon(listener.serve, echo_once)
        for _ in range(3):
            await refused_client(refuse_path)
        if kind == "callable":
            await refused_client(path)
            gate["open"] = True
        for i in range(3):
            await admitted_client(path, f"req{i}".encode())
        tg.cancel_scope.cancel()
    refusals = [r for r in caplog.records if "refused a connection" in r.message]
    assert len(refusals) == (3 if kind == "uids" else 4)
    assert all(r.levelno == logging.WARNING for r in refusals)
    assert f"pid {os.getpid()} (uid {os.geteuid()}" in refusals[0].message


async def test_accept_skips_refused_peers(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    seen: list[PeerCredentials] = []

    def every_other(creds: PeerCredentials) -> bool:
        seen.append(creds)
        return len(seen) % 2 == 0

    async with await aiofdpass.listen(path, allow=every_other) as listener:
        first = await aiofdpass.connect(path)
        second = await aiofdpass.connect(path)
        async with first, second:
            await first.send(b"first")
            await second.send(b"second")
            async with await listener.accept() as server:
                assert (await server.receive()).data == b"second"
            # Closed with its record unread: end of stream, then EPIPE.
            with pytest.raises(anyio.EndOfStream):
                await first.receive()
            with pytest.raises(anyio.BrokenResourceError):
                await first.send(b"again")
    assert len(seen) == 2


async def test_a_policy_that_raises_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "s.sock"
    calls = []

    def buggy(creds: PeerCredentials) -> bool:
        calls.append(creds)
        if len(calls) == 1:
            raise KeyError("bug in the policy")
        return True

    caplog.set_level(logging.ERROR, logger="aiofdpass")
    async with await aiofdpass.listen(path, allow=buggy) as listener:
        refused = await aiofdpass.connect(path)
        admitted = await aiofdpass.connect(path)
        async with refused, admitted:
            await admitted.send(b"ok")
            async with await listener.accept() as server:
                assert (await server.receive()).data == b"ok"
            # It sent nothing, so it sees a plain close.
            with pytest.raises(anyio.EndOfStream):
                await refused.receive()
    assert "bug in the policy" in caplog.text


async def test_abstract_name_with_same_user(caplog: pytest.LogCaptureFixture) -> None:
    name = f"\0aiofdpass-cred-{os.getpid()}-{id(object())}"
    async with await aiofdpass.listen(name, allow=same_user()) as listener:
        async with await aiofdpass.connect(name) as c, await listener.accept() as s:
            await c.send(b"abstract")
            assert (await s.receive()).data == b"abstract"


POLLER = textwrap.dedent(
    """
    import os, stat, sys
    path = sys.argv[1]
    seen = set()
    print("ready", flush=True)
    while not os.path.exists(path + ".stop"):
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        seen.add(oct(stat.S_IMODE(st.st_mode)))
    print(" ".join(sorted(seen)))
    """
)


async def test_socket_file_never_appears_with_a_looser_mode(tmp_path: Path) -> None:
    # Another process watches the path while we create and remove the
    # socket many times with umask 0 (a plain bind would make it 0777, and
    # bind-then-chmod would expose that for a moment).
    path = tmp_path / "s.sock"
    old_umask = os.umask(0)
    try:
        async with await anyio.open_process(
            [sys.executable, "-c", POLLER, str(path)],
            stdin=subprocess.DEVNULL,
        ) as proc:
            assert proc.stdout is not None
            stdout = BufferedByteReceiveStream(proc.stdout)
            assert await stdout.receive_until(b"\n", 100) == b"ready"
            for _ in range(300):
                listener = await aiofdpass.listen(path, mode=0o600)
                await listener.aclose()
            # The stop file's own name is not the socket path.
            await anyio.Path(str(path) + ".stop").touch()
            out = (await stdout.receive_until(b"\n", 1000)).decode().split()
            await proc.wait()
    finally:
        os.umask(old_umask)
    assert out == ["0o600"]
    leftovers = sorted(os.listdir(tmp_path))
    assert leftovers == ["s.sock.stop"]  # no private directory left


async def test_listen_never_follows_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("precious")
    link = tmp_path / "s.sock"
    link.symlink_to(target)
    dangling = tmp_path / "dangling.sock"
    dangling.symlink_to(tmp_path / "nowhere")
    for path in (link, dangling):
        with pytest.raises(FileExistsError, match="not a socket"):
            await aiofdpass.listen(path)
        assert path.is_symlink()
    assert target.read_text() == "precious"
    assert not (tmp_path / "nowhere").exists()
    assert stat.S_ISREG(os.stat(target).st_mode)


async def test_so_passcred_on_an_accepted_channel_and_a_stream(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    with pipe() as (r, _):
        async with await aiofdpass.listen(path, allow=same_user()) as listener:
            async with (
                await aiofdpass.connect_stream(path) as client,
                await listener.accept() as server,
            ):
                for sock in (server, client):
                    sock.extra(SocketAttribute.raw_socket).setsockopt(
                        socket.SOL_SOCKET, socket.SO_PASSCRED, 1
                    )
                await client.send(encode_header(2, 1) + b"hi", [r])
                with await server.receive() as msg:
                    assert msg.data == b"hi" and len(msg.fds) == 1
                await server.send(b"back", [r, r])
                data, fds = await client.receive_with_fds()
                assert data[12:] == b"back" and len(fds) == 2
                for fd in fds:
                    fd.close()
                assert client.peer_credentials == server.peer_credentials == ME


async def test_the_umask_never_loosens_nor_narrows_the_mode(tmp_path: Path) -> None:
    # The socket gets ``mode`` before bind; the file is made with it minus
    # the umask (never looser), then given back what the umask took.
    old_umask = os.umask(0o077)
    try:
        for mode in (0o660, 0o666, 0o600, 0o000):
            path = tmp_path / f"{mode:o}.sock"
            async with await aiofdpass.listen(path, mode=mode):
                assert stat.S_IMODE(os.lstat(path).st_mode) == mode
    finally:
        os.umask(old_umask)


def _pidfd_pid(fd: aiofdpass.Fd) -> int:
    """The pid a pidfd refers to (-1 once the process exited and was reaped)."""
    with open(f"/proc/self/fdinfo/{fd.fileno()}") as f:
        for line in f:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise AssertionError("not a pidfd")


@pytest.mark.system
async def test_peer_pidfd_pins_the_connecting_process(tmp_path: Path) -> None:
    # SO_PEERPIDFD (Linux 6.5+): unlike the pid, the pidfd never comes to
    # name another process once the peer is gone.
    path = tmp_path / "s.sock"
    async with await aiofdpass.listen(path) as listener:
        async with await connecting_child(path) as proc:
            async with await listener.accept() as chan:
                with chan.peer_pidfd() as pidfd:
                    assert _pidfd_pid(pidfd) == proc.pid == chan.peer_credentials.pid
                    assert os.get_inheritable(pidfd.fileno()) is False
                    await chan.send(b"bye")
                    assert await proc.wait() == 0
                    assert _pidfd_pid(pidfd) == -1  # gone, and nobody else
        # A pair's peer is the process that made the pair (channels and
        # streams alike).
        for a, b in (aiofdpass.channel_pair(), aiofdpass.stream_pair()):
            async with a, b:
                with a.peer_pidfd() as mine:
                    assert _pidfd_pid(mine) == os.getpid()
            with pytest.raises(anyio.ClosedResourceError):
                a.peer_pidfd()
