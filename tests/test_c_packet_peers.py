"""Packet sockets against peers in C: no header, the kernel's boundaries frame.

``examples/c_peer/seqpacket_peer.c`` talks to a SEQPACKET channel, and
``examples/c_peer/apue_client.c`` (APUE's ``recv_fd`` over SOCK_DGRAM) asks
``examples/device_broker_dgram.py`` for a device. Both are built here with
the system C compiler.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import pytest

import aiofdpass

from .helpers import backend_id, identity, pipe
from .test_c_peer import TIMEOUT, build_c

pytestmark = [pytest.mark.anyio, pytest.mark.system]

C_PEERS = Path(__file__).parent.parent / "examples" / "c_peer"
BROKER = Path(__file__).parent.parent / "examples" / "device_broker_dgram.py"


@pytest.fixture(scope="session")
def seqpacket_peer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(
        C_PEERS / "seqpacket_peer.c",
        tmp_path_factory.mktemp("c_peer") / "seqpacket_peer",
    )


@pytest.fixture(scope="session")
def apue_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_c(
        C_PEERS / "apue_client.c", tmp_path_factory.mktemp("c_peer") / "apue_client"
    )


async def test_c_seqpacket_peer(seqpacket_peer: Path, tmp_path: Path) -> None:
    big = os.urandom(200_000)  # one packet: under SO_SNDBUF less 32
    output: list[str] = []

    async def peer() -> None:
        # A relative path: sun_path holds 107 bytes, pytest's paths are deep.
        result = await anyio.run_process(
            [str(seqpacket_peer), "s.sock"], cwd=tmp_path, check=False
        )
        assert result.returncode == 0, result.stderr.decode()
        output.extend(result.stdout.decode().splitlines())

    with anyio.fail_after(TIMEOUT), pipe() as (r, w):
        async with (
            await aiofdpass.listen(tmp_path / "s.sock", kind="seqpacket") as listener,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(peer)
            async with await listener.accept() as chan:
                # The C peer's own packets: an empty one, then a pipe.
                assert (await chan.receive()).data == b""
                with await chan.receive() as msg:
                    assert msg.data == b"pipe"
                    assert os.read(msg.fds[0].fileno(), 100) == (
                        b"from C through a pipe\n"
                    )
                sent = [
                    (b"one", [r]),
                    (b"", []),
                    (b"", [w]),
                    (big, [r, w]),
                    (b"many", [r] * 253),
                ]
                for data, fds in sent:
                    await chan.send(data, fds)
                for data, fds in sent:
                    with await chan.receive() as echo:
                        assert echo.data == data
                        assert [identity(fd.fileno()) for fd in echo.fds] == [
                            identity(fd) for fd in fds
                        ]
                await chan.send_eof()
    assert output == [
        "packet 0: 3 bytes, 1 fds",
        "packet 1: 0 bytes, 0 fds",
        "packet 2: 0 bytes, 1 fds",
        "packet 3: 200000 bytes, 2 fds",
        "packet 4: 4 bytes, 253 fds",
        "end of stream after 5 packets",
    ]


async def test_apue_client_against_the_datagram_broker(
    apue_client: Path, tmp_path: Path, anyio_backend: object
) -> None:
    command = [sys.executable, str(BROKER), "--serve", "broker.sock"]
    command += ["--backend", backend_id(anyio_backend)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    with anyio.fail_after(TIMEOUT):
        async with await anyio.open_process(command, cwd=tmp_path, env=env) as broker:
            assert broker.stdout is not None
            said = b""
            while b"listening on" not in said:
                said += await broker.stdout.receive()
            results = {}
            for device in ("ttyS0", "ttyS1", "nope"):
                result = await anyio.run_process(
                    [str(apue_client), "broker.sock", device], cwd=tmp_path, check=False
                )
                results[device] = (result.returncode, result.stdout.decode())
            broker.terminate()
    uid = os.getuid()
    assert results == {
        "ttyS0": (
            0,
            "ttyS0: GRANTED, the device says: ttyS0 instrument, serial 0042\n",
        ),
        "ttyS1": (
            2,
            f"ttyS1: REFUSED, status 13 (Permission denied): uid {uid} may not "
            "use ttyS1\n",
        ),
        "nope": (
            2,
            "nope: REFUSED, status 2 (No such file or directory): no device "
            "named 'nope'\n",
        ),
    }
    assert os.listdir(tmp_path) == ["broker.sock"]  # the clients removed theirs
