"""Echo service: a server on a UNIX socket path sends each record back, fds and all.

The client sends three open descriptors, one per record: the read end of a
pipe, a temporary file (no name on disk) and one end of a socket pair. Each
comes back from the server as a new descriptor number in the client, and the
client proves that it is still the same open file: it writes into the pipe
and reads from the returned end, reads the file's content through it, and
talks through the returned socket to its partner.

    python examples/echo_service.py               # server + client process, end to end
    python examples/echo_service.py --self-test   # the same; exit status 1 on failure
    python examples/echo_service.py --serve PATH  # only the server, until Ctrl-C
    python examples/echo_service.py --client PATH # only the client

Every mode takes ``--backend asyncio|uvloop|trio``.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

import aiofdpass

from _common import argument_parser, run, say


def describe(fd: int) -> str:
    """Name the kind of open file, and whether a child process would inherit it."""
    mode = os.fstat(fd).st_mode
    kind = "pipe" if stat.S_ISFIFO(mode) else "file" if stat.S_ISREG(mode) else ""
    kind = kind or ("socket" if stat.S_ISSOCK(mode) else f"mode {mode:#o}")
    cloexec = not os.get_inheritable(fd)
    return f"{kind}, inode {os.fstat(fd).st_ino}, close-on-exec {cloexec}"


# -- the server: this is all of it ---------------------------------------------


async def echo(channel: aiofdpass.FdChannel) -> None:
    """Send every record back on the channel it came from, with its descriptors."""
    async for message in channel:
        with message:  # closes the server's copies once they are sent back
            for fd in message.fds:
                n = fd.fileno()
                say("server", f"got {message.data!r}: fd {n} here, {describe(n)}")
            await channel.send(message)


async def serve(
    path: str, *, task_status: TaskStatus[None] = TASK_STATUS_IGNORED
) -> None:
    """Listen on ``path`` and echo on every connection, until cancelled."""
    async with await aiofdpass.listen(path) as listener:
        say("server", f"listening on {path}")
        task_status.started()
        await listener.serve(echo)


# -- the client: send three kinds of descriptor, prove each one still works ---


async def round_trip(
    channel: aiofdpass.FdChannel, what: bytes, fd: int
) -> aiofdpass.Fd:
    """Send ``fd`` in a record named ``what``; return the descriptor that came back."""
    say("client", f"sending {what!r} with fd {fd}")
    await channel.send(what, [fd])
    reply = await channel.receive()
    if reply.data != what or len(reply.fds) != 1:
        reply.close()
        raise AssertionError(f"sent {what!r} with 1 fd, got back {reply!r}")
    back = reply.fds[0]
    n = back.fileno()
    say("client", f"{what!r} came back as fd {n}: {describe(n)}")
    return back


def check(ok: bool, text: str) -> bool:
    """Print a check's result and return it."""
    say("client", f"  {'ok  ' if ok else 'FAIL'} {text}")
    return ok


async def client(path: str) -> bool:
    """Connect to the echo server and round-trip a pipe, a file and a socket."""
    results = []
    async with await aiofdpass.connect(path) as channel:
        # 1. A pipe: write into our write end, read from the returned read end.
        r, w = os.pipe()
        with await round_trip(channel, b"pipe", r) as back:
            os.write(w, b"through the pipe")
            got = os.read(back.fileno(), 100)
            results.append(
                check(
                    got == b"through the pipe",
                    f"read {got!r} from the returned pipe end",
                )
            )
        os.close(r)
        os.close(w)

        # 2. A temporary file: it has no path, yet the returned fd reads it.
        with tempfile.TemporaryFile() as file:
            file.write(b"the file's content")
            file.flush()
            with await round_trip(channel, b"file", file.fileno()) as back:
                got = os.pread(back.fileno(), 100, 0)
                results.append(
                    check(
                        got == b"the file's content",
                        f"read {got!r} from the returned file",
                    )
                )

        # 3. A socket: the returned end still talks to its partner, both ways.
        mine, theirs = socket.socketpair()
        with (
            mine,
            theirs,
            (await round_trip(channel, b"socket", theirs.fileno())).to_socket() as back,
        ):
            mine.sendall(b"ping")
            back.sendall(back.recv(4) + b"-pong")
            got = mine.recv(100)
            results.append(
                check(
                    got == b"ping-pong",
                    f"ping through the returned socket, got {got!r}",
                )
            )
    return len(results) == 3 and all(results)


# -- the end-to-end run: server here, client in a second process ---------------


async def end_to_end(backend: str) -> bool:
    """Start the server, run the client as a child process, report the outcome."""
    with tempfile.TemporaryDirectory(prefix="aiofdpass-echo-") as tmp:
        path = os.path.join(tmp, "echo.sock")
        async with anyio.create_task_group() as tg:
            await tg.start(serve, path)
            command = [sys.executable, __file__, "--backend", backend, "--client", path]
            with anyio.fail_after(30):
                result = await anyio.run_process(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=None,
                    stderr=None,
                    check=False,
                )
            tg.cancel_scope.cancel()
    ok = result.returncode == 0
    print(
        f"echo_service self-test: {'PASS' if ok else 'FAIL'}: pipe, file and socket "
        f"{'all work' if ok else 'did not all work'} after the round trip ({backend})"
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
    parser.add_argument("--serve", metavar="PATH", help="only run the server on PATH")
    parser.add_argument(
        "--client", metavar="PATH", help="only run the client against PATH"
    )
    args = parser.parse_args()
    if args.serve:
        run(serve, args.serve, backend=args.backend)
    elif args.client:
        sys.exit(0 if run(client, args.client, backend=args.backend) else 1)
    else:
        sys.exit(0 if run(end_to_end, args.backend, backend=args.backend) else 1)


if __name__ == "__main__":
    main()
