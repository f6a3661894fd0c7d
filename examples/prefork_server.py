"""Prefork server: a master accepts TCP connections and hands each one to a worker.

The master listens on 127.0.0.1 (an ephemeral port), accepts, and sends each
accepted socket with its metadata (client address, protocol name) to the
least loaded of N worker processes over an :class:`aiofdpass.FdChannel`. A
worker answers every line a client sends with ``"<its pid> <the line>"``.

Nothing is lost when a worker dies. The master keeps its copy of a socket
until the worker confirms it took it (``{"taken": id}``): if ``send`` raises,
the master still owns the socket and tries another worker; if the worker
dies with records it never read, the master still holds those sockets and
re-dispatches them to the restarted or another worker. Connections a worker
was already serving when it died are closed by the kernel; the master logs
how many.

    python examples/prefork_server.py               # serve until Ctrl-C
    python examples/prefork_server.py --load        # connections/s, vs one process
    python examples/prefork_server.py --self-test   # load, a killed worker, checks

Every mode takes ``--backend asyncio|uvloop|trio``, ``--workers N`` and
``--cpu-ms MS`` (CPU time the server burns per line, to model real work).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import Process, SocketStream
from anyio.streams.buffered import BufferedByteReceiveStream

import aiofdpass

from _common import argument_parser, run

PROTOCOL = "line/1"
STREAM_ERRORS = (
    OSError,
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
)


def log(who: str, text: str) -> None:
    """Print a line tagged with the process it comes from."""
    print(f"[{who} {os.getpid()}] {text}", flush=True)


async def serve_lines(sock: socket.socket, cpu_ms: float) -> None:
    """Serve the line protocol: answer each line with ``"<pid> <the line>"``."""
    async with await SocketStream.from_socket(sock) as stream:
        lines = BufferedByteReceiveStream(stream)
        prefix = f"{os.getpid()} ".encode()
        try:
            while True:
                line = await lines.receive_until(b"\n", 4096)
                burn_cpu(cpu_ms)
                await stream.send(prefix + line + b"\n")
        except STREAM_ERRORS:
            pass  # the client went away


def burn_cpu(ms: float) -> None:
    """Stand in for real work per request: keep the CPU busy for ``ms``."""
    end = time.process_time() + ms / 1000
    while time.process_time() < end:
        pass


# -- a worker process ----------------------------------------------------------


async def worker(cpu_ms: float) -> None:
    """Serve the connections the master sends, until it closes the channel."""
    async with aiofdpass.channel_from_env() as master, anyio.create_task_group() as tg:
        async for message in master:
            meta = json.loads(message.data)
            sock = message.fds[0].to_socket()  # ours now; the master may close its copy
            await master.send(json.dumps({"taken": meta["id"]}).encode())
            tg.start_soon(handle, master, sock, meta, cpu_ms)


async def handle(
    master: aiofdpass.FdChannel,
    sock: socket.socket,
    meta: dict[str, Any],
    cpu_ms: float,
) -> None:
    """Serve one connection, then tell the master it is done."""
    try:
        await serve_lines(sock, cpu_ms)
    finally:
        # If the master is gone, there is nobody to report to.
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await master.send(json.dumps({"done": meta["id"]}).encode())


# -- the master ----------------------------------------------------------------


@dataclass
class Worker:
    """The master's view of one worker process."""

    process: Process
    channel: aiofdpass.FdChannel
    pending: dict[int, tuple[socket.socket, dict[str, Any]]] = field(
        default_factory=dict
    )
    active: int = 0  # connections it took and is serving

    @property
    def load(self) -> int:
        """Connections sent to it and not finished."""
        return len(self.pending) + self.active


class Master:
    """Accept connections and hand them to workers; restart workers that die."""

    def __init__(self, backend: str, workers: int, cpu_ms: float = 0) -> None:
        self.worker_command = [sys.executable, __file__, "--role", "worker"]
        self.worker_command += ["--backend", backend, "--cpu-ms", str(cpu_ms)]
        self.workers: list[Worker | None] = [None] * workers
        self.restarts = 0
        self.redispatched = 0
        self.closed_unserved = 0
        self.stopping = False
        self.next_id = 0

    async def start_worker(self, index: int, tg: anyio.abc.TaskGroup) -> None:
        """Start worker ``index`` and the task that watches it."""
        # A session of its own: Ctrl-C reaches the master, which stops the workers.
        process, channel = await aiofdpass.open_child_process(
            self.worker_command, start_new_session=True
        )
        worker = self.workers[index] = Worker(process, channel)
        log("master", f"worker {index} started: pid {process.pid}")
        tg.start_soon(self.watch, index, worker, tg)

    async def watch(self, index: int, worker: Worker, tg: anyio.abc.TaskGroup) -> None:
        """Follow a worker's reports; when it dies, restart it and re-dispatch."""
        try:
            async for message in worker.channel:
                report = json.loads(message.data)
                if "taken" in report:
                    sock, _ = worker.pending.pop(report["taken"])
                    sock.close()  # the worker has its own copy now
                    worker.active += 1
                else:
                    worker.active -= 1  # {"done": id}
        except (anyio.BrokenResourceError, aiofdpass.FdPassError):
            pass  # treated like end of stream: the worker is gone
        code = await worker.process.wait()
        await worker.channel.aclose()
        await worker.process.aclose()
        self.workers[index] = None
        if self.stopping:
            return
        orphans = list(worker.pending.values())
        log(
            "master",
            f"worker {index} (pid {worker.process.pid}) died with status {code}: "
            f"{worker.active} connection(s) it was serving were closed by the kernel; "
            f"re-dispatching {len(orphans)} it had not taken yet",
        )
        self.restarts += 1
        await self.start_worker(index, tg)
        for sock, meta in orphans:
            self.redispatched += 1
            await self.dispatch(sock, meta)

    async def dispatch(self, sock: socket.socket, meta: dict[str, Any]) -> None:
        """Send ``sock`` to the least loaded worker; keep our copy until it is taken."""
        for _attempt in range(3):
            alive = [w for w in self.workers if w is not None]
            if not alive:
                break
            worker = min(alive, key=lambda w: w.load)
            worker.pending[meta["id"]] = (sock, meta)
            try:
                await worker.channel.send(json.dumps(meta).encode(), [sock])
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError) as exc:
                # send() raised, so we still own the socket: try another worker.
                del worker.pending[meta["id"]]
                pid = worker.process.pid
                log("master", f"connection {meta['id']}: worker {pid} failed: {exc!r}")
                await anyio.sleep(0.05)
        self.closed_unserved += 1
        reason = "no worker could take it"
        log(
            "master", f"closing connection {meta['id']} from {meta['client']}: {reason}"
        )
        sock.close()

    async def run(
        self,
        listener: socket.socket,
        *,
        task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Start the workers and accept connections until cancelled."""
        async with anyio.create_task_group() as tg:
            for index in range(len(self.workers)):
                await self.start_worker(index, tg)
            task_status.started()
            try:
                while True:
                    await anyio.wait_readable(listener)
                    try:
                        sock, (host, port) = listener.accept()
                    except BlockingIOError:
                        continue
                    self.next_id += 1
                    await self.dispatch(
                        sock,
                        {
                            "id": self.next_id,
                            "client": f"{host}:{port}",
                            "protocol": PROTOCOL,
                        },
                    )
            finally:
                with anyio.CancelScope(shield=True):
                    await self.stop()

    async def stop(self) -> None:
        """End the workers' channels: they finish their connections and exit."""
        self.stopping = True
        workers = [w for w in self.workers if w is not None]
        for worker in workers:
            await worker.channel.send_eof()
        for worker in workers:
            with anyio.move_on_after(10):
                await worker.process.wait()
            await worker.process.aclose()  # kills it if it is still running
            await worker.channel.aclose()


async def single_process(listener: socket.socket, cpu_ms: float = 0) -> None:
    """Serve the same protocol, accepted and served in one process (the comparison)."""
    async with anyio.create_task_group() as tg:
        while True:
            await anyio.wait_readable(listener)
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                continue
            tg.start_soon(serve_lines, sock, cpu_ms)


def tcp_listener() -> socket.socket:
    """Return a non-blocking TCP listener on 127.0.0.1, on a port the kernel picks."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(socket.SOMAXCONN)
    listener.setblocking(False)
    return listener


# -- the load generator (a process of its own) ---------------------------------


async def ask(port: int, line: str) -> str:
    """Connect, send one line, return the answer (``"<pid> <line>"``)."""
    async with await anyio.connect_tcp("127.0.0.1", port) as stream:
        await stream.send(f"{line}\n".encode())
        answer = await BufferedByteReceiveStream(stream).receive_until(b"\n", 4096)
    return answer.decode()


async def hammer(port: int, total: int, concurrency: int) -> dict[str, Any]:
    """Make ``total`` connections, ``concurrency`` at a time: one line each."""
    pids: Counter[str] = Counter()
    errors: list[str] = []
    numbers = iter(range(total))

    async def client() -> None:
        for i in numbers:  # shared by all the clients
            try:
                pid, _, echoed = (await ask(port, f"hello {i}")).partition(" ")
            except STREAM_ERRORS as exc:
                errors.append(f"connection {i}: {exc!r}")
                continue
            if echoed == f"hello {i}":
                pids[pid] += 1
            else:
                errors.append(f"connection {i}: wrong answer {echoed!r}")

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(concurrency):
            tg.start_soon(client)
    seconds = time.perf_counter() - start
    return {
        "ok": sum(pids.values()),
        "errors": errors,
        "seconds": seconds,
        "pids": pids,
    }


async def load_process(port: int, total: int, concurrency: int) -> None:
    """Run :func:`hammer` and send the result to the parent."""
    async with aiofdpass.channel_from_env() as parent:
        result = await hammer(port, total, concurrency)
        await parent.send(json.dumps(result).encode())


async def measure(
    name: str, args: argparse.Namespace, port: int, total: int
) -> dict[str, Any]:
    """Run the load generator in a child process against ``port``; print the result."""
    command = [sys.executable, __file__, "--role", "load", "--port", str(port)]
    command += ["--backend", args.backend, "--connections", str(total)]
    command += ["--concurrency", str(args.concurrency)]
    process, channel = await aiofdpass.open_child_process(command)
    async with process, channel:
        result: dict[str, Any] = json.loads((await channel.receive()).data)
    for error in result["errors"][:5]:
        log("load", f"error: {error}")
    rate = result["ok"] / result["seconds"]
    log(
        "load",
        f"{name}: {result['ok']}/{total} connections in {result['seconds']:.2f}s = "
        f"{rate:.0f} connections/s, {len(result['errors'])} errors; "
        f"per worker pid {result['pids']}",
    )
    return result


# -- the modes -----------------------------------------------------------------


async def serve_forever(args: argparse.Namespace) -> None:
    """Run the prefork server until Ctrl-C."""
    with tcp_listener() as listener:
        port = listener.getsockname()[1]
        log("master", f"listening on 127.0.0.1:{port}; try: nc 127.0.0.1 {port}")
        await Master(args.backend, args.workers, args.cpu_ms).run(listener)


async def compare(args: argparse.Namespace, total: int) -> dict[str, dict[str, Any]]:
    """Run the same load against the prefork server and a single-process one."""
    results = {}
    with tcp_listener() as listener:
        async with anyio.create_task_group() as tg:
            await tg.start(
                Master(args.backend, args.workers, args.cpu_ms).run, listener
            )
            name = f"prefork, {args.workers} workers"
            results["prefork"] = await measure(
                name, args, listener.getsockname()[1], total
            )
            tg.cancel_scope.cancel()
    with tcp_listener() as listener:
        async with anyio.create_task_group() as tg:
            tg.start_soon(single_process, listener, args.cpu_ms)
            name = "single process"
            results["single"] = await measure(
                name, args, listener.getsockname()[1], total
            )
            tg.cancel_scope.cancel()
    return results


async def load(args: argparse.Namespace) -> bool:
    """Print connections/s of both servers; succeed if there were no errors."""
    results = await compare(args, args.connections)
    return all(
        not r["errors"] and r["ok"] == args.connections for r in results.values()
    )


async def kill_a_worker_in_flight(args: argparse.Namespace) -> list[str]:
    """Kill a worker that has connections it has not taken; return the failures."""
    failures: list[str] = []
    answers: list[str] = []
    with tcp_listener() as listener:
        port = listener.getsockname()[1]
        master = Master(args.backend, args.workers)
        async with anyio.create_task_group() as tg:
            await tg.start(master.run, listener)
            # Freeze worker 0: the records the master sends it stay unread.
            victim = master.workers[0]
            assert victim is not None
            victim.process.send_signal(signal.SIGSTOP)
            victim_pid = victim.process.pid

            async def client(i: int) -> None:
                try:
                    answers.append(await ask(port, f"in flight {i}"))
                except STREAM_ERRORS as exc:
                    failures.append(f"in-flight connection {i}: {exc!r}")

            with anyio.fail_after(20):
                async with anyio.create_task_group() as clients:
                    for i in range(4):
                        clients.start_soon(client, i)
                    while not victim.pending:  # noqa: ASYNC110 (polling a test probe)
                        await anyio.sleep(0.01)
                    log(
                        "self-test",
                        f"SIGKILL to worker {victim.process.pid}, which "
                        f"has {len(victim.pending)} connection(s) it has not taken",
                    )
                    victim.process.kill()
            tg.cancel_scope.cancel()
    dead = str(victim_pid)
    if len(answers) != 4 or any(answer.split()[0] == dead for answer in answers):
        failures.append(f"in-flight answers: {answers}")
    if master.restarts != 1 or master.redispatched < 1 or master.closed_unserved:
        failures.append(
            f"restarts {master.restarts}, re-dispatched {master.redispatched}, "
            f"closed {master.closed_unserved}"
        )
    log(
        "self-test",
        f"{len(answers)}/4 in-flight connections answered, "
        f"{master.redispatched} re-dispatched, {master.restarts} worker restarted",
    )
    return failures


async def self_test(args: argparse.Namespace) -> bool:
    """Load both servers, then kill a worker in flight; check nothing is lost."""
    total = 200
    results = await compare(args, total)
    failures = [
        f"{name}: {r['ok']}/{total} answered, errors {r['errors'][:3]}"
        for name, r in results.items()
        if r["errors"] or r["ok"] != total
    ]
    failures += await kill_a_worker_in_flight(args)
    for failure in failures:
        log("self-test", f"FAIL {failure}")
    if failures:
        print(f"prefork_server self-test: FAIL: {len(failures)} problem(s) above")
    else:
        print(
            f"prefork_server self-test: PASS: {total} connections each to "
            f"{args.workers} workers and to one process, 0 errors; a worker killed "
            f"with connections in flight lost none ({args.backend})"
        )
    return not failures


def main() -> None:
    """Parse the command line and run the chosen mode."""
    parser = argument_parser(__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpu-ms", type=float, default=0.0)
    parser.add_argument("--load", action="store_true", help="measure connections/s")
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--self-test", action="store_true", help="run the checks")
    parser.add_argument("--role", choices=["worker", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "worker":
        run(worker, args.cpu_ms, backend=args.backend)
    elif args.role == "load":
        run(
            load_process,
            args.port,
            args.connections,
            args.concurrency,
            backend=args.backend,
        )
    elif args.self_test:
        sys.exit(0 if run(self_test, args, backend=args.backend) else 1)
    elif args.load:
        sys.exit(0 if run(load, args, backend=args.backend) else 1)
    else:
        run(serve_forever, args, backend=args.backend)


if __name__ == "__main__":
    main()
