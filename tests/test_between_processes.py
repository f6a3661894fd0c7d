"""Descriptors between real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from anyio.abc import Process

import aiofdpass
from aiofdpass import FdChannel, ProtocolError

from .helpers import backend_id, pipe

pytestmark = [pytest.mark.anyio, pytest.mark.system]

CHILD = str(Path(__file__).with_name("between_processes_child.py"))


async def spawn(mode: str, backend: str) -> tuple[FdChannel, Process]:
    """Start the child with one end of a channel pair; return the other."""
    ours, theirs = aiofdpass.channel_pair()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        proc = await anyio.open_process(
            [sys.executable, CHILD, mode, str(theirs.fileno()), backend],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
    finally:
        await theirs.aclose()
    return ours, proc


async def finish(proc: Process) -> str:
    assert proc.stdout is not None
    with anyio.fail_after(20):
        out = b"".join([chunk async for chunk in proc.stdout])
        await proc.wait()
    await proc.aclose()
    return out.decode()


async def test_pipe_file_socket_memfd_cross_a_process(anyio_backend: object) -> None:
    chan, proc = await spawn("send-kinds", backend_id(anyio_backend))
    async with chan:
        with await chan.receive() as msg:
            assert msg.data == b"kinds"
            r, f, s, m = msg.fds
            assert os.read(r.fileno(), 100) == b"pipe-data"
            with f.to_file("rb") as file:
                assert file.read() == b"file-data"
            with s.to_socket() as sock:
                sock.sendall(b"ping")
                assert sock.recv(4) == b"pong"
            assert os.pread(m.fileno(), 100, 0) == b"memfd-data"
        with pytest.raises(anyio.EndOfStream):
            await chan.receive()
    await finish(proc)
    assert proc.returncode == 0


async def test_child_at_its_fd_limit_sees_descriptors_lost(
    anyio_backend: object,
) -> None:
    chan, proc = await spawn("fd-limit", backend_id(anyio_backend))
    async with chan:
        assert (await chan.receive()).data == b"ready"
        with pipe() as (r, _):
            await chan.send(b"many", [r] * 40)
        out = await finish(proc)
    assert proc.returncode == 0, out
    assert out.split("\n")[:2] == ["lost", "still-works 1"]


async def test_peer_killed_mid_record(anyio_backend: object) -> None:
    chan, proc = await spawn("die", backend_id(anyio_backend))
    async with chan:
        with pytest.raises(ProtocolError, match="middle of a record"):
            await chan.receive()
    await finish(proc)
    assert proc.returncode == -9


async def test_sender_over_its_in_flight_limit_gets_limit_error(
    anyio_backend: object,
) -> None:
    # The child sends 40-fd records with RLIMIT_NOFILE 64 and no
    # capabilities, while we do not receive: the kernel refuses the third
    # with ETOOMANYREFS. Nothing of that record is on the wire: we get the
    # complete earlier records, then the child's report, then (after we
    # drained, so nothing is in flight) a record on the same channel.
    chan, proc = await spawn("too-many-refs", backend_id(anyio_backend))
    assert proc.stdout is not None
    async with chan:
        with anyio.fail_after(20):
            first_line = await proc.stdout.receive()  # the child hit the limit
            batches = 0
            while (msg := await chan.receive()).data == b"batch":
                assert len(msg.fds) == 40
                msg.close()
                batches += 1
            report = msg.data.decode()
        # Usually 2 fit under the limit; fewer when other processes of this
        # user have descriptors in flight (the limit counts per user). Every
        # send that returned arrived whole, the refused one not at all.
        assert batches <= 2
        assert report == f"refused after {batches}"
        await chan.send(b"drained")
        with await chan.receive() as after:
            assert after.data == b"after" and len(after.fds) == 2
        with pytest.raises(anyio.EndOfStream):
            await chan.receive()
    out = first_line.decode() + await finish(proc)
    assert proc.returncode == 0, out
    assert "ETOOMANYREFS" in out and "Nothing was sent" in out


async def test_queued_records_wait_out_etoomanyrefs(anyio_backend: object) -> None:
    # The child queues 16 records of 16 fds while 253 of its fds are in
    # flight and its limit is 300: the flush meets ETOOMANYREFS. That is
    # backpressure, not an error: every record arrives once we receive.
    chan, proc = await spawn("too-many-refs-queued", backend_id(anyio_backend))
    assert proc.stdout is not None
    async with chan:
        with anyio.fail_after(20):
            assert (await proc.stdout.receive()).startswith(b"queued")
            got = []
            async for msg in chan:
                with msg:
                    got.append((msg.data, len(msg.fds)))
    await finish(proc)
    assert proc.returncode == 0
    assert got[0] == (b"big", 253)
    isolated = [g for g in got if g[0].startswith(b"iso")]
    assert isolated == [(b"iso%d" % i, 16) for i in range(4)]
    assert got[1:9] == [g for i in range(4) for g in (isolated[i], (b"n", 0))]
    smalls = [g for g in got if g[0].startswith(b"small")]
    assert smalls == [(b"small%d" % i, 16) for i in range(16)]


async def test_children_do_not_inherit_received_fds() -> None:
    a, b = aiofdpass.channel_pair()
    with pipe() as (r, _):
        async with a, b:
            await a.send(b"x", [r])
            with await b.receive() as msg:
                fd = msg.fds[0].fileno()
                # close_fds=False: only close-on-exec can keep it out.
                result = await anyio.to_thread.run_sync(
                    lambda: subprocess.run(
                        [sys.executable, "-c", f"import os; os.fstat({fd})"],
                        close_fds=False,
                        capture_output=True,
                        check=False,
                    )
                )
                assert result.returncode == 1
                assert b"Bad file descriptor" in result.stderr
