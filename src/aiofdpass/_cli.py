"""The command-line tool: ``aiofdpass`` (also ``python -m aiofdpass``).

``listen`` prints what arrives, ``send`` sends files as descriptors, and
``inspect`` lists a process's descriptors; see ``aiofdpass --help``.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial

import anyio

from ._channel import FdChannel
from ._describe import describe, list_fds
from ._errors import FdPassError
from ._stream import FdStream
from ._unix import (
    FdListener,
    FdStreamListener,
    connect,
    connect_stream,
    listen,
    listen_stream,
)
from ._version import __version__

__all__ = ["main"]

#: Exit statuses, as ``--help`` lists them.
OK, ERROR, USAGE, INTERRUPTED, TERMINATED = 0, 1, 2, 130, 143
# How much of a record's data a line shows.
_SHOWN = 64

_EPILOG = """\
exit status: 0 done, 1 an error (said on stderr), 2 bad usage, 130 interrupted,
143 terminated (SIGTERM; a listener removes its socket file first).

examples:
  aiofdpass listen /tmp/demo.sock --count 1
  aiofdpass send /tmp/demo.sock --data hello --file /etc/hostname
  aiofdpass inspect self
"""


def _show(data: bytes) -> str:
    shown = repr(data[:_SHOWN])
    if len(data) > _SHOWN:
        shown += "..."
    return f"{shown} ({len(data)} bytes)"


def _fd_lines(fds: Sequence[int]) -> list[str]:
    lines = []
    for fd in fds:
        try:
            line = str(describe(fd))
        except OSError as exc:  # pragma: no cover - we own it: it is open
            line = f"fd {fd}: {exc}"
        lines.append(f"  {line}")
    return lines


class _OutputClosed(Exception):
    """Standard output can no longer be written (``aiofdpass listen | head``)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(f"cannot write to standard output: {error}")
        self.error = error


def _write(lines: Sequence[str]) -> None:
    """Print ``lines`` and flush; raise :class:`_OutputClosed` if stdout broke."""
    try:
        for line in lines:
            print(line)
        sys.stdout.flush()
    except OSError as exc:
        raise _OutputClosed(exc) from None


class _Printer:
    """Print what arrives; cancel ``scope`` after ``count`` records.

    Also stops when standard output breaks (kept in ``closed``, raised once
    the listener stopped): a handler's exception would only be logged by
    ``serve()``, and the listener would go on forever.
    """

    def __init__(self, count: int | None, noun: str) -> None:
        self.count = count
        self.noun = noun
        self.seen = 0
        self.stop: Callable[[], None] = lambda: None
        self.closed: _OutputClosed | None = None
        self.terminated = False

    def record(self, peer: str, data: bytes, fds: Sequence[int]) -> None:
        self.seen += 1
        s = "" if len(fds) == 1 else "s"
        head = f"{self.noun} {self.seen} from {peer}: {_show(data)}, {len(fds)} fd{s}"
        try:
            _write([head, *_fd_lines(fds)])
        except _OutputClosed as exc:
            self.closed = exc
            self.stop()
            return
        if self.count is not None and self.seen >= self.count:
            self.stop()

    def failed(self, peer: str, exc: Exception) -> None:
        """Say on stderr that a connection failed (the listener goes on)."""
        name = type(exc).__name__
        print(
            f"aiofdpass listen: connection from {peer}: {name}: {exc}", file=sys.stderr
        )


def _peer(conn: FdChannel | FdStream) -> str:
    creds = conn.peer_credentials
    return f"pid {creds.pid} uid {creds.uid}"


async def _print_channel(printer: _Printer, channel: FdChannel) -> None:
    peer = _peer(channel)
    try:
        async for message in channel:
            with message:
                printer.record(peer, message.data, [fd.fileno() for fd in message.fds])
    except (FdPassError, anyio.BrokenResourceError) as exc:
        printer.failed(peer, exc)  # a peer that broke the framing, ...


async def _print_stream(printer: _Printer, stream: FdStream) -> None:
    peer = _peer(stream)
    while True:
        try:
            data, fds = await stream.receive_with_fds()
        except anyio.EndOfStream:
            return
        except (FdPassError, anyio.BrokenResourceError) as exc:
            printer.failed(peer, exc)
            return
        try:
            printer.record(peer, data, [fd.fileno() for fd in fds])
        finally:
            for fd in fds:
                fd.close()


async def _listen(args: argparse.Namespace) -> int:
    printer = _Printer(args.count, "read" if args.stream else "record")
    listener: FdListener | FdStreamListener
    if args.stream:
        listener = await listen_stream(args.path)
    else:
        listener = await listen(args.path)
    # SIGTERM is handled from before the first line a script may wait for:
    # the listener stops as on Ctrl-C, removing its socket file.
    with anyio.open_signal_receiver(signal.SIGTERM) as terms:
        async with listener:
            print(f"listening on {listener.path!s}", flush=True)
            async with anyio.create_task_group() as tg:
                printer.stop = tg.cancel_scope.cancel
                tg.start_soon(_stop_on_sigterm, terms, printer)
                # serve() closes each connection when its printer returns.
                if isinstance(listener, FdStreamListener):
                    tg.start_soon(listener.serve, partial(_print_stream, printer), tg)
                else:
                    tg.start_soon(listener.serve, partial(_print_channel, printer), tg)
    if printer.closed is not None:
        raise printer.closed
    return TERMINATED if printer.terminated else OK


async def _stop_on_sigterm(terms: AsyncIterator[int], printer: _Printer) -> None:
    async for _ in terms:
        printer.terminated = True
        printer.stop()
        return


def _open(path: str) -> int:
    # O_NONBLOCK so that opening a FIFO does not wait for a writer; the
    # descriptor is made blocking again before it is sent.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise
        raise OSError(
            exc.errno,
            f"cannot open {path!r} ({exc.strerror}): a socket, or an "
            "eventfd, epoll or other anonymous descriptor (also as "
            "/proc/PID/fd/N), cannot be opened by path; send it from a "
            "program with aiofdpass.connect()",
        ) from None
    os.set_blocking(fd, True)
    return fd


async def _send(args: argparse.Namespace) -> int:
    data = args.data.encode()
    fds: list[int] = []
    try:
        for path in args.file:
            fds.append(_open(path))
        if args.stream:
            async with await connect_stream(args.path) as stream:
                await stream.send(data, fds)
        else:
            async with await connect(args.path) as channel:
                await channel.send(data, fds)
    finally:
        for fd in fds:
            os.close(fd)
    s = "" if len(fds) == 1 else "s"
    print(f"sent {len(data)} bytes and {len(fds)} fd{s} to {args.path}")
    return OK


def _inspect(args: argparse.Namespace) -> int:
    target = args.target
    try:
        infos = list_fds(target)
    except FileNotFoundError:
        raise OSError(f"no process with pid {target}") from None
    except PermissionError:
        raise OSError(
            f"cannot read the descriptors of pid {target}: permission denied "
            "(run it as that process's user, or as root)"
        ) from None
    _write([str(info) for info in infos])
    return OK


def _pid(value: str) -> str:
    if value == "self" or (value.isdigit() and int(value) > 0):
        return value
    raise argparse.ArgumentTypeError(f"not a process id or 'self': {value!r}")


def _path(value: str) -> str:
    if value:
        return value
    raise argparse.ArgumentTypeError("the socket path is empty")


def _count(value: str) -> int:
    if value.isdigit() and int(value) > 0:
        return int(value)
    raise argparse.ArgumentTypeError(f"not a positive number: {value!r}")


def _stream_flag(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--stream", action="store_true", help=help)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aiofdpass",
        description="Pass file descriptors over UNIX sockets, and look at them.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"aiofdpass {__version__}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "listen",
        help="listen on a socket path and print each record that arrives",
        description="Listen on PATH (mode 0600) and print one line per record: "
        "its data and each descriptor (kind, target, access), which is then "
        "closed. Runs until interrupted, or until --count records arrived.",
    )
    p.add_argument("path", metavar="PATH", type=_path)
    p.add_argument("--count", type=_count, metavar="N", help="stop after N records")
    _stream_flag(p, "unframed (FdStream) peers: print each read, not each record")
    p.set_defaults(run=_listen, is_async=True)

    p = commands.add_parser(
        "send",
        help="send data and open files as one record",
        description="Connect to PATH and send one record: --data and a "
        "descriptor for each --file (opened read-only).",
    )
    p.add_argument("path", metavar="PATH", type=_path)
    p.add_argument("--data", default="", metavar="TEXT", help="the record's data")
    p.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="PATH",
        help="open this file and send its descriptor (repeat for more)",
    )
    _stream_flag(p, "send unframed bytes (FdStream) instead of a record")
    p.set_defaults(run=_send, is_async=True)

    p = commands.add_parser(
        "inspect",
        help="list a process's open descriptors",
        description="List the open descriptors of process PID (or 'self'): "
        "kind, target and access mode, from /proc.",
    )
    p.add_argument("target", metavar="PID|self", type=_pid)
    p.set_defaults(run=_inspect, is_async=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); return the status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "send" and args.stream and args.file and not args.data:
        parser.error("send --stream --file needs --data: descriptors travel with bytes")
    try:
        if args.is_async:
            status: int = anyio.run(args.run, args)
        else:
            status = args.run(args)
    except KeyboardInterrupt:
        return INTERRUPTED
    except _OutputClosed as exc:
        if exc.error.errno == errno.EPIPE:  # `| head` had enough: no message
            # Nor one at exit, when Python flushes what stdout still buffers.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        else:
            print(f"aiofdpass {args.command}: error: {exc}", file=sys.stderr)
        return ERROR
    except (OSError, FdPassError, anyio.BrokenResourceError) as exc:
        print(f"aiofdpass {args.command}: error: {exc}", file=sys.stderr)
        return ERROR
    return status
