"""The wire protocol is a spec: a C peer written from it talks to Python.

``examples/c_peer/afd_peer.c`` is built with the system C compiler and run
against a Python server made here with :func:`aiofdpass.listen`, in both
directions: the C peer sends records with descriptors and checks the echoes,
and Python sends records that the C peer reports on and echoes back.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute

import aiofdpass
from aiofdpass import FdChannel

from .helpers import identity

pytestmark = [pytest.mark.anyio, pytest.mark.system]

SOURCE = Path(__file__).parent.parent / "examples" / "c_peer" / "afd_peer.c"
TIMEOUT = 30


def find_compiler() -> list[str] | None:
    """``$CC`` if set, else the first of cc, gcc, clang on PATH."""
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        path = shutil.which(name)
        if path:
            return [path]
    return None


def build_c(source: Path, binary: Path) -> Path:
    """Compile ``source`` with strict warnings; skip without a C compiler."""
    compiler = find_compiler()
    if compiler is None:
        pytest.skip(
            "no C compiler (set $CC, or put cc, gcc or clang on PATH) to build "
            f"examples/c_peer/{source.name}"
        )
    result = subprocess.run(
        [
            *compiler,
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Wpedantic",
            "-Werror",
            "-O2",
            "-o",
            str(binary),
            str(source),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"building {source.name} failed:\n{result.stderr}"
    return binary


@pytest.fixture(scope="session")
def c_peer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(SOURCE, tmp_path_factory.mktemp("c_peer") / "afd_peer")


async def run_c_peer(binary: Path, cwd: Path, mode: str) -> tuple[str, str]:
    # A relative socket path: sun_path has room for 107 bytes only, and
    # pytest's temporary directories can be deep.
    result = await anyio.run_process(
        [str(binary), "s.sock", mode], cwd=cwd, check=False
    )
    out, err = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, f"C peer exited {result.returncode}:\n{err}"
    return out, err


@dataclass
class Seen:
    """What the Python server saw in one record from the C peer."""

    data: bytes
    identities: list[tuple[int, int]]
    inheritable: list[bool]
    content: bytes | None = None


async def test_c_peer_sends_python_echoes(c_peer: Path, tmp_path: Path) -> None:
    seen: list[Seen] = []
    finished = anyio.Event()

    async def echo(channel: FdChannel) -> None:
        async for msg in channel:
            with msg:
                fds = [fd.fileno() for fd in msg.fds]
                record = Seen(
                    msg.data,
                    [identity(fd) for fd in fds],
                    [os.get_inheritable(fd) for fd in fds],
                )
                # The C peer sent a pipe and a file: read them here.
                if msg.data in (b"pipe", b"file"):
                    record.content = os.read(fds[0], 100)
                seen.append(record)
                await channel.send(msg)  # the same bytes and descriptors
        finished.set()

    with anyio.fail_after(TIMEOUT):
        async with (
            await aiofdpass.listen(tmp_path / "s.sock") as listener,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(listener.serve, echo)
            out, _ = await run_c_peer(c_peer, tmp_path, "send")
            await finished.wait()
            tg.cancel_scope.cancel()

    assert [s.data for s in seen] == [
        b"pipe",
        b"file",
        b"",
        bytes((i * 7 + i // 251) & 0xFF for i in range(1024 * 1024)),
        b"c1",
        b"c2",
        b"c3",
        b"many",
    ]
    pipe, file, empty, big, c1, c2, c3, many = seen
    assert pipe.content == b"from C through a pipe\n"
    assert file.content == b"from C in a file\n"
    assert [len(s.identities) for s in seen] == [1, 1, 0, 2, 1, 0, 2, 253]
    # The records written by one sendmsg got their own descriptors, in order:
    # c3 carries the pipe's write end and then the file from record 2.
    assert c3.identities[1] == file.identities[0]
    assert c1.identities[0] == c3.identities[0]  # both ends of one pipe
    assert len(set(many.identities)) == 1
    assert many.identities[0] == file.identities[0]
    assert not any(flag for s in seen for flag in s.inheritable)
    assert out.splitlines() == [
        "echo pipe: ok, 4 bytes, 1 fds",
        "echo file: ok, 4 bytes, 1 fds",
        "file offset after the peer read it: 17 (shared)",
        "echo empty: ok, 0 bytes, 0 fds",
        "echo big: ok, 1048576 bytes, 2 fds",
        "echo c1: ok, 2 bytes, 1 fds",
        "echo c2: ok, 2 bytes, 0 fds",
        "echo c3: ok, 2 bytes, 2 fds",
        "echo many: ok, 4 bytes, 253 fds",
        "send: 8 records echoed and checked, clean end of stream",
    ]
    del empty, big, c2


async def test_python_sends_c_peer_echoes(c_peer: Path, tmp_path: Path) -> None:
    big = os.urandom(1024 * 1024)
    file_path = tmp_path / "data.txt"
    file_path.write_bytes(b"from Python in a file\n")
    r, w = os.pipe()
    os.write(w, b"from Python through a pipe\n")
    os.close(w)
    ours, theirs = socket.socketpair()
    echoes: list[tuple[bytes, list[tuple[int, int]], list[bool]]] = []
    output: list[str] = []

    async def peer() -> None:
        out, _ = await run_c_peer(c_peer, tmp_path, "echo")
        output.extend(out.splitlines())

    async def talk(channel: FdChannel, records: list[tuple[bytes, list[int]]]) -> None:
        async def send_all() -> None:
            for data, fds in records:
                await channel.send(data, fds)
            await channel.send_eof()

        async with anyio.create_task_group() as tg:
            tg.start_soon(send_all)
            async for msg in channel:
                with msg:
                    fds = [fd.fileno() for fd in msg.fds]
                    echoes.append(
                        (
                            msg.data,
                            [identity(fd) for fd in fds],
                            [os.get_inheritable(fd) for fd in fds],
                        )
                    )

    f = os.open(file_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        records = [
            (b"file", [f]),
            (b"pipe", [r]),
            (b"socket", [theirs.fileno()]),
            (b"", []),
            (big, [f]),
            (b"many", [f] * 253),
        ]
        with anyio.fail_after(TIMEOUT):
            async with (
                await aiofdpass.listen(tmp_path / "s.sock") as listener,
                anyio.create_task_group() as tg,
            ):
                tg.start_soon(peer)
                async with await listener.accept() as channel:
                    await talk(channel, records)
                # The C peer exits once it read our end of stream.
        assert [e[0] for e in echoes] == [data for data, _ in records]
        for (_, ids, inheritable), (_, fds) in zip(echoes, records, strict=True):
            assert ids == [identity(fd) for fd in fds]
            assert not any(inheritable)
        theirs.close()
        # The C peer wrote on the socket it was given.
        assert ours.recv(100) == b"hello from C\n"
    finally:
        os.close(f)
        os.close(r)
        ours.close()
        theirs.close()
    # What the C peer found in the descriptors it received.
    assert output == [
        'record 0: 4 bytes, 1 fds, data="file"',
        '  fd 0: file cloexec=1 content="from Python in a file\\n"',
        'record 1: 4 bytes, 1 fds, data="pipe"',
        '  fd 0: pipe cloexec=1 content="from Python through a pipe\\n"',
        'record 2: 6 bytes, 1 fds, data="socket"',
        "  fd 0: socket (wrote 13 bytes) cloexec=1",
        'record 3: 0 bytes, 0 fds, data=""',
        "record 4: 1048576 bytes, 1 fds",
        '  fd 0: file cloexec=1 content="from Python in a file\\n"',
        'record 5: 4 bytes, 253 fds, data="many"',
        "  253 fds, all the same open file: yes",
        "echo: 6 records echoed, clean end of stream",
    ]


@pytest.mark.parametrize(
    ("wire", "complaint"),
    [
        pytest.param(b"XD\1\0\0\0\0\0\0\0\0\0", "bad magic", id="magic"),
        pytest.param(b"FD\2\0\0\0\0\0\0\0\0\0", "unknown version", id="version"),
        pytest.param(
            b"FD\1\0\0\1\0\0\0\0\0\0",
            "fewer descriptors than the header announced",
            id="missing-fd",
        ),
        pytest.param(
            b"FD\1\0\0\0\0\0\0\0\0\5abc", "end of stream inside a record", id="eof"
        ),
    ],
)
async def test_c_peer_rejects_protocol_violations(
    c_peer: Path, tmp_path: Path, wire: bytes, complaint: str
) -> None:
    """The C receiver follows section 6: each violation fails the connection."""
    with anyio.fail_after(TIMEOUT):
        async with (
            await aiofdpass.listen(tmp_path / "s.sock") as listener,
            anyio.create_task_group() as tg,
        ):
            results: list[subprocess.CompletedProcess[bytes]] = []

            async def peer() -> None:
                results.append(
                    await anyio.run_process(
                        [str(c_peer), "s.sock", "echo"], cwd=tmp_path, check=False
                    )
                )

            tg.start_soon(peer)
            async with await listener.accept() as channel:
                raw = channel.extra(SocketAttribute.raw_socket)
                raw.send(wire)  # a few bytes: never blocks
                await channel.send_eof()
                with pytest.raises(anyio.EndOfStream):
                    await channel.receive()  # the peer failed the connection
    assert results[0].returncode == 2
    assert results[0].stderr.decode() == f"afd_peer: protocol violation: {complaint}\n"
