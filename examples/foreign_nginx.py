"""nginx's process channel: a worker in Python, its master in C, over FdStream.

nginx's master process talks to each worker over a socket pair with
fixed-size messages, ``ngx_channel_t`` (command, pid, slot, fd), and attaches
a descriptor to ``NGX_CMD_OPEN_CHANNEL``: that is how each worker gets the
channels of the others. ``examples/foreign/nginx_master.c`` plays the master,
written in C from nginx's public source; this program plays worker 0, with
``read_channel`` and ``write_channel`` written on an :class:`aiofdpass.FdStream`.
The master hands the worker the channel of a worker in slot 1; the worker
sends a pipe through it (``from_fd`` adopts the received ``Fd``); then the
master asks it to reopen its logs and to quit.

    python examples/foreign_nginx.py               # build the master, run the worker
    python examples/foreign_nginx.py --self-test   # the same, checked; 1 on failure

Every mode takes ``--backend asyncio|uvloop|trio``.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import aiofdpass

from _common import built_c_program, run_recipe, start_c_peer

MASTER = Path(__file__).parent / "foreign" / "nginx_master.c"

#: ``ngx_channel_t`` on LP64 (x86-64, aarch64): ngx_uint_t command, pid_t pid,
#: ngx_int_t slot, int fd, with the C compiler's padding: 32 bytes.
CHANNEL = struct.Struct("=Qi4xqi4x")

NGX_CMD_OPEN_CHANNEL = 1
NGX_CMD_CLOSE_CHANNEL = 2
NGX_CMD_QUIT = 3
NGX_CMD_TERMINATE = 4
NGX_CMD_REOPEN = 5


class ProtocolViolation(Exception):
    """The peer broke the channel protocol; the stream cannot be trusted."""


@dataclass
class ChannelMessage:
    """One ``ngx_channel_t``; ``fd`` is the descriptor it carried, if any."""

    command: int
    pid: int
    slot: int
    fd: aiofdpass.Fd | None


async def read_channel(stream: aiofdpass.FdStream) -> ChannelMessage:
    """Read one message, and its descriptor if it has one (``ngx_read_channel``).

    ``ngx_write_channel`` attaches the descriptor to the message's own
    ``sendmsg``, so it arrives with the message's first byte:
    ``receive_exactly`` returns it with the message, and only then.
    """
    data, fds = await stream.receive_exactly(CHANNEL.size)
    command, pid, slot, _ = CHANNEL.unpack(data)  # the fd field is the sender's
    wanted = 1 if command == NGX_CMD_OPEN_CHANNEL else 0
    if len(fds) != wanted:
        for fd in fds:
            fd.close()
        raise ProtocolViolation(
            f"command {command} came with {len(fds)} descriptors, not {wanted}"
        )
    return ChannelMessage(command, pid, slot, fds[0] if fds else None)


async def write_channel(
    stream: aiofdpass.FdStream, command: int, slot: int, fd: int = -1
) -> None:
    """Write one message, with ``fd`` unless it is -1 (``ngx_write_channel``)."""
    message = CHANNEL.pack(command, os.getpid(), slot, fd)
    await stream.send(message, [fd] if fd != -1 else [])


async def worker(master: aiofdpass.FdStream) -> list[str]:
    """Worker 0's channel loop: act on the master's commands until it says quit."""
    report = []
    while True:
        message = await read_channel(master)
        if message.command == NGX_CMD_OPEN_CHANNEL:
            assert message.fd is not None
            report.append(f"NGX_CMD_OPEN_CHANNEL: the channel of slot {message.slot}")
            async with aiofdpass.FdStream.from_fd(message.fd) as other:
                r, w = os.pipe()
                os.write(w, b"hello from worker 0 through a pipe\n")
                os.close(w)
                await write_channel(other, NGX_CMD_OPEN_CHANNEL, 0, r)
                os.close(r)  # sent: the other worker has its own copy
        elif message.command == NGX_CMD_REOPEN:
            report.append("NGX_CMD_REOPEN: the logs would be reopened here")
        elif message.command == NGX_CMD_QUIT:
            report.append(f"NGX_CMD_QUIT from pid {message.pid}")
            return report


async def scenario(master: Path) -> list[str]:
    """Run worker 0 against the master built at ``master``; say what happened."""
    process, stream = await start_c_peer(master)
    async with process:
        async with stream:
            report = await worker(stream)
        assert process.stdout is not None
        out = b"".join([chunk async for chunk in process.stdout]).decode()
        report += [f"master: {line}" for line in out.splitlines()]
        report.append(f"master exit status: {await process.wait()}")
    return report


EXPECTED = [
    "NGX_CMD_OPEN_CHANNEL: the channel of slot 1",
    "NGX_CMD_REOPEN: the logs would be reopened here",
    "NGX_CMD_QUIT from pid N",
    "master: slot 1 got NGX_CMD_OPEN_CHANNEL from pid N (slot 0) with a pipe: "
    "hello from worker 0 through a pipe",
    "master: worker 0 closed its channel after NGX_CMD_QUIT",
    "master exit status: 0",
]


def without_pids(report: list[str]) -> list[str]:
    """Return the report with every process id replaced by N (as in EXPECTED)."""
    return [re.sub(r"pid \d+", "pid N", line) for line in report]


async def checked_run() -> tuple[list[str], bool]:
    """Build the master and run the worker: its report, and whether it is right."""
    with built_c_program(MASTER) as master:
        report = await scenario(master)
    return report, without_pids(report) == EXPECTED


if __name__ == "__main__":
    run_recipe(
        __doc__,
        checked_run,
        "foreign_nginx",
        "channels and a pipe passed both ways with the C master",
    )
