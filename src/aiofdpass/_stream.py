"""`FdStream`: the unframed layer, bytes and descriptors as the kernel delivers them."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import anyio
from anyio import DelimiterNotFound, EndOfStream, IncompleteRead
from anyio.abc import ByteStream

from ._connection import Connection, adopt_fd
from ._convert import as_fd_list, close_sent, filenos_of
from ._errors import LimitError
from ._fd import Fd
from ._inbox import Inbox
from ._message import SCM_MAX_FD
from ._statistics import StreamStatistics

if TYPE_CHECKING:
    from typing_extensions import Buffer, Self

__all__ = ["FdStream", "stream_pair"]

# The most one read asks the kernel for: a peer's length field (or a caller's
# max_bytes) may be huge, and the buffer grows only with what really arrives.
_READ_CAP = 1024 * 1024
# receive_until reads at most this much at a time past what it has.
_UNTIL_READ = 64 * 1024
# sendmsg takes at most IOV_MAX (1024) buffers; more are joined first.
_MAX_BUFFERS = 64
# How many received descriptors may wait untaken before a read is refused.
DEFAULT_MAX_QUEUED_FDS = 256


class FdStream(Connection, ByteStream):
    """A byte stream over an AF_UNIX socket that carries descriptors too.

    No framing: use it to speak a protocol aiofdpass did not invent (APUE's
    ``send_fd``, an nginx-style channel, vhost-user, D-Bus, Wayland...;
    ``docs/foreign-protocols.md`` has worked recipes). It is an
    :class:`anyio.abc.ByteStream`, so anyio's tools such as
    :class:`~anyio.streams.buffered.BufferedByteReceiveStream` wrap it.

    Which descriptors go with which bytes: on a stream socket the kernel
    hands over the descriptors of one ``sendmsg`` with the read that returns
    the first byte of that ``sendmsg``; that read may also return plain
    bytes sent before it, and it does not say which byte they rode on. So
    :meth:`receive_exactly`, :meth:`receive_until` and
    :meth:`receive_with_fds` return, with their bytes, every queued
    descriptor that arrived no later than the last of those bytes: a
    descriptor comes with the first call that returns any byte of its
    ``sendmsg``, never later, and earlier only if the kernel glued earlier
    bytes to its read. :meth:`receive_exactly` asks the kernel for no more
    than it needs, which makes it exact, unless it returns bytes that an
    earlier call read ahead (a :meth:`receive_until`, or a cancelled or
    incomplete read for more bytes). Protocols that count their
    descriptors in a header should take that many with :meth:`take_fds`.
    :meth:`receive` returns bytes only and leaves the descriptors queued.
    Nothing is ever dropped; :meth:`aclose` closes what is still queued, and
    so does a stream that breaks (lost descriptors, ``MSG_CTRUNC``).
    Descriptors sent with no bytes at all never arrive: Linux drops them.

    The queue is bounded: once :attr:`max_queued_fds` descriptors wait
    untaken, the next call that would read refuses with :class:`LimitError`
    before it reads (nothing is lost; take them and call again), so a peer
    cannot fill the process's descriptor table through a reader that only
    wants bytes.
    """

    _max_queued_fds = DEFAULT_MAX_QUEUED_FDS

    def __init__(self, sock: socket.socket) -> None:
        """Adopt ``sock``; prefer :meth:`from_socket`, which documents this."""
        if (
            isinstance(sock, socket.socket)
            and sock.fileno() >= 0
            and sock.family == socket.AF_UNIX
            and sock.type != socket.SOCK_STREAM
        ):
            raise ValueError(
                f"FdStream is a byte stream and needs a SOCK_STREAM socket, not "
                f"{sock.type!r}; make the socket with socket.SOCK_STREAM"
            )
        self._inbox = Inbox()  # before the repr in the "opened" debug log
        super().__init__(sock)
        self._receive_guard = anyio.ResourceGuard("receiving from")
        # A broken stream closes what it received at once, as a channel does:
        # no read can return it any more.
        self._transport.on_recv_break = self._inbox.close

    @classmethod
    def from_socket(cls, sock: socket.socket) -> Self:
        """Adopt a connected AF_UNIX stream socket; the stream owns it now.

        :raises ValueError: if it is not a connected AF_UNIX ``SOCK_STREAM``
            socket (a listening one included).
        """
        return cls(sock)

    @classmethod
    def from_fd(cls, fd: int | Fd) -> Self:
        """Adopt a connected AF_UNIX stream socket by number, or as an :class:`Fd`.

        The stream owns the descriptor only once this returns (an ``Fd`` is
        then taken); if it raises, the caller still owns it.

        :raises TypeError: if ``fd`` is neither an ``int`` nor an ``Fd``.
        :raises OSError: ``EBADF`` or ``ENOTSOCK`` if ``fd`` is not an open
            socket.
        :raises ValueError: if it is not a connected AF_UNIX ``SOCK_STREAM``
            socket (a listening one included), or the ``Fd`` is closed.
        """
        return adopt_fd(fd, cls)

    @property
    def queued_fds(self) -> int:
        """How many received descriptors wait in the queue (see :meth:`take_fds`)."""
        return self._inbox.queued_fds

    @property
    def max_queued_fds(self) -> int:
        """The most untaken descriptors a read may start with (default 256).

        A read is refused with :class:`LimitError` while :attr:`queued_fds`
        is at least this; one read brings at most 253 more (the kernel's
        ``SCM_MAX_FD``), so the queue never holds more than this plus 253.
        Set it on a stream that expects more descriptors per message.

        :raises ValueError: when set to less than 1.
        :raises TypeError: when set to something that is not an ``int``.
        """
        return self._max_queued_fds

    @max_queued_fds.setter
    def max_queued_fds(self, value: int) -> None:
        _check_size("max_queued_fds", value, 1)
        self._max_queued_fds = value

    def take_fds(self, n: int | None = None) -> list[Fd]:
        """Take the oldest ``n`` queued descriptors, or all of them for ``None``.

        Returns at most as many as are queued (:attr:`queued_fds`); the
        caller owns them. Use it when the protocol says how many descriptors
        a message carries, and check the count yourself: a missing
        descriptor means the peer broke the protocol.

        :raises TypeError: if ``n`` is neither an ``int`` nor ``None``.
        :raises ValueError: if ``n`` is negative.
        """
        if n is not None:
            if isinstance(n, bool) or not isinstance(n, int):
                raise TypeError(f"take_fds(n): n must be an int or None, not {n!r}")
            if n < 0:
                raise ValueError(f"take_fds(n): n must be 0 or more, got {n}")
        return self._inbox.take_fds(n)

    async def send(
        self,
        data: Buffer | Sequence[Buffer],
        fds: Iterable[object] = (),
        *,
        close_fds: bool = False,
    ) -> None:
        """Write all of ``data``; ``fds`` travel with its first byte.

        ``data`` is a bytes-like object, or a sequence of them written one
        after the other (a header and a payload, without joining them).
        Concurrent sends are serialised. See :meth:`FdChannel.send` for what
        ``fds`` may contain, ``close_fds``, and cancellation (a send
        cancelled after part of ``data`` was written breaks the stream).

        :raises TypeError: if ``data`` is not bytes-like.
        :raises ValueError: if ``fds`` is given with empty ``data`` (the
            kernel silently drops descriptors sent with no bytes).
        :raises LimitError: for more than 253 descriptors.
        :raises anyio.ClosedResourceError: after :meth:`aclose` or
            :meth:`send_eof`.
        :raises anyio.BrokenResourceError: if the connection failed.
        """
        try:
            views = [memoryview(data).cast("B")]  # type: ignore[arg-type]
        except TypeError:
            # A str or a strided memoryview is a Sequence too, but not of buffers.
            if isinstance(data, (str, memoryview)) or not isinstance(data, Sequence):
                raise _not_bytes(data) from None
            views = [_byte_view(part) for part in data]
        views = [view for view in views if view]
        if len(views) > _MAX_BUFFERS:
            views = [memoryview(b"".join(views))]
        objs = as_fd_list(fds)
        numbers = filenos_of(objs)
        if numbers and not views:
            raise ValueError(
                "descriptors need at least one byte of data to travel with: "
                "the kernel silently drops descriptors sent with no bytes"
            )
        if len(numbers) > SCM_MAX_FD:
            raise LimitError(
                f"{len(numbers)} descriptors in one send, over the kernel's "
                f"{SCM_MAX_FD} per sendmsg; split them. Nothing was sent"
            )
        nbytes = sum(map(len, views))  # send_bytes() consumes the list
        await self._writer.send_bytes(views, numbers)
        self._bytes_sent += nbytes
        self._fds_sent += len(numbers)
        if close_fds:
            await close_sent(objs)

    async def receive(self, max_bytes: int = 65536) -> bytes:
        """Return up to ``max_bytes`` bytes; their descriptors go to the queue.

        Bytes already buffered (left by :meth:`receive_exactly` or
        :meth:`receive_until`) come first, without a read; otherwise it
        reads once. Never returns an empty ``bytes``. Take the descriptors
        with :meth:`take_fds` (or with the next call that returns
        descriptors). Cancellation loses nothing.

        :raises ValueError: if ``max_bytes`` is under 1.
        :raises anyio.EndOfStream: when the peer closed its sending side
            and every byte was returned.
        :raises DescriptorsLostError: on ``MSG_CTRUNC``; the stream is broken,
            and the bytes and descriptors it buffered are closed.
        :raises LimitError: if it had to read while :attr:`max_queued_fds`
            descriptors wait untaken; nothing was read.
        :raises anyio.BusyResourceError: if another task is receiving.
        :raises anyio.ClosedResourceError: after :meth:`aclose`.
        :raises anyio.BrokenResourceError: after the stream broke.
        """
        return self._inbox.take(await self._buffered(max_bytes))

    async def receive_with_fds(self, max_bytes: int = 65536) -> tuple[bytes, list[Fd]]:
        """Read once: return up to ``max_bytes`` and the descriptors that came too.

        The descriptors are every queued one that arrived no later than the
        last byte returned (see the class's rule), including those a
        :meth:`receive` left queued. Bytes already buffered come first,
        without a read.

        :raises ValueError: if ``max_bytes`` is under 1.
        :raises anyio.EndOfStream: when the peer closed its sending side
            and every byte was returned.
        :raises DescriptorsLostError: on ``MSG_CTRUNC``; the stream is broken,
            and the bytes and descriptors it buffered are closed.
        :raises LimitError: if it had to read while :attr:`max_queued_fds`
            descriptors wait untaken; nothing was read.
        :raises anyio.BusyResourceError: if another task is receiving.
        :raises anyio.ClosedResourceError: after :meth:`aclose`.
        :raises anyio.BrokenResourceError: after the stream broke.
        """
        return self._inbox.take_with_fds(await self._buffered(max_bytes))

    async def receive_exactly(self, nbytes: int) -> tuple[bytes, list[Fd]]:
        """Return exactly ``nbytes`` bytes and the descriptors that go with them.

        The descriptors are every queued one that arrived no later than the
        last of these bytes. Each read asks the kernel for no more than is
        still missing, so a descriptor comes with the call that returns the
        first byte of its ``sendmsg`` (earlier only with bytes that an
        earlier call read ahead and the kernel glued to its read; see the
        class's rule). Cancellation loses nothing: what was
        read stays buffered for the next call.

        :raises ValueError: if ``nbytes`` is negative.
        :raises anyio.IncompleteRead: if the peer closed before ``nbytes``
            arrived; the bytes and descriptors that did arrive stay
            available to :meth:`receive`, :meth:`receive_with_fds` and
            :meth:`take_fds`.
        :raises DescriptorsLostError: on ``MSG_CTRUNC``; the stream is broken,
            and the bytes and descriptors it buffered are closed.
        :raises LimitError: if it had to read while :attr:`max_queued_fds`
            descriptors wait untaken; nothing was read.
        :raises anyio.BusyResourceError: if another task is receiving.
        :raises anyio.ClosedResourceError: after :meth:`aclose`.
        :raises anyio.BrokenResourceError: after the stream broke.
        """
        _check_size("nbytes", nbytes, 0)
        with self._receive_guard:
            await self._enter()
            inbox = self._inbox
            while inbox.pending < nbytes:
                try:
                    await self._read(min(nbytes - inbox.pending, _READ_CAP))
                except EndOfStream:
                    raise self._incomplete(f"{nbytes} byte(s)") from None
            return inbox.take_with_fds(nbytes)

    async def receive_until(
        self, delimiter: bytes, max_bytes: int
    ) -> tuple[bytes, list[Fd]]:
        """Return the bytes before ``delimiter``, and the descriptors that go with them.

        The delimiter is consumed but not returned (as anyio's
        :meth:`~anyio.streams.buffered.BufferedByteReceiveStream.receive_until`);
        the descriptors are every queued one that arrived no later than the
        delimiter's last byte. Reads may bring bytes after the delimiter;
        they stay buffered, and a descriptor that arrived only with them
        stays queued.

        :param max_bytes: the most bytes that may come before the delimiter.
        :raises ValueError: for an empty delimiter, or ``max_bytes`` under 1.
        :raises anyio.DelimiterNotFound: if ``max_bytes`` bytes arrived and
            the delimiter is not among them or right after them; nothing
            is consumed.
        :raises anyio.IncompleteRead: if the peer closed before the
            delimiter; what arrived stays available, as for
            :meth:`receive_exactly`.
        :raises DescriptorsLostError: on ``MSG_CTRUNC``; the stream is broken,
            and the bytes and descriptors it buffered are closed.
        :raises LimitError: if it had to read while :attr:`max_queued_fds`
            descriptors wait untaken; nothing was read.
        :raises anyio.BusyResourceError: if another task is receiving.
        :raises anyio.ClosedResourceError: after :meth:`aclose`.
        :raises anyio.BrokenResourceError: after the stream broke.
        """
        if not isinstance(delimiter, bytes):
            raise TypeError(f"the delimiter must be bytes, not {delimiter!r}")
        if not delimiter:
            raise ValueError("the delimiter must be at least one byte long")
        _check_size("max_bytes", max_bytes, 1)
        size = len(delimiter)
        window = max_bytes + size
        with self._receive_guard:
            await self._enter()
            inbox = self._inbox
            searched = 0
            while True:
                index = inbox.find(delimiter, searched, window)
                if index >= 0:
                    return inbox.take_with_fds(index, size)
                if inbox.pending >= window:
                    raise DelimiterNotFound(max_bytes)
                searched = max(inbox.pending - size + 1, 0)
                try:
                    await self._read(min(window - inbox.pending, _UNTIL_READ))
                except EndOfStream:
                    raise self._incomplete(f"the delimiter {delimiter!r}") from None

    async def _buffered(self, max_bytes: int) -> int:
        """Read once unless bytes are buffered; return how many to return (1+).

        Nothing can happen between the return and the caller's take: no
        await, so no other receiver and no cancellation.
        """
        _check_size("max_bytes", max_bytes, 1)
        with self._receive_guard:
            await self._enter()
            if not self._inbox.pending:
                await self._read(min(max_bytes, _READ_CAP))
            return min(max_bytes, self._inbox.pending)

    async def _enter(self) -> None:
        transport = self._transport
        await transport.enter().checkpoint()
        transport.check_recv()

    async def _read(self, size: int) -> None:
        """Read once, at most ``size`` bytes, into the inbox.

        :raises anyio.EndOfStream: at end of stream.
        """
        inbox = self._inbox
        if inbox.eof:
            raise EndOfStream
        if inbox.queued_fds >= self._max_queued_fds:
            raise LimitError(
                f"{inbox.queued_fds} received descriptors wait untaken (the "
                f"stream's max_queued_fds is {self._max_queued_fds}); nothing was "
                "read: take them with take_fds() or with a call that returns "
                "descriptors, or raise max_queued_fds, then call again"
            )
        view = inbox.get_buffer(size)
        try:
            nbytes, numbers = await self._transport.recv_into(view)
        finally:
            view.release()
        # No await since the read: the inbox owns the descriptors at once.
        inbox.commit(nbytes, numbers)
        self._bytes_received += nbytes
        if numbers:
            self._fds_received += len(numbers)
        if not nbytes:
            inbox.eof = True
            raise EndOfStream

    def _incomplete(self, wanted: str) -> IncompleteRead:
        inbox = self._inbox
        exc = IncompleteRead()
        exc.args = (
            f"the peer closed the stream before {wanted} arrived; the "
            f"{inbox.pending} byte(s) that did arrive stay available to "
            f"receive() and receive_with_fds(), and {inbox.queued_fds} queued "
            "descriptor(s) to take_fds()",
        )
        return exc

    def statistics(self) -> StreamStatistics:
        """Return what this stream has sent and received (:class:`StreamStatistics`).

        It never raises, also after :meth:`aclose`.
        """
        return StreamStatistics(
            bytes_sent=self._bytes_sent,
            fds_sent=self._fds_sent,
            bytes_received=self._bytes_received,
            fds_received=self._fds_received,
        )

    def _eof_received(self) -> bool:
        return self._inbox.eof

    def _buffers_closer(self) -> Callable[[], None]:
        return self._inbox.close


def _check_size(name: str, value: int, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, got {value}")


def _byte_view(part: object) -> memoryview:
    try:
        return memoryview(part).cast("B")  # type: ignore[arg-type]
    except TypeError:
        raise _not_bytes(part) from None


def _not_bytes(obj: object) -> TypeError:
    what = type(obj).__name__
    if isinstance(obj, memoryview):
        what = "a memoryview that is not C-contiguous"
    return TypeError(
        "send(data): data must be bytes-like (bytes, bytearray, a C-contiguous "
        f"memoryview...) or a sequence of them, not {what}"
    )


def stream_pair() -> tuple[FdStream, FdStream]:
    """Return two connected :class:`FdStream` objects (a ``socketpair``).

    :raises OSError: ``EMFILE`` if the process is out of descriptors.
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return FdStream(a), FdStream(b)
