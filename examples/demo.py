"""End-to-end demo: one process hands open descriptors to another.

Run ``python examples/demo.py [--backend asyncio|uvloop|trio]``. The script
is the server: it listens with :func:`aiofdpass.listen` on a socket in a
fresh temporary directory, then starts itself again as a second OS process
(``--client PATH``). The client connects with :func:`aiofdpass.connect` and
sends two records:

1. the read end of a pipe, after writing a line into the write end;
2. an open temporary file holding a line of text, positioned at offset 0.

Each record's payload is a small JSON object naming what it carries and the
descriptor number it had in the client. The server prints, per record, the
payload, the client's and its own descriptor number (they differ: the kernel
installs a new number in the receiving process for the same open file), what
kind of file arrived (``os.fstat``), whether it is close-on-exec, and the
text it reads from it. The pipe was created by the client and the file
exists under no name at all, yet the server reads both: what travels is the
open file itself, not a path. Every descriptor is closed on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

import aiofdpass

BACKENDS = ("asyncio", "uvloop", "trio")
TIMEOUT = 10  # seconds; the whole demo takes well under one


def say(who: str, text: str) -> None:
    """Print a line tagged with the process it comes from (flushed at once)."""
    print(f"[{who} pid {os.getpid()}] {text}", flush=True)


# -- client (the child process) ----------------------------------------------


async def client(path: str) -> None:
    """Connect to ``path`` and send a pipe's read end and a temporary file."""
    async with await aiofdpass.connect(path) as channel:
        # (a) A pipe: write some text, close the write end (so the reader
        # sees end of file), send the read end.
        read_end, write_end = os.pipe()
        try:
            os.write(write_end, b"hello through a pipe\n")
            os.close(write_end)
            payload = {"what": "read end of a pipe", "sender_fd": read_end}
            say("client", f"sending fd {read_end} (pipe read end)")
            await channel.send(json.dumps(payload).encode(), [read_end])
        finally:
            # Once send() returned, the record is in the kernel: our copy
            # can go, the server's stays valid.
            os.close(read_end)

        # (b) A temporary file (it has no name on disk), rewound to offset 0.
        # The server's descriptor shares this file offset with ours.
        with tempfile.TemporaryFile("w+b") as file:
            file.write(b"hello from a temporary file\n")
            file.flush()
            file.seek(0)
            payload = {"what": "temporary file", "sender_fd": file.fileno()}
            say("client", f"sending fd {file.fileno()} (temporary file)")
            await channel.send(json.dumps(payload).encode(), [file])
    say("client", "done, connection closed")


# -- server (the parent process) ---------------------------------------------


def kind_of(fd: int) -> str:
    """Name the kind of file ``fd`` refers to."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode):
        return "pipe (S_ISFIFO)"
    if stat.S_ISREG(mode):
        return "regular file (S_ISREG)"
    return f"other (mode {mode:#o})"


def show(message: aiofdpass.Message) -> None:
    """Print what one record brought, read each descriptor, close them all."""
    with message:  # closes any descriptor not taken below
        info = json.loads(message.data)
        say("server", f"record: payload {message.data.decode()}")
        for fd in message.fds:
            number = fd.fileno()
            say(
                "server",
                f"  {info['what']}: fd {info['sender_fd']} in the client is "
                f"fd {number} here; {kind_of(number)}; "
                f"close-on-exec: {not os.get_inheritable(number)}",
            )
            # The file object owns the descriptor now and closes it.
            with fd.to_file("rb") as file:
                say("server", f"  read from it: {file.read()!r}")


async def server(backend: str) -> None:
    """Listen, start the client process, and show what it sends."""
    with tempfile.TemporaryDirectory(prefix="aiofdpass-demo-") as tmp:
        path = str(Path(tmp) / "demo.sock")
        async with await aiofdpass.listen(path) as listener:
            say("server", f"listening on {path} ({backend})")
            command = [sys.executable, __file__, "--backend", backend]
            # stdout/stderr are inherited: the client's lines appear here too.
            async with await anyio.open_process(
                [*command, "--client", path],
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
            ) as process:
                with anyio.fail_after(TIMEOUT):
                    async with await listener.accept() as channel:
                        say("server", "client connected")
                        async for message in channel:
                            show(message)
                    say("server", "client closed the connection")
                    returncode = await process.wait()
    if returncode != 0:
        raise SystemExit(f"the client process failed with exit code {returncode}")
    say("server", "done: every descriptor was closed on both sides")


def run(func: Callable[[], Awaitable[None]], backend: str) -> None:
    """Run ``func`` on ``backend`` (uvloop is asyncio with uvloop's loop)."""
    if backend == "uvloop":
        anyio.run(func, backend="asyncio", backend_options={"use_uvloop": True})
    else:
        anyio.run(func, backend=backend)


def main() -> None:
    """Parse the command line and run the server (or, with --client, the client)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="asyncio")
    parser.add_argument("--client", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    backend: str = args.backend
    client_path: str | None = args.client
    if client_path is not None:
        run(lambda: client(client_path), backend)
    else:
        run(lambda: server(backend), backend)


if __name__ == "__main__":
    main()
