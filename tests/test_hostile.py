"""A hostile or broken peer, over real socketpairs: clear errors, no leaked fd.

The peer here writes raw bytes and ``SCM_RIGHTS`` with ``socket.send_fds``,
so it can lie in every way the framing allows. Each test also checks that
the receiver released the descriptors at the moment it raised: the peer sends
the write end of a pipe and closes its own copy, so the read end sees end of
file only once no copy is left anywhere (the autouse fixture then checks the
descriptor table as a whole).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import gc
import itertools
import os
import re
import shutil
import socket
import stat
import struct
import sys
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute

import aiofdpass
from aiofdpass import Limits, PeerCredentials, ProtocolError, channel_pair
from aiofdpass._codec import READ_SIZE

from .helpers import backend_id, copies_of, pipe, raw, small_buffers

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


# -- Round two (issue 12): fail closed, touch nothing that is not ours -------


async def test_an_async_allow_policy_is_refused_at_listen(tmp_path: Path) -> None:
    # Its coroutine would be truthy: every peer would get in.
    async def policy(creds: PeerCredentials) -> bool:
        return False

    class AsyncCallable:
        async def __call__(self, creds: PeerCredentials) -> bool:
            return False

    # Each also inside functools.partial (inspect sees through those only
    # for functions: a partial of an async callable object got through).
    for allow in (
        policy,
        AsyncCallable(),
        functools.partial(policy),
        functools.partial(functools.partial(AsyncCallable())),
    ):
        with pytest.raises(TypeError, match="async function"):
            await aiofdpass.listen(tmp_path / "s.sock", allow=allow)  # type: ignore[arg-type]
        assert os.listdir(tmp_path) == []


async def test_a_policy_returning_anything_but_a_bool_refuses(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def later(creds: PeerCredentials) -> bool:
        return True

    def returns_a_coroutine(creds: PeerCredentials) -> bool:
        return later(creds)  # type: ignore[return-value]

    def returns_a_string(creds: PeerCredentials) -> bool:
        return "yes"  # type: ignore[return-value]

    path = tmp_path / "s.sock"
    for policy in (returns_a_coroutine, returns_a_string):
        async with (
            await aiofdpass.listen(path, allow=policy) as listener,
            await aiofdpass.connect(path) as peer,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(listener.accept)
            with anyio.fail_after(10):  # a hang guard: admitted, it would wait
                # Refused and closed unread: it sees the close.
                with pytest.raises(anyio.EndOfStream):
                    await peer.receive()
            tg.cancel_scope.cancel()
    assert caplog.text.count("not True or False; the peer was refused") == 2


class PolicyInterrupted(BaseException):
    """Not an Exception: as KeyboardInterrupt or SystemExit raised in a policy."""


async def test_a_policy_that_raises_a_base_exception_closes_the_connection(
    tmp_path: Path,
) -> None:
    # It propagates out of accept(); the accepted socket was left open
    # (until garbage collection, with a ResourceWarning), the peer waiting.
    def policy(creds: PeerCredentials) -> bool:
        raise PolicyInterrupted

    path = tmp_path / "s.sock"
    async with (
        await aiofdpass.listen(path, allow=policy) as listener,
        await aiofdpass.connect(path) as peer,
    ):
        with pytest.raises(PolicyInterrupted):
            await listener.accept()
        # Closed at once: end of stream, with no wait.
        assert raw(peer).recv(1, socket.MSG_DONTWAIT) == b""


# Another user tries listen() on the path. Run as root, the child imports
# what it needs, then becomes nobody (the interpreter may live where nobody
# can read it); run as anyone else, it stays this user, whom a mode-0
# socket file refuses just the same (EACCES).
LISTEN_AS_ANOTHER_USER = """
import os, sys, anyio, aiofdpass, anyio._backends._asyncio, anyio._backends._trio
import trio, uvloop

async def main():
    try:
        listener = await aiofdpass.listen(sys.argv[1])
    except OSError as exc:
        print(exc.errno, exc)
    else:
        await listener.aclose()
        print("listened")

if os.geteuid() == 0:
    os.setgroups([])
    os.setresgid(65534, 65534, 65534)
    os.setresuid(65534, 65534, 65534)
backend = sys.argv[2]
anyio.run(
    main,
    backend="trio" if backend == "trio" else "asyncio",
    backend_options={"use_uvloop": True} if backend == "uvloop" else {},
)
"""


async def _listen_as_another_user(path: str, anyio_backend: object) -> str:
    result = await anyio.run_process(
        [sys.executable, "-c", LISTEN_AS_ANOTHER_USER, path, backend_id(anyio_backend)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    return result.stdout.decode()


@pytest.mark.system
async def test_listen_never_removes_a_socket_it_cannot_probe(
    anyio_backend: object,
) -> None:
    # A directory anyone may create and remove files in; the socket file
    # refuses the other user's probe (EACCES). Only ECONNREFUSED is stale.
    directory = tempfile.mkdtemp()
    try:
        os.chmod(directory, 0o777)  # the shared directory of the attack
        path = os.path.join(directory, "s.sock")
        async with await aiofdpass.listen(path) as listener:
            os.chmod(path, 0)
            out = await _listen_as_another_user(path, anyio_backend)
            in_use = errno.EADDRINUSE
            assert out.startswith(f"{in_use} [Errno {in_use}] another process"), out
            # Still ours, and live: our clients still reach us.
            async with await aiofdpass.connect(path) as client:
                async with await listener.accept() as server:
                    await client.send(b"still here")
                    assert (await server.receive()).data == b"still here"
        # Stale, but the other user cannot tell: refused, and left in place.
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()
        os.chmod(path, 0)
        out = await _listen_as_another_user(path, anyio_backend)
        denied = errno.EACCES
        assert out.startswith(f"{denied} [Errno {denied}] cannot tell whether"), out
        assert "remove it yourself" in out
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        shutil.rmtree(directory)


@pytest.mark.system
async def test_listen_in_a_directory_it_cannot_write_names_the_path(
    anyio_backend: object,
) -> None:
    # bind() said "[Errno 13] Permission denied" and nothing else.
    directory = tempfile.mkdtemp()
    try:
        os.chmod(directory, 0o555)  # nobody (not root) may make a file there
        path = os.path.join(directory, "s.sock")
        out = await _listen_as_another_user(path, anyio_backend)
        denied = errno.EACCES
        expected = f"{denied} [Errno {denied}] cannot listen on {path!r}: Permission"
        assert out.startswith(expected), out
    finally:
        os.rmdir(directory)


async def test_listen_errors_name_what_was_asked_for() -> None:
    # An abstract name too long said "AF_UNIX path too long" (errno None),
    # one in use "[Errno 98] Address already in use" without the name.
    too_long = b"\0" + b"a" * 108
    with pytest.raises(OSError, match="abstract names are at most 107 bytes") as info:
        await aiofdpass.listen(too_long)
    assert info.value.errno == errno.ENAMETOOLONG
    name = f"\0aiofdpass-test-{os.getpid()}"
    async with await aiofdpass.listen(name):
        with pytest.raises(OSError, match="another socket has this abstract name"):
            await aiofdpass.listen(name)
    # A directory that exists but holds no sockets is not called missing.
    with pytest.raises(FileNotFoundError) as missing:
        await aiofdpass.listen("/proc/s.sock")
    assert "does not exist" not in str(missing.value)
    assert "cannot listen on '/proc/s.sock'" in str(missing.value)


async def test_a_refused_listen_is_not_a_connection_to_the_live_server(
    tmp_path: Path,
) -> None:
    # The liveness check asks the kernel; it does not connect. The first
    # connection the live server accepts is a real client's.
    path = tmp_path / "s.sock"
    async with await aiofdpass.listen(path) as listener:
        for _ in range(3):
            with pytest.raises(OSError, match="another process is listening") as info:
                await aiofdpass.listen(path)
            assert info.value.errno == errno.EADDRINUSE
        async with await aiofdpass.connect(path) as client:
            await client.send(b"real")
            async with await listener.accept() as server:
                assert (await server.receive()).data == b"real"


async def test_a_live_socket_under_another_name_is_live(tmp_path: Path) -> None:
    # A hard link to a live socket file, or the file moved: connect() there
    # reaches the server, so listen() there must refuse, without a probe.
    path = tmp_path / "s.sock"
    async with await aiofdpass.listen(path) as listener:
        os.link(path, tmp_path / "link.sock")
        os.rename(path, tmp_path / "moved.sock")
        for name in ("link.sock", "moved.sock"):
            with pytest.raises(OSError, match="another process is listening") as info:
                await aiofdpass.listen(tmp_path / name)
            assert info.value.errno == errno.EADDRINUSE
        async with await aiofdpass.connect(tmp_path / "moved.sock") as client:
            await client.send(b"real")
            async with await listener.accept() as server:  # not a probe
                assert (await server.receive()).data == b"real"
    assert sorted(os.listdir(tmp_path)) == ["link.sock", "moved.sock"]  # not ours
    for name in ("link.sock", "moved.sock"):
        os.unlink(tmp_path / name)


async def test_a_stale_socket_is_replaced_only_under_the_directory_lock(
    tmp_path: Path,
) -> None:
    # Two listen() calls replacing one stale socket at once each checked,
    # unlinked and bound: the later unlink could remove the socket the other
    # had just bound, live. The replacement holds the directory's flock;
    # here another process (this test) holds it.
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(path))
    directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)
        with pytest.raises(OSError, match="another process holds the lock") as info:
            await aiofdpass.listen(path)
        assert info.value.errno == errno.EADDRINUSE
        assert stat.S_ISSOCK(os.lstat(path).st_mode)  # left alone
        async with await aiofdpass.listen(tmp_path / "new.sock"):
            pass  # nothing to replace there: no lock needed
    finally:
        os.close(directory)
    async with await aiofdpass.listen(path):  # the lock is free: replaced
        pass


async def test_a_socket_of_another_type_is_live(tmp_path: Path) -> None:
    # A datagram socket bound to the path: connect() would say EPROTOTYPE.
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
        dgram.bind(str(path))
        with pytest.raises(OSError, match="another process is listening") as info:
            await aiofdpass.listen(path)
        assert info.value.errno == errno.EADDRINUSE
        # And a stream socket that is bound but not listening yet (its
        # server is starting: connect() would say ECONNREFUSED).
        starting = tmp_path / "starting.sock"
        with socket.socket(socket.AF_UNIX) as early:
            early.bind(str(starting))
            with pytest.raises(OSError, match="another process is listening"):
                await aiofdpass.listen(starting)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)


# On overlayfs over two filesystems (and on btrfs), stat's st_dev for a file
# is not the superblock's device that sock_diag reports.
ON_OVERLAYFS = """
import os, socket, sys, anyio, aiofdpass

async def main():
    path = "m/s.sock"
    async with await aiofdpass.listen(path) as listener:
        try:
            await aiofdpass.listen(path)
        except OSError as exc:
            print("live:", exc.errno)
        async with await aiofdpass.connect(path) as client:
            await client.send(b"real")
            async with await listener.accept() as server:
                try:
                    print("first accepted:", (await server.receive()).data.decode())
                except anyio.EndOfStream:
                    print("first accepted: the probe")
    with socket.socket(socket.AF_UNIX) as starting:  # bound, not listening yet
        starting.bind("m/starting.sock")
        try:
            listener = await aiofdpass.listen("m/starting.sock")
        except OSError as exc:
            print("bound:", exc.errno, exc)
        else:
            await listener.aclose()
            print("bound: replaced")

backend = sys.argv[1]
anyio.run(
    main,
    backend="trio" if backend == "trio" else "asyncio",
    backend_options={"use_uvloop": True} if backend == "uvloop" else {},
)
"""

MOUNT_OVERLAYFS = (
    "mkdir a b m && mount -t tmpfs none a && mount -t tmpfs none b"
    " && mkdir a/lower b/upper b/work && mount -t overlay overlay"
    " -o lowerdir=a/lower,upperdir=b/upper,workdir=b/work m"
    ' || exit 77; exec "$0" -c "$1" "$2"'
)


@pytest.mark.system
async def test_liveness_on_a_filesystem_whose_stat_device_differs(
    tmp_path: Path, anyio_backend: object
) -> None:
    # sock_diag missed the socket there, so listen() fell back to probing:
    # the live server accepted the probe, and a socket bound but not yet
    # listening (connect: ECONNREFUSED) was taken for stale and replaced.
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to mount an overlayfs privately")
    result = await anyio.run_process(
        [
            *("unshare", "-m", "--propagation", "private", "sh", "-c"),
            *(MOUNT_OVERLAYFS, sys.executable, ON_OVERLAYFS, backend_id(anyio_backend)),
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        check=False,
    )
    if result.returncode == 77:
        pytest.skip(f"cannot mount an overlayfs here: {result.stderr.decode()}")
    out = result.stdout.decode()
    in_use = errno.EADDRINUSE
    assert f"live: {in_use}\nfirst accepted: real\nbound: {in_use} " in out, (
        out + result.stderr.decode()
    )
    assert "same inode number on another filesystem" in out


async def test_long_file_names_are_refused_unless_connect_can_reach_them(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    unreachable = deep / ("n" * 100)  # no sun_path form of it fits in 108 bytes
    with pytest.raises(OSError, match="connect.. could not reach it") as info:
        await aiofdpass.listen(unreachable)
    assert info.value.errno == errno.ENAMETOOLONG
    assert os.listdir(deep) == []
    # connect() says why it cannot (the socket module's own words kept).
    with pytest.raises(OSError, match="AF_UNIX path too long") as info:
        await aiofdpass.connect(unreachable)
    assert info.value.errno == errno.ENAMETOOLONG
    # A long path with a short enough file name works, under its real name.
    reachable = deep / ("n" * 60)
    async with await aiofdpass.listen(reachable) as listener:
        async with await aiofdpass.connect(reachable) as client:
            async with await listener.accept() as server:
                assert client.extra(SocketAttribute.remote_address) == str(reachable)
                assert server.extra(SocketAttribute.local_address) == str(reachable)
        with pytest.raises(OSError, match="another process is listening"):
            await aiofdpass.listen(reachable)


async def test_path_limits_count_bytes_at_the_edges(tmp_path: Path) -> None:
    # sun_path holds 108 bytes; in a longer path the file name may have 82.
    # Both count bytes: "é" is two of them.
    base = len(os.fsencode(tmp_path)) + 1
    for total in (107, 108):  # the last direct name, the first through /proc
        path = tmp_path / ("é" * ((total - base) // 2) + "x" * ((total - base) % 2))
        assert len(os.fsencode(path)) == total
        async with await aiofdpass.listen(path) as listener:
            async with await aiofdpass.connect(path) as client:
                async with await listener.accept() as server:
                    await client.send(b"edge")
                    assert (await server.receive()).data == b"edge"
                    assert client.extra(SocketAttribute.remote_address) == str(path)
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    async with await aiofdpass.listen(deep / ("é" * 41)):  # 82 bytes, 41 chars
        pass
    with pytest.raises(OSError, match="could not reach it") as info:
        await aiofdpass.listen(deep / ("é" * 41 + "x"))  # 83 bytes, 42 chars
    assert info.value.errno == errno.ENAMETOOLONG
    assert os.listdir(deep) == []


async def test_listen_and_connect_errors_say_what_happened(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "s.sock"
    with pytest.raises(FileNotFoundError, match="no-such-dir' does not exist; create"):
        await aiofdpass.listen(missing)
    assert os.listdir(tmp_path) == []
    regular = tmp_path / "regular"
    regular.write_text("x")
    with pytest.raises(OSError, match="it is a file, not a socket") as info:
        await aiofdpass.connect(regular)
    assert info.value.errno == errno.ENOTSOCK
    with pytest.raises(OSError, match="it is a directory, not a socket"):
        await aiofdpass.connect_stream(tmp_path)


async def test_connect_to_an_abstract_name_nobody_listens_on_is_refused() -> None:
    # A str abstract name made the error path stat() it: ValueError
    # "embedded null byte" instead of ConnectionRefusedError.
    name = f"\0aiofdpass-test-nobody-{os.getpid()}"
    for abstract in (name, os.fsencode(name)):
        with pytest.raises(ConnectionRefusedError, match="an abstract name nobody"):
            await aiofdpass.connect(abstract)
        with pytest.raises(ConnectionRefusedError, match="an abstract name nobody"):
            await aiofdpass.connect_stream(abstract)


async def test_remote_address_is_the_real_path(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with await aiofdpass.listen(path) as listener:
        async with await aiofdpass.connect(path) as client:
            async with await listener.accept() as server:
                assert client.extra(SocketAttribute.remote_address) == str(path)
                assert server.extra(SocketAttribute.local_address) == str(path)
                # The kernel's own name for it, too.
                assert raw(client).getpeername() == str(path)
        async with await aiofdpass.connect_stream(path) as stream:
            assert stream.extra(SocketAttribute.remote_address) == str(path)
            async with await listener.accept():
                pass


def _children() -> set[str]:
    """This process's child processes, running or not yet waited for."""
    pids: set[str] = set()
    for name in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{name}/children") as f:
            pids.update(f.read().split())
    return pids


@pytest.mark.system
async def test_cancelled_open_child_process_leaves_nothing_behind() -> None:
    # Cancel it after k scheduler yields, for every k until it completes:
    # each time, both channel ends are closed and any child started is
    # killed and waited for (the autouse fixture checks the descriptors;
    # warnings are errors, so a ResourceWarning fails too).
    command = [sys.executable, "-c", "import time; time.sleep(60)"]
    # Children an earlier test left behind are not this test's to judge.
    others = _children()
    for k in itertools.count(-1):
        assert _children() <= others
        started = None
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as scope:
                tg.start_soon(_cancel_after, k, scope)
                started = await aiofdpass.open_child_process(command)
        gc.collect()
        if started is not None:
            process, chan = started
            async with process, chan:
                process.kill()
            break
        assert _children() <= others, k
    assert k > 0  # the sweep reached inside the call


async def _cancel_after(k: int, scope: anyio.CancelScope) -> None:
    for _ in range(k):
        await anyio.lowlevel.checkpoint()
    scope.cancel()


async def test_serve_without_a_task_group_raises_closed_resource_error(
    tmp_path: Path,
) -> None:
    listener = await aiofdpass.listen(tmp_path / "s.sock")

    async def handler(chan: aiofdpass.FdChannel) -> None:
        pass

    async with anyio.create_task_group() as tg:

        async def serve() -> None:
            # The documented error itself, not an ExceptionGroup around it.
            with pytest.raises(anyio.ClosedResourceError):
                await listener.serve(handler)

        tg.start_soon(serve)
        await anyio.wait_all_tasks_blocked()
        await listener.aclose()


@pytest.mark.parametrize("bad", [2**31, 2**63])
async def test_a_number_out_of_descriptor_range_is_refused_before_anything(
    probe: Probe, bad: int
) -> None:
    class Numbered:
        def fileno(self) -> int:
            return bad

    a, b = channel_pair()
    s, t = aiofdpass.stream_pair()
    async with a, b, s, t:
        before = copies_of(probe.w)
        for fds in ([probe.w, bad], [probe.w] * 20 + [bad]):  # queued, direct
            for _ in range(3):  # a burst: the queued path duplicates first
                with pytest.raises(ValueError, match="between 0 and 2147483647"):
                    await a.send(b"x", fds)
                with pytest.raises(ValueError, match="between 0 and 2147483647"):
                    await a.send(b"x", iter(fds))
                with pytest.raises(ValueError, match="between 0 and 2147483647"):
                    await s.send(b"x", fds)
            for chan in (a, s):  # from fileno()
                with pytest.raises(ValueError, match=f"fileno.. returned {bad}"):
                    await chan.send(b"x", [probe.w, Numbered()])
        assert copies_of(probe.w) == before  # nothing duplicated, nothing kept
        with pytest.raises(ValueError, match="between 0 and 2147483647"):
            aiofdpass.Fd(bad)
        await a.send_eof()
        await s.send_eof()
        with pytest.raises(anyio.EndOfStream):  # nothing was sent
            await b.receive()
        with pytest.raises(anyio.EndOfStream):
            await t.receive_with_fds()


async def test_a_closed_number_is_ebadf_on_the_queued_path_too(probe: Probe) -> None:
    # In a burst, a record is queued with our own duplicates. dup takes the
    # lowest free number: the closed one in the list. Duplicating that next
    # copied our own duplicate, and the record went out carrying probe.w
    # twice instead of failing.
    a, b = channel_pair()
    async with a, b:
        before = copies_of(probe.w)
        closed = os.dup(probe.w)
        os.close(closed)
        for fds in ([probe.w, closed], [probe.w] * 20 + [closed]):  # queued, direct
            for _ in range(3):  # a burst: the queued path duplicates first
                with pytest.raises(OSError, match=f"descriptor {closed} is not open"):
                    await a.send(b"x", fds)
        assert copies_of(probe.w) == before  # nothing duplicated, nothing kept
        await a.send_eof()
        with pytest.raises(anyio.EndOfStream):  # nothing was sent
            await b.receive()


async def test_message_data_must_be_bytes() -> None:
    for data in (5, 10**9, "text"):
        with pytest.raises(TypeError, match="Message data must be bytes-like"):
            aiofdpass.Message(data)  # type: ignore[arg-type]
    assert aiofdpass.Message(bytearray(b"ok")).data == b"ok"


async def test_a_bare_descriptor_for_fds_says_to_pass_a_list(probe: Probe) -> None:
    a, b = channel_pair()
    s, t = aiofdpass.stream_pair()
    async with a, b, s, t:
        with socket.socket(socket.AF_UNIX) as sock:
            for bare, shown in ((probe.w, str(probe.w)), (sock, "<socket.socket")):
                with pytest.raises(TypeError, match=rf"pass \[{re.escape(shown)}"):
                    await a.send(b"x", bare)  # type: ignore[arg-type]
                with pytest.raises(TypeError, match="pass \\["):
                    await s.send(b"x", bare)  # type: ignore[arg-type]


async def test_bytes_for_fds_are_not_taken_for_descriptor_numbers(
    probe: Probe,
) -> None:
    # send(b"head", b"tail") iterated the bytes as numbers: each byte that
    # named an open descriptor (here probe.w) went to the peer.
    a, b = channel_pair()
    s, t = aiofdpass.stream_pair()
    async with a, b, s, t:
        before = copies_of(probe.w)
        for bad in (bytes([probe.w]), bytearray([probe.w]), str(probe.w)):
            for chan in (a, s):
                with pytest.raises(
                    TypeError,
                    match="fds takes a list of descriptors, not (bytes|bytearray|str) ",
                ):
                    await chan.send(b"x", bad)
        assert copies_of(probe.w) == before
        await a.send_eof()
        with pytest.raises(anyio.EndOfStream):  # nothing was sent
            await b.receive()


async def test_adopting_a_bad_descriptor_names_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pipe() as (r, _):
        with pytest.raises(
            OSError, match=rf"from_fd\({r}\): descriptor {r} is not a socket"
        ):
            aiofdpass.FdChannel.from_fd(r)
        with pytest.raises(OSError, match=rf"descriptor {r} is not a socket"):
            aiofdpass.FdStream.from_fd(r)
        monkeypatch.setenv(aiofdpass.CHANNEL_FD_ENV, str(r))
        with pytest.raises(OSError, match=f"AIOFDPASS_CHANNEL_FD='{r}'"):
            aiofdpass.channel_from_env()
        os.fstat(r)  # still open: the caller still owns it
    closed = os.dup(0)
    os.close(closed)
    monkeypatch.setenv(aiofdpass.CHANNEL_FD_ENV, str(closed))
    with pytest.raises(
        OSError,
        match=rf"FD='{closed}': from_fd\({closed}\): descriptor {closed} is not open",
    ) as info:
        aiofdpass.channel_from_env()
    assert info.value.errno == errno.EBADF
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram:
        monkeypatch.setenv(aiofdpass.CHANNEL_FD_ENV, str(dgram.fileno()))
        with pytest.raises(ValueError, match="AIOFDPASS_CHANNEL_FD=.*SOCK_STREAM"):
            aiofdpass.channel_from_env()


async def test_adopting_a_socket_that_is_not_connected_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A listening or an unconnected socket was adopted silently; its first
    # send or receive failed with ENOTCONN.
    with (
        socket.socket(socket.AF_UNIX) as listening,
        socket.socket(socket.AF_UNIX) as unconnected,
    ):
        listening.bind(f"\0aiofdpass-test-listening-{os.getpid()}")
        listening.listen()
        for sock, why in ((listening, "is listening"), (unconnected, "not connected")):
            for kind in (aiofdpass.FdChannel, aiofdpass.FdStream):
                with pytest.raises(ValueError, match=why):
                    kind.from_fd(sock.fileno())
                with pytest.raises(ValueError, match=why):
                    kind.from_socket(sock)
            monkeypatch.setenv(aiofdpass.CHANNEL_FD_ENV, str(sock.fileno()))
            with pytest.raises(ValueError, match=f"AIOFDPASS_CHANNEL_FD=.*{why}"):
                aiofdpass.channel_from_env()
            os.fstat(sock.fileno())  # the caller still owns it


async def test_memory_grows_with_the_bytes_that_arrived_not_the_header() -> None:
    # 13 bytes (a header announcing 100 MiB, and one byte of it) commit no
    # memory for the announced payload: a stalled peer costs one read's
    # worth. Then the payload trickles in and the buffer grows with it.
    size = 100 * 1024 * 1024
    a, b = channel_pair(limits=Limits(max_payload=size))
    async with a, b:
        raw(a).sendall(header(0, size) + b"x")
        tracemalloc.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(b.receive)
                await anyio.wait_all_tasks_blocked()  # it waits for the rest
                _, peak = tracemalloc.get_traced_memory()
                tg.cancel_scope.cancel()
        finally:
            tracemalloc.stop()
        assert peak < 1024 * 1024, peak  # the event loop's own allocations too
        # Nothing was lost to the cancellation, and the record arrives whole
        # when the rest is sent; memory stays within twice what arrived.
        chunk = b"y" * (1024 * 1024)
        sent = 1

        async def send_rest() -> None:
            nonlocal sent
            while sent < size:
                n = min(len(chunk), size - sent)
                await anyio.wait_writable(raw(a))
                sent += raw(a).send(chunk[:n])

        tracemalloc.start()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(send_rest)
                msg = await b.receive()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(msg.data) == size and msg.data[:2] == b"xy"
        # The buffer (grown by doubling) and the message's own copy.
        assert peak < 3 * size, peak


async def test_peer_closes_with_our_record_unread_is_end_of_stream(
    probe: Probe,
) -> None:
    # Linux reports ECONNRESET to us, after the peer's own records, when it
    # closed with data of ours unread. Its direction ended at a record
    # boundary: that is end of stream, and async for ends cleanly.
    a, b = channel_pair()
    async with b:
        await b.send(b"never read", probe.copies(1))
        await a.send(b"one", probe.copies(1))
        await a.send(b"two")
        await a.aclose()
        probe.drop_mine()
        got = []
        async for msg in b:
            with msg:
                got.append((msg.data, msg.nfds))
        assert got == [(b"one", 1), (b"two", 0)]
        with pytest.raises(anyio.EndOfStream):
            await b.receive()
        with pytest.raises(anyio.BrokenResourceError):  # nobody reads: EPIPE
            await b.send(b"more")
        assert probe.released()
    # Inside a record it is still a truncated record.
    c, d = channel_pair()
    async with d:
        await d.send(b"never read")
        raw(c).sendall(header(0, 10) + b"part")
        await c.aclose()
        with pytest.raises(ProtocolError, match="middle of a record"):
            await d.receive()


# A receiver whose address space is capped. "growing": a peer announces
# 4 GiB - 1 under a max_payload that allows it, and sends until the receiver
# gives up. "copying": a record of 128 MiB arrives whole (its buffer fits),
# but the copy handed out as Message.data does not: the address space holds
# the buffer and a half.
RECEIVE_WITH_LITTLE_MEMORY = """
import resource, struct, sys
import anyio, aiofdpass
from anyio.abc import SocketAttribute

growing = sys.argv[2] == "growing"
SIZE = 2**32 - 1 if growing else 128 * 1024 * 1024
ROOM = 256 * 1024 * 1024 if growing else SIZE * 13 // 8

async def main():
    a, b = aiofdpass.channel_pair(limits=aiofdpass.Limits(max_payload=SIZE))
    async with a, b:
        peer = a.extra(SocketAttribute.raw_socket)
        peer.sendall(struct.pack("!2sBBHHI", b"FD", 1, 0, 0, 0, SIZE))
        with open("/proc/self/status") as f:
            size = next(int(l.split()[1]) for l in f if l.startswith("VmSize:"))
        cap = size * 1024 + ROOM
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        chunk = b"z" * 65536

        async def feed():
            left = SIZE
            while left:
                await anyio.wait_writable(peer)
                try:
                    left -= peer.send(chunk[: min(left, len(chunk))])
                except BlockingIOError:
                    pass
                except OSError:
                    return  # the receiver broke the connection

        async with anyio.create_task_group() as tg:
            tg.start_soon(feed)
            try:
                msg = await b.receive()
            except aiofdpass.ProtocolError as exc:
                print("ProtocolError:", exc)
            except MemoryError:
                print("MemoryError")
            else:
                print("received", len(msg.data))
            tg.cancel_scope.cancel()

backend = sys.argv[1]
anyio.run(
    main,
    backend="trio" if backend == "trio" else "asyncio",
    backend_options={"use_uvloop": True} if backend == "uvloop" else {},
)
"""


@pytest.mark.system
@pytest.mark.parametrize("where", ["growing", "copying"])
async def test_no_memory_error_escapes_receive(
    anyio_backend: object, where: str
) -> None:
    # "copying": the decoder's buffer held the whole record, and the copy
    # for the message raised MemoryError out of receive().
    result = await anyio.run_process(
        [
            *(sys.executable, "-c", RECEIVE_WITH_LITTLE_MEMORY),
            *(backend_id(anyio_backend), where),
        ],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    out = result.stdout.decode()
    assert out.startswith("ProtocolError: out of memory for a record"), out
    assert "lower Limits.max_payload" in out
