"""APUE's open server: get open files from a C program, the book's way, over FdStream.

``examples/foreign/apue_opend.c`` is the open server of "Advanced Programming
in the UNIX Environment" (Stevens and Rago, 3rd edition, section 17.5),
written in C from the book's description of its protocol. This program is
its client: the book's ``csopen`` and ``recv_fd``, written on an
:class:`aiofdpass.FdStream`. It builds the server with the C compiler
(``$CC``, default ``cc``), starts it on one end of a socket pair (the book's
"s-pipe"), and asks it to open files: a file to read, the same file to
append to, a file that does not exist, and a request the server does not
understand.

    python examples/foreign_apue.py               # build, run, print what happened
    python examples/foreign_apue.py --self-test   # the same, checked; 1 on failure

Every mode takes ``--backend asyncio|uvloop|trio``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import aiofdpass

from _common import built_c_program, run_recipe, start_c_peer

SERVER = Path(__file__).parent / "foreign" / "apue_opend.c"

#: The book's buffer size: the most an error message may hold.
MAXLINE = 4096


class OpenServerError(Exception):
    """The open server refused: ``args`` is (status byte, its error text)."""


class ProtocolViolation(Exception):
    """The peer broke the send_fd protocol; the stream cannot be trusted."""


async def recv_fd(stream: aiofdpass.FdStream) -> aiofdpass.Fd:
    """APUE's ``recv_fd``: text up to a NUL byte, a status byte, the descriptor.

    ``send_fd`` attaches the descriptor to the NUL byte and the status byte
    (one ``sendmsg`` of two bytes), so it comes with the NUL byte:
    ``receive_until`` returns the descriptors that arrived with its
    delimiter. A nonzero status means no descriptor, and the text before the
    NUL byte says why.
    """
    text, fds = await stream.receive_until(b"\0", MAXLINE)
    status, more = await stream.receive_exactly(1)
    fds += more
    if status == b"\0" and len(fds) == 1:
        return fds[0]
    for fd in fds:
        fd.close()
    if status == b"\0":
        raise ProtocolViolation(f"status 0 came with {len(fds)} descriptors, not 1")
    raise OpenServerError(status[0], text.decode(errors="replace"))


async def csopen(stream: aiofdpass.FdStream, path: str, oflag: int) -> aiofdpass.Fd:
    """APUE's ``csopen``: ask the open server to open ``path`` with ``oflag``.

    The request is written as the book's ``writev`` does: four buffers,
    ``open``, the path, the flags in decimal, and the NUL byte that ends it.
    """
    await stream.send([b"open ", os.fsencode(path), b" %d" % oflag, b"\0"])
    return await recv_fd(stream)


async def scenario(server: Path, directory: Path) -> list[str]:
    """Ask the open server (built at ``server``) for four files; say what happened."""
    notes = directory / "notes.txt"
    notes.write_bytes(b"first line\n")
    report = []
    process, stream = await start_c_peer(server)
    async with process:
        async with stream:
            with (await csopen(stream, str(notes), os.O_RDONLY)).to_file() as file:
                report.append(f"read through the descriptor: {file.read()!r}")
            with await csopen(stream, str(notes), os.O_WRONLY | os.O_APPEND) as fd:
                os.write(fd.fileno(), b"appended through the descriptor\n")
            report.append(f"the file now holds: {notes.read_bytes()!r}")
            for request in ("missing.txt", None):
                try:
                    if request is None:
                        await stream.send(b"frob notes.txt\0")
                        await recv_fd(stream)
                    else:
                        await csopen(stream, str(directory / request), os.O_RDONLY)
                except OpenServerError as exc:
                    status, text = exc.args
                    report.append(f"refused, status {status}: {text}")
        # The server ends at end of file, once the stream is closed.
        report.append(f"open server exit status: {await process.wait()}")
    return report


def expected(directory: Path) -> list[str]:
    """Return what the scenario reports when it runs in ``directory``."""
    return [
        "read through the descriptor: b'first line\\n'",
        "the file now holds: b'first line\\nappended through the descriptor\\n'",
        f"refused, status 1: can't open {directory}/missing.txt: No such file or "
        "directory",
        "refused, status 1: usage: open <pathname> <oflag>",
        "open server exit status: 0",
    ]


async def checked_run() -> tuple[list[str], bool]:
    """Build the server and run the scenario: its report, and whether it is right."""
    with (
        built_c_program(SERVER) as server,
        tempfile.TemporaryDirectory(prefix="aiofdpass-apue-") as tmp,
    ):
        report = await scenario(server, Path(tmp))
    shown = [line.replace(tmp, "$TMP") for line in report]
    return shown, report == expected(Path(tmp))


if __name__ == "__main__":
    run_recipe(
        __doc__,
        checked_run,
        "foreign_apue",
        "two descriptors and two refusals from the C open server",
    )
