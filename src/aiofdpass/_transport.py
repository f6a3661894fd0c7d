"""The syscall layer: ``sendmsg``/``recvmsg`` with descriptors on a non-blocking socket.

Everything that touches the socket lives here, including the one place where
``OSError`` becomes anyio's transport exceptions. The framing above it never
sees a socket; this layer never sees a record.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, NoReturn

from anyio import BrokenResourceError, ClosedResourceError

from ._backend import Driver, current_driver
from ._errors import DescriptorsLostError, LimitError, ProtocolError
from ._fd import close_numbers
from ._message import SCM_MAX_FD

if TYPE_CHECKING:
    from typing_extensions import Buffer

    from ._outbox import Outbox, PacketOutbox

__all__ = [
    "ANCILLARY_BUFSIZE",
    "BROKEN",
    "CLOSED",
    "OPEN",
    "SHUT",
    "Packet",
    "PacketTooLargeError",
    "Transport",
    "check_unix_socket",
    "credentials_in",
    "parse_ancillary",
    "scm_rights",
]

logger = logging.getLogger("aiofdpass")

_INT_SIZE = array.array("i").itemsize

# SCM_PIDFD (Linux 6.5+, when SO_PASSPIDFD is on) carries a pidfd: a
# descriptor, which must be closed like any other. Python 3.11 lacks the name.
_SCM_PIDFD = getattr(socket, "SCM_PIDFD", 0x04 if sys.platform == "linux" else None)
_SCM_CREDENTIALS = getattr(socket, "SCM_CREDENTIALS", None)

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
_MSG_TRUNC = int(socket.MSG_TRUNC)
# The next packet's length, with no control buffer: no descriptor is
# installed (peeking with one would duplicate them on every peek).
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_TRUNC
_PEEK_BUF = bytearray(1)
_UCRED = struct.Struct("3i")


class PacketTooLargeError(LimitError):
    """``EMSGSIZE`` from a ``SOCK_SEQPACKET`` send: nothing was sent.

    The packet is over the socket's ``SO_SNDBUF`` less 32 bytes (the buffer
    shrank after the channel was made); the caller keeps its descriptors.
    """


class Packet(NamedTuple):
    """One packet as :meth:`Transport.try_recv_packet` received it."""

    data: bytes
    fds: list[int]
    #: ``(pid, uid, gid)`` from ``SCM_CREDENTIALS``, if it came.
    credentials: tuple[int, int, int] | None
    #: The sender's address as the socket module gives it (``None``: unbound).
    address: object
    #: A control message came: tells an empty packet from end of stream.
    control: bool


def credentials_in(
    ancdata: Sequence[tuple[int, int, bytes]],
) -> tuple[int, int, int] | None:
    """Return ``(pid, uid, gid)`` from an ``SCM_CREDENTIALS`` message, if any."""
    for level, kind, data in ancdata:
        if (
            level == socket.SOL_SOCKET
            and kind == _SCM_CREDENTIALS
            and len(data) >= _UCRED.size
        ):
            pid, uid, gid = _UCRED.unpack_from(data)
            return pid, uid, gid
    return None


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


_KIND_NAMES: dict[int, str] = {
    socket.SOCK_STREAM: "SOCK_STREAM",
    socket.SOCK_SEQPACKET: "SOCK_SEQPACKET",
    socket.SOCK_DGRAM: "SOCK_DGRAM",
}


def check_unix_socket(sock: socket.socket, types: Sequence[int], advice: str) -> None:
    """Raise unless ``sock`` is an open AF_UNIX socket of one of ``types``.

    ``advice`` ends the ``ValueError`` for a socket of another type: what
    the caller should use instead. A stream or SEQPACKET socket must be
    connected (not listening); a datagram socket need not be.
    """
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
    if sock.type not in types:
        wanted = " or ".join(_KIND_NAMES[t] for t in types)
        raise ValueError(
            f"this needs an AF_UNIX {wanted} socket, not "
            f"{_KIND_NAMES.get(sock.type, repr(sock.type))}: {advice}"
        )
    if sock.type == socket.SOCK_DGRAM:
        return  # a datagram socket need not be connected
    try:
        sock.getpeername()
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError(
                "this socket is listening, not connected: adopt the "
                "connections its accept() returns (or use aiofdpass.listen())"
            ) from None
        raise ValueError(
            "this socket is not connected: connect it first (or use "
            "aiofdpass.connect() or channel_pair())"
        ) from None


# The state of one direction of a transport. Sending can also be shut down
# (send_eof); both directions are closed together.
OPEN = "open"
SHUT = "shut down"
BROKEN = "broken"
CLOSED = "closed"

# Serialises the slow path of Transport.enter (a socket changing loops).
_ENTER_LOCK = threading.Lock()

# What a call on a direction in that state raises: (class, message, cause).
_Failure = tuple[type[Exception], str, BaseException | None]
_CLOSED: _Failure = (ClosedResourceError, "this channel was closed with aclose()", None)
_SHUT: _Failure = (
    ClosedResourceError,
    "the sending side was shut down with send_eof(); nothing more can be "
    "sent on this channel",
    None,
)


class Transport:
    """A connected, non-blocking AF_UNIX stream socket that it owns.

    The only code that calls ``sendmsg`` and ``recvmsg``, and the one place
    where ``OSError`` becomes anyio's transport exceptions. Its state is one
    value per direction (:data:`OPEN`, :data:`SHUT`, :data:`BROKEN`,
    :data:`CLOSED`), read by one check per direction. A failed write breaks
    only the sending direction, so records the peer already sent stay
    readable; a broken stream (lost descriptors, a framing error) breaks
    both. Callers serialise their own access: one receiver and one writer
    at a time.
    """

    __slots__ = (
        "_recv_failure",
        "_send_failure",
        "driver",
        "on_new_loop",
        "on_recv_break",
        "on_send_break",
        "packets",
        "recv_state",
        "send_state",
        "sock",
        "writing",
    )

    def __init__(
        self,
        sock: socket.socket,
        types: Sequence[int] = (socket.SOCK_STREAM,),
        advice: str = "use FdDatagramSocket for SOCK_DGRAM",
    ) -> None:
        check_unix_socket(sock, types, advice)
        sock.setblocking(False)
        self.sock = sock
        #: The kernel keeps message boundaries (``SOCK_SEQPACKET``, ``SOCK_DGRAM``):
        #: one ``sendmsg`` per record, never coalesced.
        self.packets = sock.type != socket.SOCK_STREAM
        self.send_state = OPEN
        self.recv_state = OPEN
        self._send_failure: _Failure = _CLOSED
        self._recv_failure: _Failure = _CLOSED
        #: The event loop the socket is used from (see :meth:`enter`).
        self.driver: Driver | None = None
        #: Called when the socket moves to another event loop.
        self.on_new_loop: Callable[[], None] | None = None
        #: Called once when sending breaks (the layer above drops its queue),
        #: and once when receiving breaks (it closes what it buffered).
        self.on_send_break: Callable[[], None] | None = None
        self.on_recv_break: Callable[[], None] | None = None
        #: ``True`` while :meth:`write_queue` runs (a finaliser must not
        #: close the queue under it).
        self.writing = False

    # -- state ------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` ran."""
        return self.recv_state is CLOSED

    def enter(self) -> Driver:
        """Return the running loop's driver; the socket belongs to it from now on.

        :raises RuntimeError: while another event loop that used the socket
            still runs, or with no running event loop.
        """
        old = self.driver
        if old is not None and old.is_current():
            return old
        with _ENTER_LOCK:  # two threads' first calls: one loop wins
            old = self.driver
            driver = current_driver(self.sock, old)
            if driver is not old:
                self.driver = driver
                if old is not None and self.on_new_loop is not None:
                    self.on_new_loop()
        return driver

    def check_send(self) -> None:
        """Raise the error for sending in the current state, if not open."""
        if self.send_state is not OPEN:
            _raise(self._send_failure)

    def check_recv(self) -> None:
        """Raise the error for receiving in the current state, if not open."""
        if self.recv_state is not OPEN:
            _raise(self._recv_failure)

    def break_send(self, exc: BaseException, reason: str) -> None:
        """Break the sending direction only: the peer reads end of stream.

        Receiving goes on, so records the peer sent before it went away are
        not lost; later sends raise :class:`anyio.BrokenResourceError`.
        """
        if self.send_state is not OPEN:
            return
        self.send_state = BROKEN
        self._send_failure = (
            BrokenResourceError,
            f"sending on this channel failed ({reason}); records already "
            "received can still be read, then close it",
            exc,
        )
        logger.debug("fd %d: sending broke (%s): %r", self.sock.fileno(), reason, exc)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        if self.on_send_break is not None:
            self.on_send_break()

    def break_all(self, exc: BaseException, reason: str) -> None:
        """Break both directions: the peer sees end of stream, we see errors."""
        if self.closed or self.recv_state is BROKEN:
            return
        failure: _Failure = (
            BrokenResourceError,
            f"this channel is broken ({reason}); close it and open a new connection",
            exc,
        )
        logger.debug("fd %d: broken (%s): %r", self.sock.fileno(), reason, exc)
        send_was_open = self.send_state is OPEN
        self.send_state = self.recv_state = BROKEN
        self._send_failure = self._recv_failure = failure
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if send_was_open and self.on_send_break is not None:
            self.on_send_break()
        if self.on_recv_break is not None:
            self.on_recv_break()

    def shutdown_write(self) -> None:
        """Shut down the sending direction (the peer reads end of stream)."""
        self.check_send()
        self.send_state = SHUT
        self._send_failure = _SHUT
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._raise_translated(exc, "send_eof")

    def close(self) -> None:
        """Close the socket, waking every task waiting on it."""
        if self.closed:
            return
        self.send_state = self.recv_state = CLOSED
        self._send_failure = self._recv_failure = _CLOSED
        if self.driver is not None and self.sock.fileno() >= 0:
            self.driver.notify_closing()
        self.sock.close()

    # -- receiving --------------------------------------------------------

    def try_recv_into(self, buf: memoryview) -> tuple[int, list[int]] | None:
        """Read once into ``buf`` without waiting: the byte count and descriptors.

        ``None`` if nothing is there yet; 0 bytes means end of stream (also
        for ``ECONNRESET``: the peer closed without reading all we sent). The
        descriptors are plain numbers that the caller owns from the return
        on: hand them to an owner (the decoder, or :class:`Fd` objects)
        before anything else can fail.

        :raises DescriptorsLostError: on ``MSG_CTRUNC``, after closing the
            descriptors that did arrive; the transport is then broken.
        """
        try:
            nbytes, ancdata, flags, _ = self.sock.recvmsg_into(
                [buf], ANCILLARY_BUFSIZE, _CLOEXEC_FLAG
            )
        except BlockingIOError:
            return None
        except ConnectionResetError:
            # The peer closed with data of ours unread. Linux says so once,
            # only after everything the peer sent has been read: its
            # direction ended there, as with a close (the next read says
            # end of stream). A later send gets EPIPE.
            if self.recv_state is not OPEN:
                self.check_recv()
            return 0, []
        except OSError as exc:
            self._raise_translated(exc, "receive")
        if not ancdata:
            fds = []
        elif (
            len(ancdata) == 1
            and _CLOEXEC_FLAG
            and ancdata[0][1] == socket.SCM_RIGHTS
            and ancdata[0][0] == socket.SOL_SOCKET
            and not len(ancdata[0][2]) % _INT_SIZE
        ):
            # The common case, without a call: one SCM_RIGHTS block
            # (parse_ancillary's own first branch, inlined for the read path).
            fds = array.array("i", ancdata[0][2]).tolist()
        else:
            fds = parse_ancillary(ancdata)
        if self.recv_state is not OPEN:
            # Another task broke or closed the connection meanwhile.
            close_numbers(fds)
            self.check_recv()
        if flags & _MSG_CTRUNC:
            got = len(fds)
            close_numbers(fds)
            lost = DescriptorsLostError(
                f"the kernel dropped descriptors sent to this process "
                f"(MSG_CTRUNC; {got} arrived and were closed). Usually the "
                "process is at its open-file limit (RLIMIT_NOFILE): close "
                "descriptors or raise the limit, then reconnect"
            )
            self.break_all(lost, "descriptors were lost (MSG_CTRUNC)")
            raise lost
        return nbytes, fds

    async def recv_into(self, buf: memoryview) -> tuple[int, list[int]]:
        """Read once into ``buf``, waiting for data if there is none yet.

        The descriptors are the caller's, as with :meth:`try_recv_into`.

        The caller must have checkpointed already; once the syscall returns
        there is no await, so nothing read is lost to cancellation.
        """
        while True:
            got = self.try_recv_into(buf)
            if got is not None:
                return got
            assert self.driver is not None
            await self.driver.wait_readable()

    def try_recv_packet(self, max_bytes: int, max_fds: int) -> Packet | None:
        """Receive one whole packet (``SOCK_SEQPACKET``, ``SOCK_DGRAM``) now.

        ``None`` if nothing is there yet. The packet's length is learnt first
        with ``MSG_PEEK|MSG_TRUNC`` and no control buffer (which installs no
        descriptor), so a packet over ``max_bytes`` is consumed without a
        control buffer: the kernel drops its descriptors, they never enter
        this process. The kernel keeps the boundaries, so one bad packet
        never spoils the next, and the transport stays usable.

        A packet of 0 bytes with no control message at all is end of stream
        on a ``SOCK_SEQPACKET`` socket (:attr:`Packet.control` is ``False``):
        the kernel returns the same for both unless ``SO_PASSCRED`` attaches
        credentials to every packet.

        :raises ProtocolError: for a packet over ``max_bytes`` or with more
            than ``max_fds`` descriptors (those that arrived are closed).
        :raises DescriptorsLostError: on ``MSG_CTRUNC`` (those that arrived
            are closed).
        """
        sock = self.sock
        try:
            try:
                length = sock.recv_into(_PEEK_BUF, 1, _PEEK_FLAGS)
            except ConnectionResetError:
                # The peer closed with packets of ours unread. Linux says so
                # once, and on a packet socket before the packets the peer
                # sent (a stream says it after them): read on.
                length = sock.recv_into(_PEEK_BUF, 1, _PEEK_FLAGS)
            if length > max_bytes:
                sock.recvmsg_into([_PEEK_BUF], 0, 0)  # no control buffer
        except BlockingIOError:
            return None
        except OSError as exc:
            self._raise_translated(exc, "receive")
        if length > max_bytes:
            raise ProtocolError(
                f"a {length}-byte packet arrived, over this side's limit of "
                f"{max_bytes} bytes (Limits.max_payload); it was discarded and "
                "its descriptors closed. Raise the limit if that is intended"
            )
        try:
            data, ancdata, flags, address = sock.recvmsg(
                length, ANCILLARY_BUFSIZE, _CLOEXEC_FLAG
            )
        except (BlockingIOError, ConnectionResetError):  # pragma: no cover
            return None  # another reader took it, or a reset came meanwhile
        except OSError as exc:
            self._raise_translated(exc, "receive")
        fds = parse_ancillary(ancdata) if ancdata else []
        if self.recv_state is not OPEN:
            close_numbers(fds)
            self.check_recv()
        if flags & (_MSG_CTRUNC | _MSG_TRUNC):
            close_numbers(fds)
            if flags & _MSG_TRUNC:  # pragma: no cover - another reader raced us
                raise ProtocolError(
                    "a packet was cut short (MSG_TRUNC): another process "
                    "reads this socket too; it was discarded"
                )
            raise DescriptorsLostError(
                f"the kernel dropped descriptors attached to a packet "
                f"(MSG_CTRUNC; {len(fds)} arrived and were closed, the packet "
                "was discarded). Usually this process is at its open-file "
                "limit (RLIMIT_NOFILE): close descriptors or raise the limit"
            )
        if len(fds) > max_fds:
            close_numbers(fds)
            raise ProtocolError(
                f"a packet carried {len(fds)} descriptors, over this side's "
                f"max_fds of {max_fds}; it was discarded and its descriptors "
                "closed"
            )
        return Packet(data, fds, credentials_in(ancdata), address, bool(ancdata))

    def try_send_to(
        self, data: Sequence[Buffer], fds: Sequence[int], to: str | bytes | None
    ) -> bool:
        """Send one datagram to address ``to`` now; ``False`` if it must wait.

        ``to=None`` sends to the connected peer.

        :raises OSError: as ``sendmsg`` does (nothing was sent): ``EBADF``
            for a closed descriptor, ``ECONNREFUSED``/``ENOENT`` for nobody
            at ``to``, ``EMSGSIZE`` for a datagram over the send buffer.
        :raises LimitError: ``ETOOMANYREFS`` (nothing sent).
        """
        try:
            self.sock.sendmsg(data, scm_rights(fds), _SEND_FLAGS, to)
        except BlockingIOError:
            return False
        except OSError as exc:
            if self.closed:
                raise ClosedResourceError(
                    "this socket was closed with aclose()"
                ) from None
            self._raise_descriptor_error(exc, fds)
            raise
        return True

    # -- sending ----------------------------------------------------------

    def try_send(self, data: bytes, fds: Sequence[int]) -> int:
        """Write what the socket takes of ``data`` now, ``fds`` with it.

        Returns the number of bytes written, or -1 if the socket was full
        (nothing written, nothing sent).

        :raises OSError: ``EBADF`` if a descriptor is not open (nothing sent).
        :raises LimitError: ``ETOOMANYREFS`` (nothing sent).
        :raises anyio.BrokenResourceError: if the connection failed.
        """
        try:
            return self.sock.sendmsg(
                [data],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                if fds
                else (),
                _SEND_FLAGS,
            )
        except BlockingIOError:
            return -1
        except OSError as exc:
            self._raise_descriptor_error(exc, fds)
            self._raise_packet_too_large(exc)
            self._raise_translated(exc, "send")

    def write_queue(self, queue: Outbox | PacketOutbox) -> bool:
        """Write as much of ``queue`` as the socket takes now; ``True`` once empty.

        :raises LimitError: ``ETOOMANYREFS``; nothing of the segment at the
            head was written.
        :raises anyio.BrokenResourceError: if the connection failed (the
            sending direction is broken then).
        """
        sock = self.sock
        self.writing = True
        try:
            while queue:
                buf, pos, fds = queue.peek()
                try:
                    with memoryview(buf) as view:
                        sent = sock.sendmsg([view[pos:]], scm_rights(fds), _SEND_FLAGS)
                except BlockingIOError:
                    return False
                except OSError as exc:
                    self._raise_descriptor_error(exc, ())
                    self._raise_translated(exc, "send")
                if not queue.advance(sent):
                    return False
            return True
        finally:
            self.writing = False

    async def send_all(self, buffers: list[memoryview], fds: Sequence[int]) -> None:
        """Write every byte of ``buffers``; ``fds`` go with the first ``sendmsg``.

        Later ``sendmsg`` calls of the same write carry no control message:
        sending the descriptors again would duplicate them. If this fails or
        is cancelled after some bytes were written, sending is broken (the
        peer sees end of stream in the middle of a record); if it fails
        before any byte was written, nothing was sent and the caller still
        owns its descriptors.

        :raises OSError: ``EBADF`` if a descriptor is not open (nothing sent).
        :raises LimitError: ``ETOOMANYREFS``: too many descriptors in flight.
        """
        if not buffers:
            return
        ancdata = scm_rights(fds)
        sock = self.sock
        sent_any = False
        try:
            while True:
                try:
                    sent = sock.sendmsg(buffers, ancdata, _SEND_FLAGS)
                except BlockingIOError:
                    assert self.driver is not None
                    await self.driver.wait_writable()
                    self.check_send()
                    continue
                except OSError as exc:
                    if not sent_any:
                        self._raise_descriptor_error(exc, fds)
                        self._raise_packet_too_large(exc)
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
                self.break_send(
                    exc, "a send was interrupted after part of a record was written"
                )
            raise

    # -- internals --------------------------------------------------------

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

    def _raise_packet_too_large(self, exc: OSError) -> None:
        """Raise for ``EMSGSIZE`` on a SEQPACKET socket: nothing was sent.

        The channel checks a packet's size against ``SO_SNDBUF`` when it is
        made; this is the kernel's answer if the buffer shrank since. Only
        a direct write raises it: a queued packet's ``send`` has returned.
        """
        if exc.errno == errno.EMSGSIZE and self.sock.type == socket.SOCK_SEQPACKET:
            raise PacketTooLargeError(
                "the kernel refused the packet (EMSGSIZE): it is over this "
                "socket's SO_SNDBUF less 32 bytes. Nothing was sent; split "
                "the record or raise SO_SNDBUF"
            ) from exc

    def _raise_translated(self, exc: OSError, what: str) -> NoReturn:
        if self.closed:
            raise ClosedResourceError(
                f"this channel was closed with aclose() during {what}"
            ) from None
        reason = f"{what} failed: {exc.strerror or exc}"
        if what == "send":
            self.break_send(exc, reason)
            raise BrokenResourceError(
                f"{reason}; the peer is gone or stopped reading. Records it "
                "sent before can still be received; then close this channel"
            ) from exc
        self.break_all(exc, reason)
        raise BrokenResourceError(
            f"{reason}; the connection is gone, close this channel"
        ) from exc


def _raise(failure: _Failure) -> NoReturn:
    cls, message, cause = failure
    raise cls(message) from cause
