"""The cookbook's recipes (docs/foreign-protocols.md) against C peers.

Each recipe's Python side lives in ``examples/foreign_*.py``; its peer is a
C program in ``examples/foreign/``, written from the protocol's public
description, built here with the system C compiler. The scenarios run in
this process on every backend (so the leak check covers them); the
examples' own ``--self-test`` runs are in tests/test_examples.py. The
recipes' refusals of a broken peer are checked over socket pairs.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from aiofdpass import stream_pair

from .helpers import pipe, raw
from .test_c_peer import find_compiler

EXAMPLES = Path(__file__).parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))  # the examples import their _common helper

import foreign_apue  # noqa: E402
import foreign_counted  # noqa: E402
import foreign_nginx  # noqa: E402

pytestmark = pytest.mark.anyio

TIMEOUT = 60
FLAGS = ["-std=c11", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-O2"]


@pytest.fixture(scope="session")
def c_programs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every C peer of the cookbook, built with warnings as errors."""
    compiler = find_compiler()
    if compiler is None:
        pytest.skip(
            "no C compiler (set $CC, or put cc, gcc or clang on PATH) to build "
            "the C peers in examples/foreign/"
        )
    out = tmp_path_factory.mktemp("foreign")
    built = {}
    for source in sorted((EXAMPLES / "foreign").glob("*.c")):
        binary = out / source.stem
        result = subprocess.run(
            [*compiler, *FLAGS, "-o", str(binary), str(source)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, f"building {source.name}:\n{result.stderr}"
        built[source.stem] = binary
    return built


@pytest.mark.system
async def test_apue_open_server(c_programs: dict[str, Path], tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        report = await foreign_apue.scenario(c_programs["apue_opend"], tmp_path)
    assert report == foreign_apue.expected(tmp_path)


@pytest.mark.system
async def test_nginx_channel(c_programs: dict[str, Path]) -> None:
    with anyio.fail_after(TIMEOUT):
        report = await foreign_nginx.scenario(c_programs["nginx_master"])
    assert foreign_nginx.without_pids(report) == foreign_nginx.EXPECTED


@pytest.mark.system
async def test_counted_descriptors(c_programs: dict[str, Path], tmp_path: Path) -> None:
    with anyio.fail_after(TIMEOUT):
        report = await foreign_counted.scenario(c_programs["counted_peer"], tmp_path)
    assert report == foreign_counted.EXPECTED


async def test_apue_recv_fd_refuses_a_status_0_without_a_descriptor() -> None:
    a, b = stream_pair()
    async with a, b:
        raw(a).sendall(b"\0\0")
        with pytest.raises(foreign_apue.ProtocolViolation, match="0 descriptors"):
            await foreign_apue.recv_fd(b)
        with pipe() as (r, _):
            socket.send_fds(raw(a), [b"\0"], [r, r])
            raw(a).sendall(b"\0")
            with pytest.raises(foreign_apue.ProtocolViolation, match="2 descriptors"):
                await foreign_apue.recv_fd(b)  # and it closed both


async def test_nginx_read_channel_checks_the_descriptor_count() -> None:
    a, b = stream_pair()
    async with a, b:
        message = foreign_nginx.CHANNEL.pack(
            foreign_nginx.NGX_CMD_OPEN_CHANNEL, 1, 1, 7
        )
        raw(a).sendall(message)
        with pytest.raises(foreign_nginx.ProtocolViolation, match="0 descriptors"):
            await foreign_nginx.read_channel(b)
        with pipe() as (r, _):
            quit_ = foreign_nginx.CHANNEL.pack(foreign_nginx.NGX_CMD_QUIT, 1, 0, r)
            socket.send_fds(raw(a), [quit_], [r])
            with pytest.raises(foreign_nginx.ProtocolViolation, match="1 desc"):
                await foreign_nginx.read_channel(b)


@pytest.mark.parametrize(
    ("wire", "nfds", "match"),
    [
        (struct.pack("!IH", 1, 2) + b"x", 1, "2 descriptors announced, 1 arrived"),
        (struct.pack("!IH", 1, 0) + b"x", 1, "no message claimed"),
        (struct.pack("!IH", 2**31, 0), 0, "over 1048576"),
    ],
    ids=["too-few-fds", "unclaimed-fds", "too-long"],
)
async def test_counted_read_message_refuses_a_broken_peer(
    wire: bytes, nfds: int, match: str
) -> None:
    a, b = stream_pair()
    async with a, b:
        with pipe() as (r, _):
            if nfds:
                socket.send_fds(raw(a), [wire], [r] * nfds)
            else:
                raw(a).sendall(wire)
        raw(a).shutdown(socket.SHUT_WR)
        reader = BufferedByteReceiveStream(b)

        async def read_all() -> None:
            while await foreign_counted.read_message(b, reader) is not None:
                pass

        with pytest.raises(foreign_counted.ProtocolViolation, match=match):
            await read_all()
        assert b.queued_fds == 0  # what it refused, it closed
