"""Messages whose header counts their descriptors: a Python server for a C client.

Many protocols frame each message with a header that says how long it is
and how many descriptors it carries (skalibs' unixmessage, which s6 speaks,
and its like). The descriptors may arrive ahead of their message's bytes: a
sender may write several messages in one ``sendmsg`` with all their
descriptors attached to it. So the reader must not ask which bytes a
descriptor came with; it keeps a queue and gives each complete message as
many as its header says. An :class:`aiofdpass.FdStream` is that queue:
anyio's ``BufferedByteReceiveStream`` reads the bytes through it, and
``take_fds(n)`` takes the descriptors.

``examples/foreign/counted_peer.c`` is the client, written in C from the
framing's description: it sends five messages (one alone, three in one
``sendmsg``, one whose descriptor comes after its header), and checks that
each reply brings back the same open files. This program is the server, on
``listen_stream``.

    python examples/foreign_counted.py               # build the client, serve it
    python examples/foreign_counted.py --self-test   # the same, checked; 1 on failure

Every mode takes ``--backend asyncio|uvloop|trio``.
"""

from __future__ import annotations

import errno
import os
import struct
import tempfile
from pathlib import Path

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

import aiofdpass

from _common import built_c_program, run_recipe

CLIENT = Path(__file__).parent / "foreign" / "counted_peer.c"

#: Payload length (uint32) and descriptor count (uint16), big-endian.
HEADER = struct.Struct("!IH")
#: The largest payload this side accepts; a header over it breaks the stream.
MAX_PAYLOAD = 1024 * 1024


class ProtocolViolation(Exception):
    """The peer broke the framing; the stream cannot be trusted."""


async def read_message(
    stream: aiofdpass.FdStream, reader: BufferedByteReceiveStream
) -> tuple[bytes, list[aiofdpass.Fd]] | None:
    """Read one message: its payload and its descriptors; ``None`` at a clean end.

    ``reader`` is ``BufferedByteReceiveStream(stream)``: it reads bytes with
    ``stream.receive()``, which leaves the descriptors in the stream's
    queue. Once the message's last byte is in, every descriptor its sender
    attached has arrived, and the message takes as many as its header says.
    """
    try:
        start = await reader.receive(HEADER.size)
    except anyio.EndOfStream:
        if stream.queued_fds:
            _discard(stream.take_fds())
            raise ProtocolViolation("descriptors that no message claimed") from None
        return None
    header = start + await reader.receive_exactly(HEADER.size - len(start))
    length, nfds = HEADER.unpack(header)
    if length > MAX_PAYLOAD:
        raise ProtocolViolation(f"a {length}-byte message, over {MAX_PAYLOAD}")
    payload = await reader.receive_exactly(length)
    fds = stream.take_fds(nfds)
    if len(fds) < nfds:
        _discard(fds)
        raise ProtocolViolation(f"{nfds} descriptors announced, {len(fds)} arrived")
    return payload, fds


async def write_message(
    stream: aiofdpass.FdStream, payload: bytes, fds: list[aiofdpass.Fd]
) -> None:
    """Write one message; its descriptors go with its first byte."""
    await stream.send([HEADER.pack(len(payload), len(fds)), payload], fds)


def _discard(fds: list[aiofdpass.Fd]) -> None:
    for fd in fds:
        fd.close()


def content(fd: aiofdpass.Fd) -> bytes:
    """Return what a file (from its start) or a pipe (what is in it) holds."""
    try:
        return os.pread(fd.fileno(), 100, 0)
    except OSError as exc:
        if exc.errno != errno.ESPIPE:
            raise
        return os.read(fd.fileno(), 100)


async def serve_one(stream: aiofdpass.FdStream, report: list[str]) -> None:
    """Answer every message with what its descriptors hold, and the descriptors."""
    reader = BufferedByteReceiveStream(stream)
    while (message := await read_message(stream, reader)) is not None:
        payload, fds = message
        try:
            contents = b", ".join(content(fd).strip() for fd in fds)
            report.append(f"server: {payload.decode()!r} with {len(fds)} fds")
            await write_message(stream, payload + b" <- " + contents, fds)
        finally:
            _discard(fds)


async def scenario(client: Path, directory: Path) -> list[str]:
    """Serve the client built at ``client`` on a socket in ``directory``."""
    report: list[str] = []

    async def handler(stream: aiofdpass.FdStream) -> None:
        await serve_one(stream, report)

    async with (
        await aiofdpass.listen_stream(directory / "counted.sock") as listener,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(listener.serve, handler)
        # A relative path: sun_path holds 107 bytes, temporary paths can be long.
        result = await anyio.run_process(
            [client, "counted.sock"], cwd=directory, stderr=None, check=False
        )
        tg.cancel_scope.cancel()
    report += [f"client: {line}" for line in result.stdout.decode().splitlines()]
    report.append(f"client exit status: {result.returncode}")
    return report


EXPECTED = [
    "server: 'pipe' with 1 fds",
    "server: 'two files' with 2 fds",
    "server: 'nothing' with 0 fds",
    "server: 'one more' with 1 fds",
    "server: 'late' with 1 fds",
    'client: reply 1: "pipe <- from C through a pipe" with 1 fds, '
    "the same open files: yes",
    'client: reply 2: "two files <- first memfd, second memfd" with 2 fds, '
    "the same open files: yes",
    'client: reply 3: "nothing <- " with 0 fds, the same open files: yes',
    'client: reply 4: "one more <- third memfd" with 1 fds, the same open files: yes',
    'client: reply 5: "late <- fourth memfd" with 1 fds, the same open files: yes',
    "client: 5 replies, clean end of stream",
    "client exit status: 0",
]


async def checked_run() -> tuple[list[str], bool]:
    """Build the client and serve it: the report, and whether it is right."""
    with (
        built_c_program(CLIENT) as client,
        tempfile.TemporaryDirectory(prefix="aiofdpass-counted-") as tmp,
    ):
        report = await scenario(client, Path(tmp))
    return report, report == EXPECTED


if __name__ == "__main__":
    run_recipe(
        __doc__,
        checked_run,
        "foreign_counted",
        "five messages counted their descriptors, both ways with the C client",
    )
