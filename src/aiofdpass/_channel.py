"""`FdChannel`: records of bytes plus descriptors over a connected socket."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING

from anyio import EndOfStream
from anyio.abc import ObjectStream
from anyio.lowlevel import checkpoint

from ._codec import RecordDecoder, encode_header
from ._connection import Connection, adopt_fd
from ._convert import close_sent, filenos_of
from ._errors import LimitError, ProtocolError
from ._message import Limits, Message

if TYPE_CHECKING:
    from typing_extensions import Buffer, Self

__all__ = ["FdChannel", "channel_pair"]

_DEFAULT_LIMITS = Limits()


class FdChannel(Connection, ObjectStream[Message]):
    """A connected channel of records (:class:`Message`) over an AF_UNIX socket.

    Make one with :func:`channel_pair`, :func:`connect`, a
    :class:`FdListener`, :meth:`from_socket` or :meth:`from_fd`. It is an
    :class:`anyio.abc.ObjectStream` of :class:`Message`, so ``async for`` works
    and it composes with anyio's stream tools. The same code runs under
    asyncio, uvloop and trio.

    Several tasks may send at once; records never interleave on the wire.
    One task at a time may receive.
    """

    def __init__(self, sock: socket.socket, *, limits: Limits | None = None) -> None:
        """Adopt ``sock``; prefer :meth:`from_socket`, which documents this."""
        super().__init__(sock)
        self._limits = limits or _DEFAULT_LIMITS
        self._decoder = RecordDecoder(self._limits)
        self._eof = False
        # A broken channel closes its buffered descriptors at once.
        self._transport.on_break = self._decoder.close

    @classmethod
    def from_socket(cls, sock: socket.socket, *, limits: Limits | None = None) -> Self:
        """Adopt a connected AF_UNIX stream socket (e.g. one a child inherited).

        The channel owns the socket from now on and closes it in
        :meth:`aclose`. The socket is switched to non-blocking mode.

        :raises ValueError: if it is not an AF_UNIX ``SOCK_STREAM`` socket.
        """
        return cls(sock, limits=limits)

    @classmethod
    def from_fd(cls, fd: int, *, limits: Limits | None = None) -> Self:
        """Adopt a connected AF_UNIX stream socket given by descriptor number.

        Typical in a child process that got its end of :func:`channel_pair`
        through ``pass_fds``. The channel owns the descriptor from now on.

        :raises TypeError: if ``fd`` is not an ``int``.
        :raises OSError: ``EBADF`` or ``ENOTSOCK`` if ``fd`` is not an open
            socket.
        :raises ValueError: if it is not an AF_UNIX ``SOCK_STREAM`` socket;
            the caller still owns ``fd``.
        """
        sock = adopt_fd(fd)
        try:
            return cls(sock, limits=limits)
        except BaseException:
            sock.detach()  # the caller still owns the number
            raise

    @property
    def limits(self) -> Limits:
        """The record limits this channel enforces in both directions."""
        return self._limits

    async def send(
        self,
        data: Buffer | Message = b"",
        fds: Iterable[object] = (),
        *,
        close_fds: bool = False,
    ) -> None:
        """Send one record: ``data`` and the descriptors ``fds``.

        ``data`` is any bytes-like object, or a :class:`Message`, whose own
        descriptors are then sent (forwarding a received message is one
        call). ``fds`` may hold ints, objects with ``fileno()`` (files,
        sockets, :class:`Fd`, trio sockets) and anyio socket streams.

        When ``send`` returns, the record is in the kernel: the caller may
        close its copies of the descriptors (the peer's copies stay valid), or
        pass ``close_fds=True`` to have them closed now. There is no write
        buffering in the library, so a write error is always raised by the
        ``send`` it belongs to. If ``send`` raises, the caller still owns its
        descriptors and ``close_fds`` closed nothing.

        Cancellation: a cancelled ``send`` never delivers its record. If it
        was cancelled before its first byte was written, nothing happened
        and the channel is fine. If part of the record was already written,
        the channel is broken (the peer gets :class:`ProtocolError` for the
        truncated record and closes its descriptors), and later calls raise
        :class:`anyio.BrokenResourceError`.

        :raises TypeError: if ``data`` is not bytes-like or an item of
            ``fds`` is not a descriptor.
        :raises ValueError: for a negative descriptor number, or for ``fds``
            given together with a ``Message``.
        :raises OSError: ``EBADF`` if a descriptor is closed; nothing sent.
        :raises LimitError: if the record is over this channel's limits;
            nothing sent.
        :raises anyio.ClosedResourceError: after :meth:`aclose` or
            :meth:`send_eof`.
        :raises anyio.BrokenResourceError: if the connection failed.
        """
        if isinstance(data, Message):
            if fds:
                raise ValueError(
                    "pass descriptors either inside the Message or as fds=, not both"
                )
            fds = data.fds
            payload = memoryview(data.data)
        else:
            try:
                payload = memoryview(data).cast("B")
            except TypeError:
                raise TypeError(
                    f"data must be bytes-like or a Message, not {type(data).__name__}"
                ) from None
        objs = list(fds)
        numbers = filenos_of(objs)
        if len(payload) > self._limits.max_payload:
            raise LimitError(
                f"the payload is {len(payload)} bytes, over this channel's "
                f"max_payload of {self._limits.max_payload}; nothing was sent"
            )
        if len(numbers) > self._limits.max_fds:
            raise LimitError(
                f"{len(numbers)} descriptors in one record, over this channel's "
                f"max_fds of {self._limits.max_fds} (Linux carries at most 253 "
                "per sendmsg); split them across records. Nothing was sent"
            )
        header = memoryview(encode_header(len(payload), len(numbers)))
        buffers = [header, payload] if payload else [header]
        await checkpoint()
        async with self._send_lock:
            self._transport.check_writable()
            await self._transport.send_all(buffers, numbers)
        if close_fds:
            await close_sent(objs)

    async def receive(self) -> Message:
        """Receive the next record.

        Cancellation never loses a record or a descriptor: whatever was read
        stays buffered for the next call.

        :raises anyio.EndOfStream: when the peer closed between records (an
            ``async for`` loop ends there).
        :raises ProtocolError: if the peer broke the framing (including
            closing inside a record); the channel is broken afterwards.
        :raises DescriptorsLostError: if the kernel dropped descriptors
            (``MSG_CTRUNC``); the channel is broken afterwards.
        :raises anyio.BusyResourceError: if another task is receiving.
        :raises anyio.ClosedResourceError: after :meth:`aclose`.
        :raises anyio.BrokenResourceError: after the channel broke.
        """
        with self._receive_guard:
            await checkpoint()
            transport = self._transport
            decoder = self._decoder
            while True:
                transport.check_open()
                try:
                    message = decoder.next_message()
                except ProtocolError as exc:
                    transport.mark_broken(exc, "the peer broke the framing")
                    raise
                if message is not None:
                    return message
                if self._eof:
                    raise EndOfStream
                view = decoder.get_buffer()
                try:
                    nbytes, fds = await transport.recv_into(view)
                finally:
                    view.release()
                decoder.commit(nbytes, fds)
                if nbytes == 0:
                    self._eof = True
                    try:
                        decoder.end_of_stream()
                    except ProtocolError as exc:
                        transport.mark_broken(exc, "the peer closed inside a record")
                        raise

    def _close_now(self) -> None:
        super()._close_now()
        self._decoder.close()


def channel_pair(*, limits: Limits | None = None) -> tuple[FdChannel, FdChannel]:
    """Return two connected channels (a ``socketpair``).

    Use it within one program, or before starting a child process: hand the
    child one end's descriptor (``channel.fileno()`` in ``pass_fds``) and
    adopt it there with :meth:`FdChannel.from_fd`; then close that end in
    the parent.

    :raises OSError: ``EMFILE`` if the process is out of descriptors.
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return FdChannel(a, limits=limits), FdChannel(b, limits=limits)
