"""Prefork server: a master accepts TCP connections and hands each one to a worker.

The master listens on 127.0.0.1, accepts, and gives each connection, with
its metadata, to a :class:`aiofdpass.prefork.WorkerPool`: the least loaded
of N worker processes gets the socket over its channel. A worker answers
every line a client sends with ``"<its pid> <the line>"`` (``serve_lines``
below is all the code a worker runs).

Nothing is lost when a worker dies: the pool keeps its copy of every socket
until the worker acknowledges it, and re-dispatches the ones a dead worker
never took. The self-test shows it: it freezes a worker, queues connections
to it, kills it with SIGKILL, and every connection is answered by another.

    python examples/prefork_server.py               # serve until Ctrl-C
    python examples/prefork_server.py --self-test   # 200 connections, a killed worker

Every mode takes ``--backend asyncio|uvloop|trio`` and ``--workers N``.
``examples/prefork_http.py`` is the same pattern for HTTP, and
``bench/prefork_wrk.py`` measures it with ``wrk``.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

import anyio
from anyio.abc import SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

from aiofdpass.prefork import WorkerPool, WorkerStatistics, serve_tcp

from _common import argument_parser, run, say

TARGET = "prefork_server:serve_lines"  # the workers import this module
STREAM_ERRORS = (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError)


async def serve_lines(stream: SocketStream, meta: dict[str, Any]) -> None:
    """Answer each line with ``"<pid> <line>"`` (what a worker runs per connection)."""
    lines = BufferedByteReceiveStream(stream)
    prefix = f"{os.getpid()} ".encode()
    try:
        while True:
            line = await lines.receive_until(b"\n", 4096)
            await stream.send(prefix + line + b"\n")
    except STREAM_ERRORS:
        pass  # the client went away


async def serve_forever(workers: int) -> None:
    """Run the whole server: the master's accept loop and the pool, in one call."""
    async with anyio.create_task_group() as tg:
        host, port = await tg.start(
            lambda task_status: serve_tcp(
                "127.0.0.1", 0, TARGET, workers=workers, task_status=task_status
            )
        )
        say("master", f"listening on {host}:{port}; try: nc {host} {port}")
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                say("master", "stopping: the workers finish their connections")
                tg.cancel_scope.cancel()


# -- the self-test ----------------------------------------------------------------


async def ask(port: int, line: str) -> str:
    """Connect, send one line, return the answer (``"<pid> <line>"``)."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(f"{line}\n".encode())
        return (
            await BufferedByteReceiveStream(stream).receive_until(b"\n", 4096)
        ).decode()


async def accept_into(listener: socket.socket, pool: WorkerPool) -> None:
    """Accept and dispatch, written out (``serve_tcp`` runs the same loop)."""
    while True:
        await anyio.wait_readable(listener)
        sock, (host, port) = listener.accept()
        await pool.dispatch(sock, {"client": f"{host}:{port}"}, close=True)


def worker_0_first(
    workers: Sequence[WorkerStatistics], key: object, meta: object
) -> int:
    """Route to worker 0 while it is up, else to the least loaded of the others."""
    if workers[0].index == 0:
        return 0
    return min(workers, key=lambda w: w.in_flight).index


async def self_test(args: Any) -> bool:
    """Serve 200 connections, then kill a worker with connections queued to it."""
    failures = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        port = listener.getsockname()[1]
        pool = WorkerPool(TARGET, workers=args.workers, route=worker_0_first)
        async with pool, anyio.create_task_group() as tg:
            tg.start_soon(accept_into, listener, pool)
            with anyio.fail_after(60):
                answers = [await ask(port, f"hello {i}") for i in range(200)]
                ok = sum(a.endswith(f" hello {i}") for i, a in enumerate(answers))
                say("self-test", f"{ok}/200 connections answered")
                failures += [] if ok == 200 else [f"{ok}/200 answered"]

                # Freeze worker 0 so that it cannot take what it is sent ...
                victim = pool.statistics().workers[0].pid
                assert victim is not None
                os.kill(victim, signal.SIGSTOP)
                await anyio.to_thread.run_sync(
                    os.waitid, os.P_PID, victim, os.WSTOPPED | os.WNOWAIT
                )
                in_flight: list[str] = []
                async with anyio.create_task_group() as clients:
                    for i in range(4):
                        clients.start_soon(collect, port, i, in_flight)
                    while pool.statistics().workers[0].pending < 4:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                    # ... then kill it: its four connections go to another worker.
                    say(
                        "self-test",
                        f"SIGKILL to worker {victim}, which has 4 "
                        "connections queued that it never took",
                    )
                    os.kill(victim, signal.SIGKILL)
            others = all(a.split()[0] != str(victim) for a in in_flight)
            say(
                "self-test",
                f"{len(in_flight)}/4 in-flight connections answered, "
                f"none by the killed worker: {others}; "
                f"{pool.statistics().redispatched} re-dispatched",
            )
            if len(in_flight) != 4 or not others:
                failures.append(f"in-flight answers: {in_flight}")
            tg.cancel_scope.cancel()
    verdict = "FAIL" if failures else "PASS"
    print(
        f"prefork_server self-test: {verdict}: 200 connections to {args.workers} "
        f"workers and a worker killed with 4 connections queued ({args.backend})"
    )
    return not failures


async def collect(port: int, i: int, answers: list[str]) -> None:
    """Ask one line and keep the answer."""
    answers.append(await ask(port, f"in flight {i}"))


def main() -> None:
    """Parse the command line and run the chosen mode."""
    parser = argument_parser(__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--self-test", action="store_true", help="run the checks")
    args = parser.parse_args()
    # The pool logs what it does about dead workers (and the self-test kills one).
    logging.basicConfig(
        level=logging.INFO, format="[master] %(message)s", stream=sys.stdout
    )
    if args.self_test:
        sys.exit(0 if run(self_test, args, backend=args.backend) else 1)
    run(serve_forever, args.workers, backend=args.backend)


if __name__ == "__main__":
    main()
