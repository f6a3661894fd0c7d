"""The syscall layer: ``sendmsg``/``recvmsg`` with descriptors on a non-blocking socket.

Everything that touches the socket lives here, including the one place where
``OSError`` becomes anyio's transport exceptions. The framing above it never
sees a socket; this layer never sees a record.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import anyio
import anyio.lowlevel
from anyio import BrokenResourceError, ClosedResourceError

from ._errors import DescriptorsLostError, LimitError
from ._fd import close_numbers
from ._message import SCM_MAX_FD

__all__ = ["ANCILLARY_BUFSIZE", "Transport", "parse_ancillary", "scm_rights"]

_INT_SIZE = array.array("i").itemsize

# SCM_PIDFD (Linux 6.5+, when SO_PASSPIDFD is on) carries a pidfd: a
# descriptor, which must be closed like any other. Python 3.11 lacks the name.
_SCM_PIDFD = getattr(socket, "SCM_PIDFD", 0x04 if sys.platform == "linux" else None)

#: Room for the most descriptors one sendmsg can carry, sized with CMSG_SPACE
#: (BSDs drop descriptors from a CMSG_LEN-sized buffer), plus the credentials
#: message that arrives first when SO_PASSCRED is on and a pidfd message with
#: SO_PASSPIDFD; without that room those would cause a false MSG_CTRUNC.
ANCILLARY_BUFSIZE = (
    socket.CMSG_SPACE(SCM_MAX_FD * _INT_SIZE)
    + socket.CMSG_SPACE(struct.calcsize("3i"))
    + socket.CMSG_SPACE(_INT_SIZE)
)

# Received descriptors are close-on-exec from the moment they exist, so a
# concurrent fork+exec cannot inherit them. Where the flag is missing
# (macOS) parse_ancillary sets FD_CLOEXEC right after the receive.
_CLOEXEC_FLAG = getattr(socket, "MSG_CMSG_CLOEXEC", 0)
# A peer that closed gives EPIPE, never SIGPIPE, even in a process that
# restored the default SIGPIPE handler.
_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
# A plain int: testing an IntFlag member costs a Python-level __and__.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


def scm_rights(fds: Sequence[int]) -> list[tuple[int, int, array.array[int]]]:
    """Return the ancillary data that passes ``fds`` (none for no descriptors)."""
    if not fds:
        return []
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]


def parse_ancillary(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """Return the numbers of the descriptors passed in ``ancdata``.

    The caller owns them (plain ints: wrapping each in an :class:`Fd` is
    left to whoever hands them to the user). Descriptors other than
    ``SCM_RIGHTS`` (a pidfd from ``SO_PASSPIDFD``) are closed; credentials
    are ignored. Should closing one of those fail, the passed ones are
    closed too before the error propagates: nothing is left unowned.
    """
    if len(ancdata) == 1:
        level, kind, data = ancdata[0]
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            if len(data) % _INT_SIZE:
                data = data[: len(data) - len(data) % _INT_SIZE]
            passed = array.array("i", data).tolist()
            if not _CLOEXEC_FLAG:  # pragma: no cover - Linux has MSG_CMSG_CLOEXEC
                _set_cloexec(passed)
            return passed
    passed = []
    others: list[int] = []
    for level, kind, data in ancdata:
        if level != socket.SOL_SOCKET:
            continue
        if kind == socket.SCM_RIGHTS or kind == _SCM_PIDFD:
            # A trailing partial int can appear when the buffer was cut.
            fds = array.array("i", data[: len(data) - len(data) % _INT_SIZE])
            (passed if kind == socket.SCM_RIGHTS else others).extend(fds)
    try:
        close_numbers(others)
    except OSError:
        close_numbers(passed)
        raise
    if not _CLOEXEC_FLAG:  # pragma: no cover - Linux has MSG_CMSG_CLOEXEC
        _set_cloexec(passed)
    return passed


def _set_cloexec(fds: list[int]) -> None:  # pragma: no cover - not on Linux
    for fd in fds:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def check_unix_stream(sock: socket.socket) -> None:
    """Raise ``ValueError`` unless ``sock`` is a usable AF_UNIX stream socket."""
    if not isinstance(sock, socket.socket):
        raise TypeError(
            f"expected a socket.socket, not {type(sock).__name__}; for a "
            "descriptor number use from_fd()"
        )
    if sock.fileno() < 0:
        raise OSError(errno.EBADF, "the socket is closed")
    if sock.family != socket.AF_UNIX:
        raise ValueError(
            f"descriptors can only travel over AF_UNIX sockets, not {sock.family!r}"
        )
    if sock.type != socket.SOCK_STREAM:
        raise ValueError(
            f"aiofdpass needs a SOCK_STREAM socket, not {sock.type!r}: "
            "framing is done by the library, and SOCK_SEQPACKET/SOCK_DGRAM "
            "truncate records that do not fit the read buffer"
        )


class Transport:
    """A connected, non-blocking AF_UNIX stream socket that it owns.

    Callers serialise their own access: one receiver at a time, one sender at
    a time. The transport knows whether it was closed (by us: calls raise
    ``ClosedResourceError``) or broken (calls raise ``BrokenResourceError``).
    """

    def __init__(self, sock: socket.socket) -> None:
        check_unix_stream(sock)
        sock.setblocking(False)
        self.sock = sock
        #: ``True`` while sending is possible: not closed, not broken, not
        #: shut down with send_eof (a cheap test for the hot path).
        self.can_send = True
        self.closed = False
        self.write_shut = False
        self._broken: BaseException | None = None
        self._broken_reason = ""
        # asyncio only: the future each direction waits on (True: reading).
        self._waiters: dict[bool, asyncio.Future[None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Called once when the transport breaks, to release what the layer
        #: above holds (buffered records and their descriptors).
        self.on_break: Callable[[], None] | None = None
        # A failed write breaks only the sending side: what the peer already
        # sent stays readable. The layer above drops its queued records.
        self._write_broken: BaseException | None = None
        self._write_broken_reason = ""
        self.on_write_break: Callable[[], None] | None = None

    # -- state ------------------------------------------------------------

    def check_open(self) -> None:
        """Raise if the transport was closed or broken."""
        if self.closed:
            raise ClosedResourceError("this channel was closed with aclose()")
        if self._broken is not None:
            raise BrokenResourceError(
                f"this channel is broken ({self._broken_reason}); close it and "
                "open a new connection"
            ) from self._broken

    def check_writable(self) -> None:
        """Raise if sending is no longer possible."""
        self.check_sending()
        if self.write_shut:
            raise ClosedResourceError(
                "the sending side was shut down with send_eof(); nothing more "
                "can be sent on this channel"
            )

    def check_sending(self) -> None:
        """Raise if the transport is closed, broken, or its sending side broke."""
        self.check_open()
        if self._write_broken is not None:
            raise BrokenResourceError(
                f"sending on this channel failed ({self._write_broken_reason}); "
                "records already received can still be read, then close it"
            ) from self._write_broken

    @property
    def broken(self) -> bool:
        """``True`` once the connection (or its sending side) broke."""
        return self._broken is not None or self._write_broken is not None

    def fail_write(self, exc: OSError) -> None:
        """Break the sending side after a write error outside any caller."""
        self.break_writes(exc, f"a write failed: {exc.strerror or exc}")

    def break_writes(self, exc: BaseException, reason: str) -> None:
        """Break the sending side only: the peer reads end of stream.

        Receiving goes on, so records the peer sent before it went away are
        not lost; later sends raise :class:`anyio.BrokenResourceError`.
        """
        if self._write_broken is None and self._broken is None and not self.closed:
            self.can_send = False
            self._write_broken = exc
            self._write_broken_reason = reason
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            if self.on_write_break is not None:
                self.on_write_break()

    async def wait_writable(self) -> None:
        """Wait until the socket can take more bytes."""
        await self._wait(False)

    def mark_broken(self, exc: BaseException, reason: str) -> None:
        """Break the connection: the peer sees end of stream, we see errors."""
        if self._broken is None and not self.closed:
            self.can_send = False
            self._broken = exc
            self._broken_reason = reason
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            if self.on_break is not None:
                self.on_break()

    def close(self) -> None:
        """Close the socket, waking every task waiting on it."""
        if not self.closed:
            self.can_send = False
            self.closed = True
            if self._waiters:
                # Our own asyncio waits: unregister the descriptor before it
                # is closed (uvloop aborts on a closed one), then wake them.
                loop = self._loop
                assert isinstance(loop, asyncio.AbstractEventLoop)
                fd = self.sock.fileno()
                for readable, fut in self._waiters.items():
                    (loop.remove_reader if readable else loop.remove_writer)(fd)
                    if not fut.done():
                        fut.set_exception(ClosedResourceError())
            elif self.sock.fileno() >= 0:
                anyio.notify_closing(self.sock)
            self.sock.close()

    def shutdown_write(self) -> None:
        """Shut down the sending direction (the peer reads end of stream)."""
        self.check_writable()
        self.can_send = False
        self.write_shut = True
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._raise_translated(exc, "send_eof")

    # -- I/O --------------------------------------------------------------

    async def recv_into(self, buf: memoryview) -> tuple[int, list[int]]:
        """Read once into ``buf``: return the byte count and the descriptors.

        The descriptors are plain numbers that the caller owns from the
        return on: hand them to an owner (the decoder, or :class:`Fd`
        objects) before anything else can fail.

        0 bytes means end of stream. Waits for readability only after
        ``EAGAIN``. The caller must have checkpointed already; once the
        syscall returns there is no await, so nothing read is lost to
        cancellation.

        :raises DescriptorsLostError: on ``MSG_CTRUNC``, after closing the
            descriptors that did arrive; the transport is then broken.
        """
        sock = self.sock
        while True:
            try:
                nbytes, ancdata, flags, _ = sock.recvmsg_into(
                    [buf], ANCILLARY_BUFSIZE, _CLOEXEC_FLAG
                )
            except BlockingIOError:
                await self._wait(True)
                continue
            except OSError as exc:
                self._raise_translated(exc, "receive")
            fds = parse_ancillary(ancdata) if ancdata else []
            if self._broken is not None:
                # Another task broke the connection while we waited.
                close_numbers(fds)
                self.check_open()
            if flags & _MSG_CTRUNC:
                got = len(fds)
                close_numbers(fds)
                lost = DescriptorsLostError(
                    f"the kernel dropped descriptors sent to this process "
                    f"(MSG_CTRUNC; {got} arrived and were closed). Usually the "
                    "process is at its open-file limit (RLIMIT_NOFILE): close "
                    "descriptors or raise the limit, then reconnect"
                )
                self.mark_broken(lost, "descriptors were lost (MSG_CTRUNC)")
                raise lost
            return nbytes, fds

    def try_send(self, data: bytes, fds: Sequence[int]) -> int:
        """Write what the socket takes of ``data`` now, ``fds`` with it.

        Returns the number of bytes written, or -1 if the socket was full
        (nothing written, nothing sent).

        :raises OSError: ``EBADF`` if a descriptor is not open (nothing sent).
        :raises LimitError: ``ETOOMANYREFS`` (nothing sent).
        :raises anyio.BrokenResourceError: if the connection failed.
        """
        ancdata = scm_rights(fds)
        try:
            return self.sock.sendmsg([data], ancdata, _SEND_FLAGS)
        except BlockingIOError:
            return -1
        except OSError as exc:
            self._raise_descriptor_error(exc, fds)
            self._raise_translated(exc, "send")

    async def send_all(self, buffers: list[memoryview], fds: Sequence[int]) -> None:
        """Write every byte of ``buffers``; ``fds`` go with the first ``sendmsg``.

        Later ``sendmsg`` calls of the same write carry no control message:
        sending the descriptors again would duplicate them. If this fails or
        is cancelled after some bytes were written, the transport is broken
        (the peer sees end of stream in the middle of a record); if it fails
        before any byte was written, nothing was sent and the caller still
        owns its descriptors.

        :raises OSError: ``EBADF`` if a descriptor is not open (nothing sent).
        :raises LimitError: ``ETOOMANYREFS``: too many descriptors in flight.
        """
        ancdata = scm_rights(fds)
        sock = self.sock
        sent_any = False
        try:
            while True:
                try:
                    sent = sock.sendmsg(buffers, ancdata, _SEND_FLAGS)
                except BlockingIOError:
                    await self._wait(False)
                    continue
                except OSError as exc:
                    if not sent_any:
                        self._raise_descriptor_error(exc, fds)
                    self._raise_translated(exc, "send")
                sent_any = True
                ancdata = []
                # Drop what was written; keep the rest for the next call.
                while sent:
                    first = buffers[0]
                    if sent >= len(first):
                        sent -= len(first)
                        del buffers[0]
                    else:
                        buffers[0] = first[sent:]
                        sent = 0
                while buffers and not buffers[0]:
                    del buffers[0]
                if not buffers:
                    return
        except BaseException as exc:
            if sent_any and buffers:
                self.break_writes(
                    exc, "a send was interrupted after part of a record was written"
                )
            raise

    # -- internals --------------------------------------------------------

    async def _wait(self, readable: bool) -> None:
        """Wait until the socket is readable (or writable).

        On asyncio and uvloop this waits on a future with ``add_reader`` /
        ``add_writer`` directly (about half the cost of the generic path, and
        ping-pong traffic waits once per message); elsewhere it uses anyio.
        Either way it is a cancellation point and :meth:`close` wakes it with
        :class:`anyio.ClosedResourceError`.
        """
        # Looked up each time (cheap): a channel may outlive one event loop.
        loop = self._loop = asyncio._get_running_loop()
        if loop is None:
            waiter = anyio.wait_readable if readable else anyio.wait_writable
            try:
                await waiter(self.sock)
            except ClosedResourceError:
                raise ClosedResourceError(
                    "this channel was closed with aclose() while waiting"
                ) from None
            return
        fd = self.sock.fileno()
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters[readable] = fut
        add, remove = (
            (loop.add_reader, loop.remove_reader)
            if readable
            else (loop.add_writer, loop.remove_writer)
        )
        add(fd, _wake, fut)
        try:
            await fut
        except ClosedResourceError:
            raise ClosedResourceError(
                "this channel was closed with aclose() while waiting"
            ) from None
        finally:
            del self._waiters[readable]
            if not self.closed:
                remove(fd)

    def _raise_descriptor_error(self, exc: OSError, fds: Sequence[int]) -> None:
        """Raise the error for a ``sendmsg`` that refused our descriptors."""
        if exc.errno == errno.EBADF and fds and not self.closed:
            for fd in fds:
                try:
                    fcntl.fcntl(fd, fcntl.F_GETFD)
                except OSError:
                    raise OSError(
                        errno.EBADF,
                        f"descriptor {fd} is not open (was it closed before "
                        "send?); nothing was sent",
                    ) from None
        if exc.errno == errno.ETOOMANYREFS:
            raise LimitError(
                "the kernel refused the descriptors (ETOOMANYREFS): this "
                "process has more descriptors in flight than its "
                "RLIMIT_NOFILE allows; wait for the peer to receive some, "
                "or raise the limit. Nothing was sent"
            ) from exc

    def _raise_translated(self, exc: OSError, what: str) -> NoReturn:
        if self.closed:
            raise ClosedResourceError(
                f"this channel was closed with aclose() during {what}"
            ) from None
        reason = f"{what} failed: {exc.strerror or exc}"
        if what == "send":
            self.break_writes(exc, reason)
            raise BrokenResourceError(
                f"{reason}; the peer is gone or stopped reading. Records it "
                "sent before can still be received; then close this channel"
            ) from exc
        self.mark_broken(exc, reason)
        raise BrokenResourceError(
            f"{reason}; the connection is gone, close this channel"
        ) from exc
