"""open_child_process and channel_from_env, with real child processes."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import anyio
import pytest

import aiofdpass
from aiofdpass import CHANNEL_FD_ENV, channel_from_env, open_child_process

from .helpers import backend_id, identity, pipe

pytestmark = pytest.mark.system

CHILD = str(Path(__file__).with_name("open_child_process_child.py"))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


@pytest.mark.anyio
async def test_child_gets_its_channel_and_echoes_descriptors(
    anyio_backend: object,
) -> None:
    with pipe() as (r, w):
        process, chan = await open_child_process(
            [sys.executable, CHILD, "echo", backend_id(anyio_backend)],
            env={**ENV, "EXTRA_FD": str(w)},
            pass_fds=[w],
        )
        async with process, chan:
            with anyio.fail_after(20):
                report = json.loads((await chan.receive()).data)
                # The child removed the variable and inherited the extra fd.
                assert report == {"env_var_left": False, "extra_fd_open": True}
                await chan.send(b"round trip", [r])
                with await chan.receive() as msg:
                    assert msg.data == b"round trip"
                    assert identity(msg.fds[0].fileno()) == identity(r)
                await chan.send_eof()
                # Only the child held the other end: its exit ends the stream.
                with pytest.raises(anyio.EndOfStream):
                    await chan.receive()
                assert await process.wait() == 0


@pytest.mark.anyio
async def test_channel_ends_when_child_exits(anyio_backend: object) -> None:
    process, chan = await open_child_process(
        [sys.executable, CHILD, "exit", backend_id(anyio_backend)], env=ENV
    )
    async with process, chan:
        with anyio.fail_after(20):
            with pytest.raises(anyio.EndOfStream):
                await chan.receive()
            assert await process.wait() == 3


@pytest.mark.anyio
async def test_program_that_cannot_start_leaks_nothing(
    anyio_backend: object, tmp_path: Path
) -> None:
    with pytest.raises(FileNotFoundError):
        await open_child_process([str(tmp_path / "no-such-program")])


def test_channel_from_env_without_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CHANNEL_FD_ENV, raising=False)
    with pytest.raises(LookupError, match="open_child_process"):
        channel_from_env()


@pytest.mark.parametrize("value", ["seven", "-1", ""])
def test_channel_from_env_rejects_a_bad_number(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(CHANNEL_FD_ENV, value)
    with pytest.raises(ValueError, match="not a descriptor number"):
        channel_from_env()


def test_channel_from_env_rejects_a_non_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pipe() as (r, _):
        monkeypatch.setenv(CHANNEL_FD_ENV, str(r))
        with pytest.raises(OSError, match="non-socket"):
            channel_from_env()
        os.fstat(r)  # still open: the caller owns it


def test_channel_from_env_adopts_and_clears(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = socket.socketpair()
    with a:
        monkeypatch.setenv("MY_FD", str(b.fileno()))
        chan = channel_from_env("MY_FD")
        b.detach()  # the channel owns the number now
        assert "MY_FD" not in os.environ
        assert isinstance(chan, aiofdpass.FdChannel)
        anyio.run(chan.aclose)
