"""aiofdpass.prefork: worker pools with real processes and real TCP on loopback.

The master (this process) runs on every backend; its workers run on the
same one. No test steers behaviour with time: a worker that must not take
its connections is stopped (SIGSTOP, and ``waitid`` says when it is) before
they are sent to it.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import socket
import struct
import sys
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from aiofdpass import LimitError, open_child_process
from aiofdpass.prefork import (
    PoolStatistics,
    Route,
    WorkerPool,
    WorkerStartError,
    WorkerStatistics,
    serve_tcp,
)

from .helpers import backend_id, copies_of, soft_fd_limit_at_least

pytestmark = [pytest.mark.system, pytest.mark.anyio]

TARGET = "tests.prefork_child:lines"
MASTER = str(Path(__file__).with_name("prefork_child.py"))
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


class Client:
    """A TCP client of the pool, reading answers line by line."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.lines = BufferedByteReceiveStream(stream)

    async def ask(self, line: str) -> tuple[int, str]:
        """Send a line; return the answering worker's pid and the echoed line."""
        await self.stream.send(line.encode() + b"\n")
        pid, _, echoed = (await self.lines.receive_until(b"\n", 4096)).partition(b" ")
        return int(pid), echoed.decode()

    async def closed_by_server(self) -> bool:
        """Whether the server closed the connection (EOF or reset)."""
        try:
            return await self.stream.receive() == b""
        except (anyio.EndOfStream, anyio.BrokenResourceError):
            return True


@asynccontextmanager
async def tcp_listener() -> AsyncIterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        yield listener


async def connect(
    listener: socket.socket,
    pool: WorkerPool,
    *,
    key: object = None,
    meta: dict[str, object] | None = None,
) -> Client:
    """Open a TCP connection and dispatch its server side; return the client."""
    stream = await anyio.connect_tcp(*listener.getsockname()[:2])
    sock, _ = listener.accept()  # the connection is queued: this does not block
    with sock:
        try:
            await pool.dispatch(sock, meta, key=key)
        except BaseException:
            await stream.aclose()
            raise
    return Client(stream)


async def until(pool: WorkerPool, done: Callable[[PoolStatistics], bool]) -> None:
    """Wait for the master to have processed the workers' reports."""
    while not done(pool.statistics()):  # noqa: ASYNC110 (polling a counter)
        await anyio.sleep(0.01)


def pids(pool: WorkerPool) -> list[int]:
    return [w.pid for w in pool.statistics().workers if w.pid is not None]


async def stop_and_confirm(pid: int) -> None:
    """SIGSTOP a worker (our child) and wait until the kernel says it is stopped."""
    os.kill(pid, signal.SIGSTOP)
    await stopped(pid)


async def stopped(pid: int) -> None:
    """Wait until the kernel says that our child ``pid`` is stopped."""
    flags = os.WSTOPPED | os.WNOWAIT
    await anyio.to_thread.run_sync(os.waitid, os.P_PID, pid, flags)


async def test_dispatch_ack_and_serve(anyio_backend: object) -> None:
    async with tcp_listener() as listener, WorkerPool(TARGET, workers=2) as pool:
        workers = pids(pool)
        assert len(workers) == 2
        with anyio.fail_after(30):
            clients = [await connect(listener, pool, meta={"n": n}) for n in range(4)]
            seen = set()
            for n, client in enumerate(clients):
                pid, echoed = await client.ask("meta")
                assert pid in workers
                assert json.loads(echoed) == {"n": n}
                seen.add(pid)
            # Least loaded: four open connections are spread over both.
            assert seen == set(workers)
            # Answered, but the "taken" reports may still be on their way:
            # in_flight == 4 alone would not wait for them.
            await until(pool, lambda s: [w.active for w in s.workers] == [2, 2])
            stats = pool.statistics()
            # Every worker acknowledged: the master holds no copies any more.
            assert [w.pending for w in stats.workers] == [0, 0]
            assert [w.active for w in stats.workers] == [2, 2]
            for client in clients:
                await client.stream.aclose()
            await until(pool, lambda s: s.served == 4)
        stats = pool.statistics()
        assert (stats.dispatched, stats.redispatched, stats.closed) == (4, 0, 0)
        assert [w.restarts for w in stats.workers] == [0, 0]


async def test_master_keeps_a_copy_until_acknowledged(anyio_backend: object) -> None:
    async with tcp_listener() as listener, WorkerPool(TARGET, workers=1) as pool:
        with anyio.fail_after(30):
            await stop_and_confirm(pids(pool)[0])
            stream = await anyio.connect_tcp(*listener.getsockname()[:2])
            sock, _ = listener.accept()
            with sock:
                await pool.dispatch(sock)
                # Ours, and the pool's own until the worker takes it.
                assert copies_of(sock.fileno()) == 2
                assert pool.statistics().workers[0].pending == 1
                os.kill(pids(pool)[0], signal.SIGCONT)
                await until(pool, lambda s: s.workers[0].active == 1)
                assert copies_of(sock.fileno()) == 1
            async with stream:
                await Client(stream).ask("hello")


async def test_key_affinity(anyio_backend: object) -> None:
    async with tcp_listener() as listener, WorkerPool(TARGET, workers=3) as pool:
        with anyio.fail_after(30):
            answered: dict[str, set[int]] = {}
            for key in ["alice", "bob", "carol", "dave"] * 3:
                client = await connect(listener, pool, key=key)
                async with client.stream:
                    pid, _ = await client.ask(key)
                answered.setdefault(key, set()).add(pid)
        assert all(len(p) == 1 for p in answered.values()), answered


async def test_sigkill_with_connections_queued(anyio_backend: object) -> None:
    def to_worker_0(
        workers: Sequence[WorkerStatistics], key: object, meta: object
    ) -> int:
        return 0 if workers[0].index == 0 else workers[0].index

    async with (
        tcp_listener() as listener,
        WorkerPool(TARGET, workers=2, route=to_worker_0) as pool,
    ):
        with anyio.fail_after(30):
            victim = pids(pool)[0]
            await stop_and_confirm(victim)  # it can take nothing from now on
            clients = [await connect(listener, pool) for _ in range(3)]
            assert pool.statistics().workers[0].pending == 3
            os.kill(victim, signal.SIGKILL)
            for n, client in enumerate(clients):
                async with client.stream:
                    pid, echoed = await client.ask(f"queued {n}")
                assert pid != victim
                assert echoed == f"queued {n}"
            stats = pool.statistics()
            assert (stats.redispatched, stats.closed) == (3, 0)
            await until(pool, lambda s: s.workers[0].restarts == 1)


async def test_sigkill_with_no_worker_left_closes_and_logs(
    anyio_backend: object, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        tcp_listener() as listener,
        WorkerPool(TARGET, workers=1, restart=False) as pool,
    ):
        with anyio.fail_after(30):
            victim = pids(pool)[0]
            await stop_and_confirm(victim)
            clients = [await connect(listener, pool) for _ in range(2)]
            os.kill(victim, signal.SIGKILL)
            for client in clients:
                async with client.stream:
                    assert await client.closed_by_server()
            assert pool.statistics().closed == 2
            with pytest.raises(anyio.ClosedResourceError):
                await connect(listener, pool)
    assert caplog.text.count("unserved: no worker is running") == 2
    assert f"(pid {victim}) exited with status -9" in caplog.text


async def test_restart_with_backoff(anyio_backend: object) -> None:
    async with (
        tcp_listener() as listener,
        WorkerPool(TARGET, workers=1, backoff=0.01, max_backoff=0.02) as pool,
    ):
        with anyio.fail_after(30):
            crashed = set()
            for _ in range(4):  # each connection kills the worker that takes it
                client = await connect(listener, pool)
                async with client.stream:
                    await client.stream.send(b"exit\n")
                    assert await client.closed_by_server()
                await until(
                    pool, lambda s: s.waiting == 0 and s.workers[0].pid not in crashed
                )
                crashed.add(pool.statistics().workers[0].pid)
            await until(pool, lambda s: s.workers[0].restarts == 4)
            worker = pool.statistics().workers[0]
            assert worker.failures == 4
            assert worker.restart_delays == (0.0, 0.01, 0.02, 0.02)
            # A connection served to its end ends the crash loop.
            client = await connect(listener, pool)
            async with client.stream:
                await client.ask("alive")
            await until(pool, lambda s: s.served == 1)
            assert pool.statistics().workers[0].failures == 0


async def test_graceful_stop_finishes_connections_in_flight(
    anyio_backend: object,
) -> None:
    async with tcp_listener() as listener, WorkerPool(TARGET, workers=1) as pool:
        with anyio.fail_after(30):
            client = await connect(listener, pool)
            pid, _ = await client.ask("before stop")
            async with anyio.create_task_group() as tg:
                tg.start_soon(pool.stop, 60)
                # The connection in flight is still served, to its end.
                assert await client.ask("during stop") == (pid, "during stop")
                await client.stream.aclose()
            # stop() returned: the worker finished and exited.
            assert pool.statistics().served == 1
            assert pool.statistics().workers[0].pid is None
            with pytest.raises(anyio.ClosedResourceError, match="still yours"):
                await connect(listener, pool)


async def test_stop_cancels_connections_after_drain_timeout(
    anyio_backend: object,
) -> None:
    async with tcp_listener() as listener, WorkerPool(TARGET, workers=1) as pool:
        with anyio.fail_after(30):
            client = await connect(listener, pool)
            await client.ask("idle from now on")
            await pool.stop(drain_timeout=0)
            async with client.stream:
                assert await client.closed_by_server()


async def test_handler_that_raises_is_logged_and_the_worker_lives_on(
    anyio_backend: object, caplog: pytest.LogCaptureFixture
) -> None:
    async with tcp_listener() as listener, WorkerPool(TARGET, workers=1) as pool:
        with anyio.fail_after(30):
            client = await connect(listener, pool)
            pid, _ = await client.ask("first")
            async with client.stream:
                await client.stream.send(b"raise\n")
                assert await client.closed_by_server()
            client = await connect(listener, pool)
            async with client.stream:
                assert await client.ask("second") == (pid, "second")
            await until(pool, lambda s: s.served == 2)
        worker = pool.statistics().workers[0]
        assert (worker.errors, worker.restarts) == (1, 0)
    assert "the handler failed on connection 1: ValueError('asked to raise')" in (
        caplog.text
    )


async def test_master_killed_workers_exit(anyio_backend: object) -> None:
    process, channel = await open_child_process(
        [sys.executable, MASTER, backend_id(anyio_backend)], env=ENV
    )
    async with process, channel, tcp_listener() as listener:
        with anyio.fail_after(30):
            workers = json.loads((await channel.receive()).data)["pids"]
            pidfds = [os.pidfd_open(pid) for pid in workers]
            try:
                stream = await anyio.connect_tcp(*listener.getsockname()[:2])
                sock, _ = listener.accept()
                with sock:
                    await channel.send(b"serve this", [sock])
                assert (await channel.receive()).data == b"dispatched"
                client = Client(stream)
                async with stream:
                    assert (await client.ask("hello"))[0] in workers
                    process.kill()
                    assert await process.wait() == -signal.SIGKILL
                    # Its workers see their channel end, close their
                    # connections and exit: no orphans.
                    assert await client.closed_by_server()
                    for pidfd in pidfds:
                        await anyio.wait_readable(pidfd)
            finally:
                for pidfd in pidfds:
                    os.close(pidfd)


def ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        # The master writes the peer's address into the record's JSON as it is.
        pytest.param(
            "::1",
            marks=pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback"),
        ),
    ],
)
async def test_serve_tcp(anyio_backend: object, address: str) -> None:
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(
                lambda task_status: serve_tcp(
                    address, 0, TARGET, workers=2, task_status=task_status
                )
            )
            assert host == address
            for _ in range(4):
                async with await anyio.connect_tcp(host, port) as stream:
                    _, echoed = await Client(stream).ask("meta")
                    peer = json.loads(echoed)["peer"]
                    local = stream.extra(anyio.abc.SocketAttribute.local_address)
                    assert peer == list(local[:2])
            tg.cancel_scope.cancel()


async def test_cancelling_the_master_drains_connections_in_flight(
    anyio_backend: object,
) -> None:
    pool = WorkerPool(TARGET, workers=1)
    master = anyio.CancelScope()

    async def run_master(
        listener: socket.socket, *, task_status: anyio.abc.TaskStatus[Client]
    ) -> None:
        with master:
            async with pool:
                task_status.started(await connect(listener, pool))
                await anyio.sleep_forever()

    with anyio.fail_after(30):
        async with tcp_listener() as listener, anyio.create_task_group() as tg:
            client = await tg.start(run_master, listener)
            async with client.stream:
                pid, _ = await client.ask("before")
                master.cancel()  # what Ctrl-C or SIGTERM handling does
                # The worker still serves the connection it has, to its end.
                assert await client.ask("while stopping") == (pid, "while stopping")
    # The master kept reading the worker's reports until it exited.
    assert pool.statistics().served == 1


async def test_a_target_that_does_not_import(anyio_backend: object) -> None:
    with anyio.fail_after(30):
        with pytest.raises(WorkerStartError, match="before it was ready"):
            async with WorkerPool("tests.no_such_module:handler", workers=2):
                pass  # pragma: no cover


async def test_bad_dispatch_loses_nothing(anyio_backend: object) -> None:
    def bad_route(
        workers: Sequence[WorkerStatistics], key: object, meta: object
    ) -> int:
        return 7

    async with (
        tcp_listener() as listener,
        WorkerPool(TARGET, workers=1, route=bad_route) as pool,
    ):
        stream = await anyio.connect_tcp(*listener.getsockname()[:2])
        sock, _ = listener.accept()
        async with stream:
            with sock:
                with pytest.raises(TypeError, match="JSON-able"):
                    await pool.dispatch(sock, {"not json": object()})
                with pytest.raises(ValueError, match="route returned 7"):
                    await pool.dispatch(sock, close=True)
                assert copies_of(sock.fileno()) == 1  # still the caller's
                assert not sock._closed  # type: ignore[attr-defined]
        assert pool.statistics().dispatched == 0


async def test_dispatch_of_a_closed_socket_or_with_meta_not_a_dict(
    anyio_backend: object,
) -> None:
    async with WorkerPool(TARGET, workers=1) as pool:
        a, b = socket.socketpair()
        with a, b:
            with pytest.raises(TypeError, match="meta must be a dict"):
                await pool.dispatch(b, ["not", "a", "dict"])  # type: ignore[arg-type]
            b.close()
            with pytest.raises(OSError, match="closed") as raised:
                await pool.dispatch(b)
            assert raised.value.errno == errno.EBADF
        assert pool.statistics().dispatched == 0


async def test_dispatch_before_entering(anyio_backend: object) -> None:
    pool = WorkerPool(TARGET, workers=1)
    a, b = socket.socketpair()
    with a, b, pytest.raises(anyio.ClosedResourceError, match="async with"):
        await pool.dispatch(a)


# -- attacks on the promises (issue 14's review) --------------------------------


async def reset_by_client(listener: socket.socket, pool: WorkerPool) -> None:
    """Dispatch a connection whose client resets it before the worker wraps it."""
    client = socket.create_connection(listener.getsockname()[:2])
    sock, _ = listener.accept()
    with sock:
        await pool.dispatch(sock)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()  # RST
        await anyio.wait_readable(sock)  # the reset arrived
        with pytest.raises(OSError, match="not connected"):
            sock.getpeername()  # what SocketStream.from_socket checks


async def test_a_connection_reset_before_the_worker_wraps_it(
    anyio_backend: object,
) -> None:
    # It used to crash the worker (anyio refuses to wrap an unconnected
    # socket) and every connection it was serving with it.
    async with tcp_listener() as listener, WorkerPool(TARGET, workers=1) as pool:
        with anyio.fail_after(30):
            client = await connect(listener, pool)
            async with client.stream:
                pid, _ = await client.ask("before")
                await stop_and_confirm(pid)
                await reset_by_client(listener, pool)
                os.kill(pid, signal.SIGCONT)
                await until(pool, lambda s: s.served == 1)
                assert await client.ask("after") == (pid, "after")
        worker = pool.statistics().workers[0]
        assert (worker.errors, worker.restarts) == (1, 0)


async def test_large_meta_is_refused(anyio_backend: object) -> None:
    # Over the channel's max_payload, it used to be taken for a dead
    # worker's channel: dispatch returned and the connection waited in the
    # pool until stop(). Over 64 KiB, a dispatch cancelled while the worker
    # was busy left the record half written, and the worker, taking the
    # broken channel for a dead master, dropped every connection it served.
    async with tcp_listener() as listener, WorkerPool(TARGET, workers=2) as pool:
        stream = await anyio.connect_tcp(*listener.getsockname()[:2])
        sock, _ = listener.accept()
        async with stream:
            with sock:
                for size in (2**16, 2**24):
                    with pytest.raises(LimitError, match="over the pool's limit"):
                        await pool.dispatch(sock, {"big": "x" * size}, close=True)
                assert copies_of(sock.fileno()) == 1  # still the caller's
        stats = pool.statistics()
        assert (stats.dispatched, stats.waiting, stats.closed) == (0, 0, 0)
        assert [w.restarts for w in stats.workers] == [0, 0]


def route_that_raises(fails: Callable[[int], bool]) -> Route:
    """Route to the first worker given, but raise on the calls ``fails`` picks."""
    calls = 0

    def route(workers: Sequence[WorkerStatistics], key: object, meta: object) -> int:
        nonlocal calls
        calls += 1
        if fails(calls):
            raise RuntimeError(f"route is broken on call {calls}")
        return workers[0].index

    return route


async def test_a_route_that_raises_on_re_dispatch(
    anyio_backend: object, caplog: pytest.LogCaptureFixture
) -> None:
    # A route that raises when a dead worker's connections are sent again
    # used to end that slot's supervisor: the pool failed and the
    # connection's copy leaked.
    route = route_that_raises(lambda call: call > 1)
    async with (
        tcp_listener() as listener,
        WorkerPool(TARGET, workers=2, route=route) as pool,
    ):
        with anyio.fail_after(30):
            victim, other = pids(pool)
            await stop_and_confirm(victim)
            client = await connect(listener, pool)
            os.kill(victim, signal.SIGKILL)
            async with client.stream:
                assert await client.ask("re-dispatched") == (other, "re-dispatched")
            assert pool.statistics().redispatched == 1
    assert "route raised RuntimeError('route is broken on call 2')" in caplog.text


async def test_leaving_after_a_cancelled_stop_still_stops_the_workers(
    anyio_backend: object, caplog: pytest.LogCaptureFixture
) -> None:
    # A stop() that was cancelled used to count as done: leaving the block
    # then waited for the workers with no deadline and no kill, forever for
    # one that does not exit (here stopped; in life a handler that ignores
    # cancellation or a blocked event loop).
    with anyio.fail_after(30):
        async with WorkerPool(TARGET, workers=1) as pool:
            stuck = pids(pool)[0]
            pidfd = os.pidfd_open(stuck)
            await stop_and_confirm(stuck)
            with anyio.CancelScope() as scope:
                scope.cancel()
                await pool.stop(drain_timeout=0)
        try:
            await anyio.wait_readable(pidfd)  # it exited
        finally:
            os.close(pidfd)
    assert f"(pid {stuck}) did not exit 0.0 s after stop: killing it" in caplog.text


@asynccontextmanager
async def starting_for_ever() -> AsyncIterator[WorkerPool]:
    """Enter, in a task, a pool whose one worker never finishes importing.

    Yields the pool once its worker process exists (the pool is starting);
    the start is cancelled when the block ends.
    """
    pool = WorkerPool("tests.prefork_stuck:handler", workers=1)
    entering = anyio.CancelScope()

    async def enter() -> None:
        with entering:
            async with pool:
                pytest.fail("the pool cannot start")  # pragma: no cover

    async with anyio.create_task_group() as tg:
        tg.start_soon(enter)
        try:
            await until(pool, lambda s: s.workers[0].pid is not None)
            yield pool
        finally:
            entering.cancel()


async def test_cancelling_the_start_kills_a_worker_stuck_importing(
    anyio_backend: object,
) -> None:
    # Cancelling `async with WorkerPool(...)` while a worker was still
    # importing its target used to wait (shielded) for that worker to exit:
    # forever, for an import that never finishes.
    with anyio.fail_after(30):
        async with starting_for_ever() as pool:
            stuck = pids(pool)[0]
            pidfd = os.pidfd_open(stuck)
            await stopped(stuck)
        try:
            await anyio.wait_readable(pidfd)  # killed and reaped
        finally:
            os.close(pidfd)


async def test_dispatching_what_is_not_a_stream_socket(anyio_backend: object) -> None:
    # A pipe used to crash the worker that got it (no socket to make of it),
    # then every worker it was re-dispatched to, in turn. A datagram socket
    # ends only its own connection in the worker.
    async with WorkerPool(TARGET, workers=2) as pool:
        r, w = os.pipe()
        try:
            with pytest.raises(TypeError, match="stream socket"):
                await pool.dispatch(r, close=True)
            os.fstat(r)  # still the caller's
        finally:
            os.close(r)
            os.close(w)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            with pytest.raises(TypeError, match="stream socket"):
                await pool.dispatch(udp)
            with anyio.fail_after(30):
                await pool.dispatch(udp.fileno())  # a number: the worker says no
                await until(pool, lambda s: s.served == 1)
        stats = pool.statistics()
        assert sum(w.errors for w in stats.workers) == 1
        assert [w.restarts for w in stats.workers] == [0, 0]


async def test_serve_tcp_survives_a_dispatch_that_raises(
    anyio_backend: object, caplog: pytest.LogCaptureFixture
) -> None:
    # A dispatch that raised (here the route; in life EMFILE for the pool's
    # copy) used to end serve_tcp, and leave the accepted socket open.
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            host, port = await tg.start(
                lambda task_status: serve_tcp(
                    "127.0.0.1",
                    0,
                    TARGET,
                    workers=1,
                    route=route_that_raises(lambda call: call == 1),
                    task_status=task_status,
                )
            )
            async with await anyio.connect_tcp(host, port) as stream:
                assert await Client(stream).closed_by_server()
            async with await anyio.connect_tcp(host, port) as stream:
                assert (await Client(stream).ask("next"))[1] == "next"
            tg.cancel_scope.cancel()
    assert "unserved: RuntimeError('route is broken on call 1')" in caplog.text


async def test_a_restarted_worker_gets_its_keys_back(anyio_backend: object) -> None:
    # Consistent hashing over slots: a restart moves no key for good.
    keys = [f"tenant {n}" for n in range(12)]

    async def owners(listener: socket.socket, pool: WorkerPool) -> dict[str, int]:
        slot_of = {w.pid: w.index for w in pool.statistics().workers}
        found = {}
        for key in keys:
            client = await connect(listener, pool, key=key)
            async with client.stream:
                pid, _ = await client.ask(key)
            found[key] = slot_of[pid]
        return found

    async with tcp_listener() as listener, WorkerPool(TARGET, workers=3) as pool:
        with anyio.fail_after(30):
            before = await owners(listener, pool)
            assert len(set(before.values())) > 1
            victim = pool.statistics().workers[before[keys[0]]]
            assert victim.pid is not None
            os.kill(victim.pid, signal.SIGKILL)
            await until(
                pool,
                lambda s: (
                    s.workers[victim.index].restarts == 1
                    and s.workers[victim.index].available
                ),
            )
            assert await owners(listener, pool) == before


# -- the master's own waits: full channels, waiting connections, dead workers --


@contextmanager
def room_for_descriptors(count: int) -> Iterator[None]:
    """Raise the soft RLIMIT_NOFILE (workers started inside inherit it) for
    ``count`` more descriptors; skip where the hard limit is too low."""
    wanted = count + 1000
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs RLIMIT_NOFILE {wanted}; the hard limit is {hard}")
    with soft_fd_limit_at_least(wanted):
        yield


def to_meta_worker(
    workers: Sequence[WorkerStatistics], key: object, meta: dict[str, object]
) -> int:
    """Route to worker ``meta["to"]`` while it can take one, else to the first."""
    indexes = [w.index for w in workers]
    wanted = meta.get("to")
    return wanted if isinstance(wanted, int) and wanted in indexes else indexes[0]


async def stop_and_fill(pool: WorkerPool, index: int) -> tuple[int, int]:
    """Stop worker ``index`` (SIGSTOP), then dispatch to it until its channel is full.

    Full: its queue holds as many descriptors as the channel takes before
    ``send`` waits, so the next dispatch to it waits. The pool routes with
    ``to_meta_worker``; the clients are closed at once (a handler that
    gets one later reads end of stream). Returns the worker's pid and how
    many connections were sent.
    """
    pid = pids(pool)[index]
    await stop_and_confirm(pid)
    channel = pool._workers[index].channel
    assert channel is not None
    full = channel._writer._fd_high_water
    count = 0
    while channel.statistics().fds_queued < full:
        client, server = socket.socketpair()
        with client, server:
            await pool.dispatch(server, {"to": index})
        count += 1
    return pid, count


async def test_stop_with_a_full_channel(
    anyio_backend: object, caplog: pytest.LogCaptureFixture
) -> None:
    # stop() used to send the stop records one by one before its deadline:
    # to a worker that takes nothing, with a full channel, it waited for
    # ever (and so did leaving the `async with` block).
    with room_for_descriptors(6000):
        async with WorkerPool(TARGET, workers=1, route=to_meta_worker) as pool:
            with anyio.fail_after(60):
                stuck, sent = await stop_and_fill(pool, 0)
                await pool.stop(drain_timeout=0)
            # Killed; what it had not taken was closed, each one logged.
            assert pool.statistics().closed == sent
    assert f"(pid {stuck}) did not exit 0.0 s after stop: killing it" in caplog.text
    assert caplog.text.count("unserved: its worker died while stopping") == sent


async def test_a_dispatch_while_the_pool_starts_is_refused(
    anyio_backend: object,
) -> None:
    # It used to be taken (to wait for a worker): cancelling the start then
    # left the pool's copy of the connection open, and nobody served it.
    with anyio.fail_after(30):
        async with starting_for_ever() as pool:
            a, b = socket.socketpair()
            with a, b, pytest.raises(anyio.ClosedResourceError, match="async with"):
                await pool.dispatch(b)


async def test_a_restarted_worker_gets_many_waiting_connections(
    anyio_backend: object, tmp_path: Path
) -> None:
    # The supervisor that reads a worker's reports used to send it every
    # waiting connection itself when it said "ready", reading none of its
    # reports meanwhile: with this many, the worker's queue of "taken" and
    # "done" reports filled up while the master waited for room to send it
    # more, and both waited for ever. (aiofdpass's own worker no longer
    # waits on its reports before it reads on; this one does, as the
    # protocol allows: tests/prefork_held.py.)
    count = 10_000
    hold = tmp_path / "hold"
    sent: list[object] = []

    def in_turn(
        workers: Sequence[WorkerStatistics], key: object, meta: dict[str, object]
    ) -> int:
        sent.append(meta["n"])
        return workers[0].index

    env = {**ENV, "PREFORK_HOLD_IF": str(hold), "PREFORK_ACK_INLINE": "1"}
    with room_for_descriptors(count):
        async with WorkerPool(
            "tests.prefork_held:numbered",
            workers=1,
            route=in_turn,
            env=env,
            drain_timeout=0,
        ) as pool:
            with anyio.fail_after(60):
                victim = pids(pool)[0]
                hold.touch()  # its successor stops itself before it is ready
                os.kill(victim, signal.SIGKILL)
                await until(pool, lambda s: s.workers[0].pid not in (None, victim))
                successor = pids(pool)[0]
                await stopped(successor)
                hold.unlink()
                for n in range(count):
                    client, server = socket.socketpair()
                    with client:  # what it wrote stays readable
                        client.sendall(b"%d\n" % n)
                    await pool.dispatch(server, {"n": n}, close=True)
                assert pool.statistics().waiting == count
                os.kill(successor, signal.SIGCONT)
                await until(pool, lambda s: s.served == count)
            stats = pool.statistics()
            # Each handler read the number its meta names: none lost, none
            # mixed up, and they went out in the order they came.
            assert (stats.waiting, stats.closed, stats.workers[0].errors) == (0, 0, 0)
            assert sent == list(range(count))


@asynccontextmanager
async def dispatch_waiting(
    pool: WorkerPool, index: int, sent: int
) -> AsyncIterator[socket.socket]:
    """Dispatch one more connection to worker ``index`` (full: it waits).

    Yields the client end once the dispatch waits; the block ends when the
    dispatch returned, and fails if it raised.
    """
    client, server = socket.socketpair()

    async def dispatch() -> None:
        with server:
            await pool.dispatch(server, {"to": index})

    with client:
        async with anyio.create_task_group() as tg:
            tg.start_soon(dispatch)
            # Its connection is pending; the queue is full: the send waits.
            await until(pool, lambda s: s.workers[index].pending == sent + 1)
            yield client


async def answer(client: socket.socket, line: bytes) -> tuple[int, bytes]:
    """Ask over a raw socket: return the answering worker's pid and the line."""
    client.sendall(line + b"\n")
    data = b""
    while not data.endswith(b"\n"):
        await anyio.wait_readable(client)
        data += client.recv(4096)
    pid, _, echoed = data[:-1].partition(b" ")
    return int(pid), echoed


async def test_a_dispatch_waiting_on_a_worker_that_dies(anyio_backend: object) -> None:
    # The worker's channel is full, so the dispatch waits; the worker dies:
    # the connection goes to another worker and dispatch returns.
    with room_for_descriptors(6000):
        async with WorkerPool(TARGET, workers=2, route=to_meta_worker) as pool:
            with anyio.fail_after(60):
                other = pids(pool)[1]
                victim, sent = await stop_and_fill(pool, 0)
                async with dispatch_waiting(pool, 0, sent) as client:
                    os.kill(victim, signal.SIGKILL)
                    pid, echoed = await answer(client, b"hello")
                    assert (pid, echoed) == (other, b"hello")
                await until(pool, lambda s: s.served == sent + 1)
            assert pool.statistics().closed == 0


async def test_a_dispatch_whose_connection_the_pool_took_back(
    anyio_backend: object,
) -> None:
    # The same, with the dead worker's supervisor first: it takes the
    # connection out of the worker's pending and sends it on before the
    # waiting send fails. That send used to find it gone (KeyError), and
    # dispatch closed the pool's copy that was sent on and raised. Whoever
    # takes a connection out of pending owns it: dispatch has succeeded.
    # (The channel wakes the waiting send first as it is, so the test does
    # the supervisor's part itself, in that order.)
    with room_for_descriptors(6000):
        async with WorkerPool(TARGET, workers=2, route=to_meta_worker) as pool:
            with anyio.fail_after(60):
                victim, sent = await stop_and_fill(pool, 0)
                async with dispatch_waiting(pool, 0, sent) as client:
                    dead = pool._workers[0]
                    dead.ready = False  # its channel ended, as far as we know
                    pool._on_death(dead, victim, -signal.SIGKILL)
                    os.kill(victim, signal.SIGKILL)
                    # By the other worker, or the victim's successor if
                    # that was ready before the queue came to it.
                    pid, echoed = await answer(client, b"hello")
                    assert pid != victim
                    assert echoed == b"hello"
                await until(pool, lambda s: s.served == sent + 1)
            stats = pool.statistics()
            assert (stats.dispatched, stats.redispatched) == (sent + 1, sent + 1)
            assert stats.closed == 0


async def test_a_dead_workers_slot_restarts_while_its_connections_wait(
    anyio_backend: object,
) -> None:
    # A dead worker's supervisor used to send the connections it had not
    # taken on itself, one by one, holding the rest meanwhile: while the
    # channel of the worker they went to was full, the slot was not
    # restarted. Now they wait in the pool's queue, which a task of the
    # pool sends on.
    with room_for_descriptors(6000):
        async with (
            tcp_listener() as listener,
            WorkerPool(TARGET, workers=2, route=to_meta_worker) as pool,
        ):
            with anyio.fail_after(60):
                busy, sent = await stop_and_fill(pool, 1)
                victim = pids(pool)[0]
                await stop_and_confirm(victim)
                orphan = await connect(listener, pool, meta={"to": 0})
                os.kill(victim, signal.SIGKILL)
                await until(
                    pool,
                    lambda s: s.workers[0].restarts == 1 and s.workers[0].available,
                )
                fresh = await connect(listener, pool, meta={"to": 0})
                async with fresh.stream:
                    pid, _ = await fresh.ask("fresh")
                assert pid not in (victim, busy)
                os.kill(busy, signal.SIGCONT)
                async with orphan.stream:
                    assert await orphan.ask("orphan") == (busy, "orphan")
                await until(pool, lambda s: s.served == sent + 2)
            assert pool.statistics().redispatched == 1
