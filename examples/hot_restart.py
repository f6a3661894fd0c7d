"""Hot restart: a new server process takes the listening socket from the running one.

Start a server with ``--serve CONTROL``. If a server already runs on that
control socket, the new one connects to it and asks for its listening
sockets; the old server sends them over the channel. Both check who is at
the other end: the control socket admits only this user's processes
(``listen(allow=same_user())``), and the new server takes sockets only from
a server of its own user (``channel.peer_credentials``). The new server starts
accepting on them and says so; the old one then stops accepting, closes its
copies and its control socket, finishes its in-flight connections (for at
most ``--drain`` seconds) and exits. The new server then listens on the
control socket itself, ready for the next restart.

The listening socket is never closed (one of the two processes holds it at
every moment), so its port never stops taking connections: clients see no
refused connection, only, at worst, a connection that waits a moment in the
kernel's accept queue. This is what HAProxy (``-x``) and Envoy do on reload.

    python examples/hot_restart.py               # three generations under load, checked
    python examples/hot_restart.py --self-test   # the same; exit status 1 on failure
    python examples/hot_restart.py --serve /tmp/hot.sock   # run it again to restart

Every mode takes ``--backend asyncio|uvloop|trio``. A server stops on
SIGTERM or Ctrl-C, after finishing its connections.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
from collections import Counter

import anyio
from anyio.abc import SocketStream, TaskGroup
from anyio.streams.buffered import BufferedByteReceiveStream

import aiofdpass

from _common import argument_parser, run, say

STREAM_ERRORS = (
    OSError,
    anyio.EndOfStream,
    anyio.IncompleteRead,
    anyio.BrokenResourceError,
)


# -- serving: accept, and answer each line with "<generation> <pid> <line>" -----


async def serve_connection(sock: socket.socket, generation: int) -> None:
    """Answer each line on one connection until the client closes it."""
    async with await SocketStream.from_socket(sock) as stream:
        lines = BufferedByteReceiveStream(stream)
        try:
            while True:
                line = await lines.receive_until(b"\n", 4096)
                await stream.send(
                    f"{generation} {os.getpid()} ".encode() + line + b"\n"
                )
        except STREAM_ERRORS:
            pass


async def accept_loop(
    listener: socket.socket, connections: TaskGroup, generation: int
) -> None:
    """Accept on a (maybe shared) listening socket; serve each connection in a task."""
    while True:
        await anyio.wait_readable(listener)
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            continue  # the other process took this one
        connections.start_soon(serve_connection, sock, generation)


# -- the hand-over --------------------------------------------------------------


async def take_over(
    control: str,
) -> tuple[int, list[socket.socket], aiofdpass.FdChannel] | None:
    """Ask the server on ``control`` for its listening sockets (``None``: no server)."""
    try:
        old = await aiofdpass.connect(control)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    # Take listening sockets only from a server run by our own user.
    server = old.peer_credentials
    if server.uid != os.geteuid():
        await old.aclose()
        raise SystemExit(
            f"the server on {control} runs as uid {server.uid}, not {os.geteuid()}: "
            "not taking its sockets; use another control path"
        )
    await old.send(b"listeners, please")
    with await old.receive() as message:
        generation = json.loads(message.data)["generation"] + 1
        return generation, [fd.to_socket() for fd in message.fds], old


async def hand_over(
    control: aiofdpass.FdListener, listeners: list[socket.socket], generation: int
) -> aiofdpass.FdChannel:
    """Wait for a successor; send it the listening sockets; return once it accepts."""
    while True:
        # listen(allow=same_user()) admitted only this user's processes.
        successor = await control.accept()
        say(
            f"gen {generation}",
            f"successor pid {successor.peer_credentials.pid} connected",
        )
        try:
            await successor.receive()  # its request
            await successor.send(
                json.dumps({"generation": generation}).encode(), listeners
            )
            await successor.receive()  # "accepting": it serves the port now
            return successor
        except (
            anyio.EndOfStream,
            anyio.BrokenResourceError,
            aiofdpass.FdPassError,
        ) as exc:
            say(
                f"gen {generation}",
                f"a successor failed during the hand-over ({exc!r}); still serving",
            )
            await successor.aclose()


async def serve(control: str, port: int, drain: float) -> None:
    """Serve until a successor takes over (or a signal comes), then drain and exit."""
    inherited = await take_over(control)
    if inherited is None:
        generation, old = 1, None
        listener = socket.create_server(("127.0.0.1", port), backlog=socket.SOMAXCONN)
        listener.setblocking(False)
        listeners = [listener]
    else:
        generation, listeners, old = inherited
        for listener in listeners:
            listener.setblocking(False)  # already so: O_NONBLOCK is shared anyway
    me = f"gen {generation}"
    successor = None
    async with anyio.create_task_group() as connections:
        async with anyio.create_task_group() as accepting:
            for listener in listeners:
                accepting.start_soon(accept_loop, listener, connections, generation)
            if old is not None:
                await old.send(b"accepting")
                with anyio.fail_after(drain + 10):
                    async for (
                        _
                    ) in old:  # it closes the channel once it stopped accepting
                        pass
                await old.aclose()
            # Only this user's processes may ask for the listening sockets:
            # anyone else is closed before a byte is read (and it is logged).
            async with await aiofdpass.listen(
                control, allow=aiofdpass.same_user()
            ) as control_listener:
                ports = [sock.getsockname()[1] for sock in listeners]
                say(me, f"serving on 127.0.0.1:{ports[0]}, control socket {control}")
                with anyio.open_signal_receiver(
                    signal.SIGTERM, signal.SIGINT
                ) as signals:
                    async with anyio.create_task_group() as waiting:

                        async def on_successor() -> None:
                            nonlocal successor
                            successor = await hand_over(
                                control_listener, listeners, generation
                            )
                            waiting.cancel_scope.cancel()

                        async def on_signal() -> None:
                            async for signum in signals:
                                say(me, f"got {signal.Signals(signum).name}")
                                waiting.cancel_scope.cancel()

                        waiting.start_soon(on_successor)
                        waiting.start_soon(on_signal)
            # The control socket file is gone now, so the successor can bind it.
            accepting.cancel_scope.cancel()
        for listener in listeners:
            listener.close()  # the successor holds its own copies
        if successor is not None:
            await successor.aclose()  # tells it we stopped accepting
            say(me, "handed the listening socket over; finishing in-flight connections")
        connections.cancel_scope.deadline = anyio.current_time() + drain
    say(me, "exiting")


# -- the end-to-end run: three generations while clients hammer the port --------


async def run_clients(
    port: int, stop: anyio.Event, results: Counter[str], problems: list[str]
) -> None:
    """Eight clients: connect, send a line, read the answer, until ``stop``.

    Each makes at most 2000 requests, so the loop is bounded even if the
    run goes wrong. Answers are counted per server generation.
    """

    async def client() -> None:
        for i in range(2000):
            if stop.is_set():
                return
            try:
                async with await anyio.connect_tcp("127.0.0.1", port) as stream:
                    await stream.send(f"request {i}\n".encode())
                    lines = BufferedByteReceiveStream(stream)
                    answer = await lines.receive_until(b"\n", 4096)
            except STREAM_ERRORS as exc:
                refused = isinstance(exc.__cause__ or exc, ConnectionRefusedError)
                results["refused" if refused else "errors"] += 1
                problems.append(repr(exc))
            else:
                results[f"gen {answer.split()[0].decode()}"] += 1

    async with anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(client)


async def start_generation(
    command: list[str], tg: TaskGroup
) -> tuple[anyio.abc.Process, int]:
    """Start a server process; return it and its port, then pass its output on."""
    process = await anyio.open_process(command, stderr=None)
    assert process.stdout is not None
    output = BufferedByteReceiveStream(process.stdout)
    while True:
        line = (await output.receive_until(b"\n", 4096)).decode()
        print(line, flush=True)
        if "serving on 127.0.0.1:" in line:
            port = int(line.split("127.0.0.1:")[1].split(",")[0])
            break

    async def pass_output_on() -> None:
        try:
            while True:
                print((await output.receive_until(b"\n", 4096)).decode(), flush=True)
        except STREAM_ERRORS:
            pass

    tg.start_soon(pass_output_on)
    return process, port


async def end_to_end(backend: str) -> bool:
    """Restart the server twice under load; check that no connection was refused."""
    results: Counter[str] = Counter()
    problems: list[str] = []
    stop = anyio.Event()
    codes = []

    async def wait_for_answers(count: int) -> None:
        target = results.total() + count
        while results.total() < target:  # noqa: ASYNC110 (polling a counter)
            await anyio.sleep(0.01)

    with tempfile.TemporaryDirectory(prefix="aiofdpass-hot-") as tmp:
        control = os.path.join(tmp, "control.sock")
        command = [sys.executable, __file__, "--backend", backend, "--serve", control]
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                process, port = await start_generation(command, tg)
                async with anyio.create_task_group() as clients:
                    clients.start_soon(run_clients, port, stop, results, problems)
                    for _ in range(2):  # two restarts, each under load
                        await wait_for_answers(100)
                        say(
                            "self-test", f"starting a successor; so far {dict(results)}"
                        )
                        async with process:
                            successor, _ = await start_generation(command, tg)
                            codes.append(await process.wait())
                        process = successor
                    await wait_for_answers(100)
                    stop.set()
                async with process:  # the clients are done: stop the last one
                    process.send_signal(signal.SIGTERM)
                    codes.append(await process.wait())
    for problem in problems[:5]:
        say("self-test", f"client error: {problem}")
    served = sum(results[f"gen {g}"] for g in (1, 2, 3))
    ok = (
        results["refused"] == results["errors"] == 0
        and all(results[f"gen {g}"] > 0 for g in (1, 2, 3))
        and codes == [0, 0, 0]
    )
    say("self-test", f"answers: {dict(results)}; exit codes {codes}")
    print(
        f"hot_restart self-test: {'PASS' if ok else 'FAIL'}: {served} requests over "
        f"3 generations, {results['refused']} refused, {results['errors']} errors "
        f"({backend})"
    )
    return ok


def main() -> None:
    """Parse the command line and run the chosen mode."""
    parser = argument_parser(__doc__)
    parser.add_argument(
        "--self-test",
        action="store_true",
        help="run end to end and check (the default run)",
    )
    parser.add_argument(
        "--serve",
        metavar="CONTROL",
        help="run a server (or take over from one) on CONTROL",
    )
    parser.add_argument(
        "--port", type=int, default=0, help="TCP port for a first server (0: any)"
    )
    parser.add_argument(
        "--drain", type=float, default=10.0, help="seconds to finish connections"
    )
    args = parser.parse_args()
    if args.serve:
        run(serve, args.serve, args.port, args.drain, backend=args.backend)
    else:
        sys.exit(0 if run(end_to_end, args.backend, backend=args.backend) else 1)


if __name__ == "__main__":
    main()
