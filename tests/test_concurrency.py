"""Many connections on one listener, all open at once, each passing fds."""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

import aiofdpass
from aiofdpass import FdChannel

from .helpers import identity, pipe, soft_fd_limit_at_least

pytestmark = pytest.mark.anyio

CONNECTIONS = 1000


@pytest.fixture
def enough_fds() -> Iterator[None]:
    """Raise the soft RLIMIT_NOFILE for the test if needed; restore it after.

    Each connection costs up to four descriptors here (both ends of the
    socket, and the descriptor each side received).
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * CONNECTIONS + 256
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.fail(f"this test needs RLIMIT_NOFILE {wanted}; the hard limit is {hard}")
    with soft_fd_limit_at_least(wanted):
        yield


@pytest.mark.usefixtures("enough_fds")
async def test_a_thousand_concurrent_connections_passing_fds(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    all_in = anyio.Event()
    connected = 0
    served: list[int] = []
    with pipe() as (r, w):
        ids = {"r": identity(r), "w": identity(w)}

        async def handler(chan: FdChannel) -> None:
            # Hold every connection open until all of them are in.
            with await chan.receive() as msg:
                assert identity(msg.fds[0].fileno()) == ids["r"]
                n = int(msg.data)
                await all_in.wait()
                await chan.send(b"ack %d" % n, [w])
            served.append(n)

        async def client(n: int) -> None:
            nonlocal connected
            async with await aiofdpass.connect(path) as chan:
                await chan.send(b"%d" % n, [r])
                connected += 1
                if connected == CONNECTIONS:
                    all_in.set()
                with await chan.receive() as reply:
                    assert reply.data == b"ack %d" % n
                    assert identity(reply.fds[0].fileno()) == ids["w"]
                with pytest.raises(anyio.EndOfStream):
                    await chan.receive()

        async with (
            await aiofdpass.listen(path, allow=aiofdpass.same_user()) as listener,
            anyio.create_task_group() as server,
        ):
            server.start_soon(listener.serve, handler)
            with anyio.fail_after(60):
                async with anyio.create_task_group() as clients:
                    for n in range(CONNECTIONS):
                        clients.start_soon(client, n)
            server.cancel_scope.cancel()
    assert sorted(served) == list(range(CONNECTIONS))
    assert connected == CONNECTIONS
