"""aiofdpass.systemd: the notify socket, the fd store and socket activation.

Our own datagram socket plays systemd's notify socket; libsystemd's
``sd_pid_notify_with_fds`` and ``systemd-socket-activate`` are the real
peers where they are installed (``make test`` installs them through apt-get
where it can; otherwise those tests skip and say why).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import anyio
import pytest

import aiofdpass
import aiofdpass.systemd
from aiofdpass import PeerCredentials, create_datagram_socket
from aiofdpass.systemd import listen_fds, notify, store_fds

from .helpers import backend_id, copies_of, identity, pipe

pytestmark = pytest.mark.anyio

CHILD = Path(__file__).parent / "systemd_child.py"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def abstract(name: str) -> str:
    return f"\0aiofdpass-systemd-{os.getpid()}-{name}"


async def test_notify_without_notify_socket_sends_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert await notify("READY=1") is False
    with pipe() as (r, _):
        assert await store_fds([r], name="x") is False


async def test_notify_to_a_path_with_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    async with await create_datagram_socket("notify", pass_credentials=True) as sd:
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert await notify("READY=1", "STATUS=serving") is True
        message, _, credentials = await sd.receive()
        assert message.data == b"READY=1\nSTATUS=serving"
        assert credentials == PeerCredentials(os.getpid(), os.geteuid(), os.getegid())


async def test_store_fds_to_an_abstract_notify_socket(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with await create_datagram_socket(abstract("store")) as sd:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + abstract("store")[1:])
        with pipe() as (r, w):
            assert await store_fds([r, w], name="my-pipe") is True
            with (await sd.receive()).message as message:
                assert message.data == b"FDSTORE=1\nFDNAME=my-pipe"
                assert [identity(fd.fileno()) for fd in message.fds] == [
                    identity(r),
                    identity(w),
                ]


async def test_bad_input_is_refused_before_sending(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + abstract("nobody")[1:])
    with pytest.raises(ValueError, match="NAME=value"):
        await notify("READY")
    with pytest.raises(ValueError, match="NAME=value"):
        await notify("STATUS=two\nlines")
    with pipe() as (r, _):
        for name in ("", "a:b", "tab\there", "x" * 256):
            with pytest.raises(ValueError, match="invalid fd store name"):
                await store_fds([r], name=name)
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    with pytest.raises(ValueError, match="vsock"):
        await notify("READY=1")
    # A relative path is refused too (sd_notify takes '/' or '@' only),
    # and the caller keeps its descriptors.
    monkeypatch.setenv("NOTIFY_SOCKET", "run/notify")
    with pipe() as (r, _):
        before = copies_of(r)
        with pytest.raises(ValueError, match="neither a path"):
            await notify("READY=1", fds=[r])
        assert copies_of(r) == before
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + abstract("nobody")[1:])
    with pytest.raises(ConnectionRefusedError):
        await notify("READY=1")


def test_listen_fds_for_another_process_or_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert listen_fds() == []
    # Meant for our parent (systemd passed them to it): not ours to take.
    monkeypatch.setenv("LISTEN_PID", str(os.getppid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    assert listen_fds(unset_environment=False) == []
    assert os.environ["LISTEN_FDS"] == "2"
    assert listen_fds() == []
    assert "LISTEN_FDS" not in os.environ
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "two")
    with pytest.raises(ValueError, match="must be numbers"):
        listen_fds()


@pytest.mark.parametrize("count", ["-1", "-3", "1_0", " 1", "+1", "\u0663", ""])
def test_listen_fds_refuses_a_count_systemd_never_writes(
    monkeypatch: pytest.MonkeyPatch, count: str
) -> None:
    # int() takes all of these but the empty one; a negative count used to
    # give [] (sd_listen_fds refuses it), "1_0" ten descriptors. Refused
    # before any descriptor is touched. An empty one is "nothing passed".
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", count)
    if not count:
        assert listen_fds() == []
        return
    with pytest.raises(ValueError, match="must be numbers"):
        listen_fds()
    assert "LISTEN_FDS" not in os.environ  # a second call is not a second owner
    assert listen_fds() == []


def libsystemd_or_skip() -> None:
    try:
        ctypes.CDLL("libsystemd.so.0")
    except OSError:
        pytest.skip(
            "libsystemd.so.0 is not installed (Debian: apt-get install "
            "libsystemd0; `make test` installs it where it can)"
        )


@pytest.mark.system
async def test_libsystemd_sd_pid_notify_with_fds_is_received(
    tmp_path: Path,
) -> None:
    libsystemd_or_skip()
    path = str(tmp_path / "notify")
    async with await create_datagram_socket(path, pass_credentials=True) as sd:
        result = await anyio.run_process(
            [sys.executable, CHILD, "libsystemd"],
            env={**ENV, "NOTIFY_SOCKET": path},
        )
        assert int(result.stdout) > 0  # sd_pid_notify_with_fds succeeded
        message, _, credentials = await sd.receive()
        with message:
            assert message.data == b"FDSTORE=1\nFDNAME=from-libsystemd"
            assert credentials is not None
            assert credentials.uid == os.geteuid()
            (fd,) = message.fds
            assert os.read(fd.fileno(), 100) == b"stored by libsystemd"


@pytest.mark.system
async def test_socket_activated_child_reads_its_socket_with_listen_fds(
    tmp_path: Path, anyio_backend: object
) -> None:
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip(
            "systemd-socket-activate is not installed (Debian package "
            "systemd; `make test` installs it where it can)"
        )
    path = tmp_path / "activated.sock"
    command = [
        activate,
        "--seqpacket",
        "--listen",
        str(path),
        "--fdname=web",
        f"--setenv=PYTHONPATH={ENV['PYTHONPATH']}",
        sys.executable,
        str(CHILD),
        "activated",
        backend_id(anyio_backend),
    ]
    async with await anyio.open_process(command, stdout=None) as proc:
        assert proc.stderr is not None
        said = b""
        while b"Listening on" not in said:  # it binds, then says so
            said += await proc.stderr.receive()
        async with await aiofdpass.connect(path, kind="seqpacket") as chan:
            with await chan.receive() as message:
                report = json.loads(message.data)
                assert os.read(message.fds[0].fileno(), 100) == (
                    b"through the activated socket"
                )
        assert await proc.wait() == 0
    assert report == {
        "names": ["web"],
        "cloexec": [True],  # systemd-socket-activate passes it without
        "environment": [],  # unset for the children
        "again": 0,
        "type": int(socket.SOCK_SEQPACKET),
    }
