"""`FdChannel`: records of bytes plus descriptors over a connected socket."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from anyio import BusyResourceError, EndOfStream
from anyio.abc import ObjectStream

from ._codec import HEADER_SIZE, MAGIC, VERSION, RecordDecoder, pack_header
from ._connection import Connection, adopt_fd
from ._convert import as_fd_list, close_forwarded, close_sent, filenos_of
from ._errors import LimitError, ProtocolError
from ._fd import FD_MAX, Fd
from ._message import Limits, Message
from ._statistics import ChannelStatistics
from ._transport import OPEN
from ._writer import DEFAULT_CLOSE_TIMEOUT, DIRECT_BYTES, DIRECT_FDS

if TYPE_CHECKING:
    from typing_extensions import Buffer, Self

    from ._backend import Driver

__all__ = ["FdChannel", "channel_pair", "socket_type"]

logger = logging.getLogger("aiofdpass")

_DEFAULT_LIMITS = Limits()
# The kernel refuses a packet over SO_SNDBUF less this (EMSGSIZE).
_SKB_OVERHEAD = 32
# receive() yields at least every 32nd call when records are buffered.
_YIELD_EVERY_MASK = 31


class FdChannel(Connection, ObjectStream[Message]):
    """A connected channel of records (:class:`Message`) over an AF_UNIX socket.

    Make one with :func:`channel_pair`, :func:`connect`, a
    :class:`FdListener`, :meth:`from_socket` or :meth:`from_fd`. It is an
    :class:`anyio.abc.ObjectStream` of :class:`Message`, so ``async for`` works
    and it composes with anyio's stream tools. The same code runs under
    asyncio, uvloop and trio, started by anyio or by the loop's own ``run``.

    Several tasks may send at once; records never interleave on the wire.
    One task at a time may receive. A channel belongs to the event loop that
    uses it; once that loop has ended, another one (also of another kind)
    may use it.

    Over a ``SOCK_SEQPACKET`` socket (``kind="seqpacket"``) a record is
    exactly one packet, with no aiofdpass header: any SEQPACKET peer
    interoperates, and the kernel's packet boundaries are the framing.
    """

    _SOCKET_TYPES = (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)
    _WRONG_TYPE_ADVICE = "for SOCK_DGRAM use FdDatagramSocket"

    def __init__(
        self,
        sock: socket.socket,
        *,
        limits: Limits | None = None,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        """Adopt ``sock``; prefer :meth:`from_socket`, which documents this."""
        self._limits = limits or _DEFAULT_LIMITS
        if not isinstance(self._limits, Limits):
            raise TypeError(f"limits must be a Limits, not {type(limits).__name__}")
        self._decoder = RecordDecoder(self._limits)
        self._eof = False  # before the repr in the "opened" debug log
        super().__init__(sock, close_timeout)
        self._receiving = False
        self._receive_calls = 0
        # statistics(): records received = receive calls that did not raise.
        self._records_sent = self._receive_failures = 0
        # A broken channel closes the descriptors it received at once.
        self._transport.on_recv_break = self._decoder.close
        self._packets = self._transport.packets
        if self._packets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            # The kernel refuses (EMSGSIZE) a packet over SO_SNDBUF - 32.
            self._max_packet = (
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - _SKB_OVERHEAD
            )

    @classmethod
    def from_socket(
        cls,
        sock: socket.socket,
        *,
        limits: Limits | None = None,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> Self:
        """Adopt a connected AF_UNIX socket (e.g. one a child inherited).

        ``SOCK_STREAM`` carries records with the aiofdpass header;
        ``SOCK_SEQPACKET`` carries one record per packet, with none (see
        ``docs/protocol.md``). On a SEQPACKET socket the channel turns on
        ``SO_PASSCRED``, so that an empty packet can be told from end of
        stream (the kernel then also binds the socket to an abstract name
        of its choosing when it first sends, if it had none).

        The channel owns the socket from now on and closes it in
        :meth:`aclose`. The socket is switched to non-blocking mode.

        :param limits: the record limits, in both directions.
        :param close_timeout: how long :meth:`aclose` waits for queued
            records (:attr:`close_timeout`).
        :raises ValueError: if it is not a connected AF_UNIX ``SOCK_STREAM``
            or ``SOCK_SEQPACKET`` socket (a listening one included).
        """
        return cls(sock, limits=limits, close_timeout=close_timeout)

    @classmethod
    def from_fd(
        cls,
        fd: int | Fd,
        *,
        limits: Limits | None = None,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> Self:
        """Adopt a connected AF_UNIX socket by number, or as an :class:`Fd`.

        Typical in a child process that got its end of :func:`channel_pair`
        through ``pass_fds``, or with a socket received as an ``Fd``. The
        channel owns the descriptor only once this returns (an ``Fd`` is
        then taken); if it raises, the caller still owns it. The keyword
        arguments are those of :meth:`from_socket`.

        :raises TypeError: if ``fd`` is neither an ``int`` nor an ``Fd``, or
            ``limits`` is not a :class:`Limits`.
        :raises OSError: ``EBADF`` or ``ENOTSOCK`` if ``fd`` is not an open
            socket.
        :raises ValueError: if it is not a connected AF_UNIX ``SOCK_STREAM``
            or ``SOCK_SEQPACKET`` socket (a listening one included), or the
            ``Fd`` is closed.
        """
        return adopt_fd(
            fd, lambda sock: cls(sock, limits=limits, close_timeout=close_timeout)
        )

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

        When ``send`` returns, the record is committed: it is in the kernel,
        or queued in this channel together with the channel's own duplicates
        of the descriptors, and it is written while the event loop runs,
        whatever the caller does next. Either way the caller may close its
        copies at once, or pass ``close_fds=True`` to have them closed now.
        If ``send`` raises, nothing was queued, the caller still owns its
        descriptors and ``close_fds`` closed nothing.

        A small record is written at once, unless this channel already wrote
        one since it last received or since the event loop last ran its
        flush: records sent one after another are queued and written
        together, many in one ``sendmsg``, when the loop next runs its
        callbacks (or sooner, by a :meth:`receive`). No clock is involved:
        ``docs/write-path.md`` gives the rules. A record that meets a full
        socket, or the kernel's limit on descriptors in flight
        (``ETOOMANYREFS``), is queued too, and a task of the channel's own
        writes it when the socket has room. The descriptors of a record of
        over 16 are never queued (that would take a duplicate of each): it
        is written at once when nothing is queued before it (if the socket
        takes only part of it, the rest of its bytes is queued, as for a
        small record), otherwise behind the queue. Records over 64 KiB are
        written directly from ``data``, without a copy. When the queue holds
        256 KiB, or 1024 descriptors (at most an eighth of
        ``RLIMIT_NOFILE``), ``send`` waits for it to drain (backpressure). A
        write error (the peer went away or stopped reading) breaks the
        sending side only: queued records are dropped and logged, the next
        ``send`` raises :class:`anyio.BrokenResourceError` with the error as
        its cause, and :meth:`receive` still returns what the peer sent
        before.

        Cancellation: a cancelled ``send`` never delivers its record. Small
        records are queued only after every wait, so a cancelled one was
        never queued. A large record cancelled after part of it was written
        breaks the channel (the peer gets :class:`ProtocolError` for the
        truncated record and closes its descriptors); cancelled before its
        first byte, nothing happened. ``send`` checks for cancellation and
        yields to the event loop whenever it waits, and at least every 32nd
        call when it never has to wait.

        :raises TypeError: if ``data`` is not bytes-like, ``fds`` is not a
            list (``send(data, [fd])``, not ``send(data, fd)``; bytes or a
            ``str`` are refused too) or an item of it is not a descriptor.
        :raises ValueError: for a number that is not a descriptor's
            (negative, or over ``2**31 - 1``), or for ``fds`` given together
            with a ``Message``; nothing sent, nothing duplicated.
        :raises OSError: ``EBADF`` if a descriptor is closed, ``EMFILE`` if
            this process is out of descriptors even after the queue drained;
            nothing sent.
        :raises LimitError: if the record is over this channel's limits;
            nothing sent.
        :raises anyio.ClosedResourceError: after :meth:`aclose` or
            :meth:`send_eof`.
        :raises anyio.BrokenResourceError: if the connection failed.
        :raises RuntimeError: if another event loop, still running, uses
            this channel.
        """
        forwarded: Message | None = None
        numbers: list[int] | None = None
        if type(data) is bytes:
            payload: bytes | memoryview = data
        elif isinstance(data, Message):
            if fds:
                raise ValueError(
                    "pass descriptors either inside the Message or as fds=, not both"
                )
            forwarded = data
            payload = data._data
            # A received message not yet unwrapped: send its numbers as they
            # are (the kernel's: no Fd object made for each, none to check).
            numbers = data._numbers
            if numbers is None:
                fds = data.fds
        else:
            try:
                payload = memoryview(data).cast("B")
            except TypeError:
                raise TypeError(
                    f"data must be bytes-like or a Message, not {type(data).__name__}"
                ) from None
        if numbers is None:
            objs = fds if type(fds) is list or type(fds) is tuple else as_fd_list(fds)
            if not objs:
                numbers = []
            elif len(objs) == 1 and type(objs[0]) is int and 0 <= objs[0] <= FD_MAX:
                numbers = [objs[0]]  # one plain number: checked without a call
            else:
                numbers = filenos_of(objs)
        limits = self._limits
        nbytes = len(payload)
        nfds = len(numbers)
        if nbytes > limits.max_payload:
            raise LimitError(
                f"the payload is {nbytes} bytes, over this channel's "
                f"max_payload of {limits.max_payload}: split it across records "
                "or raise Limits.max_payload on both sides. Nothing was sent"
            )
        if nfds > limits.max_fds:
            raise LimitError(
                f"{nfds} descriptors in one record, over this channel's "
                f"max_fds of {limits.max_fds} (Linux carries at most 253 "
                "per sendmsg); split them across records. Nothing was sent"
            )
        if self._packets:
            if nbytes > self._max_packet:
                raise LimitError(
                    f"the payload is {nbytes} bytes, over the {self._max_packet} "
                    "that one packet can hold on this socket (SO_SNDBUF less "
                    "32): split it across records, or raise SO_SNDBUF before "
                    "making the channel. Nothing was sent"
                )
            header = b""  # one packet, one record: no header
            head = 0
        else:
            header = pack_header(MAGIC, VERSION, 0, nfds, 0, nbytes)
            head = HEADER_SIZE
        writer = self._writer
        if nfds > DIRECT_FDS or nbytes > DIRECT_BYTES:
            if nbytes > DIRECT_BYTES or not writer.write_through(
                header, payload, numbers
            ):
                await writer.send_direct(header, payload, numbers)
        elif not writer.send_record(header, payload, numbers):
            await writer.send_record_waiting(header, payload, numbers)
        self._records_sent += 1
        self._bytes_sent += head + nbytes
        self._fds_sent += nfds
        if close_fds:
            if forwarded is not None:
                close_forwarded(forwarded)
            else:
                await close_sent(objs)

    async def receive(self) -> Message:
        """Receive the next record.

        Cancellation never loses a record or a descriptor: whatever was read
        stays buffered for the next call. ``receive`` checks for
        cancellation and yields to the event loop whenever it waits for
        data, and at least every 32nd call when records are already
        buffered. Records this channel queued for sending are written
        before it waits.

        On a ``SOCK_SEQPACKET`` channel a record is one packet: an empty
        packet is ``Message(b"")``, a packet over the limits raises
        :class:`ProtocolError` with its descriptors closed, and so does
        ``MSG_CTRUNC`` with :class:`DescriptorsLostError`; the kernel kept
        the boundaries, so the next packet is intact and the channel stays
        usable.

        :raises anyio.EndOfStream: when the peer closed between records (an
            ``async for`` loop ends there).
        :raises ProtocolError: if the peer broke the framing (including
            closing inside a record); a stream channel is broken afterwards.
        :raises DescriptorsLostError: if the kernel dropped descriptors
            (``MSG_CTRUNC``); a stream channel is broken afterwards.
        :raises anyio.BusyResourceError: if another task is receiving.
        :raises anyio.ClosedResourceError: after :meth:`aclose`.
        :raises anyio.BrokenResourceError: after the channel broke.
        :raises RuntimeError: if another event loop, still running, uses
            this channel.
        """
        if self._receiving:
            raise BusyResourceError("receiving from")
        transport = self._transport
        driver = transport.driver
        if driver is None or not driver.is_current():
            driver = transport.enter()  # trio, or another loop than last time
        self._writer.burst = False  # a reply to what we receive goes out at once
        self._receiving = True
        try:
            self._receive_calls += 1
            if not self._receive_calls & _YIELD_EVERY_MASK:
                await driver.checkpoint()
            decoder = self._decoder
            while True:
                if transport.recv_state is not OPEN:
                    transport.check_recv()
                # Bytes held, or descriptors no record claimed (too many is
                # a violation the decoder reports): is there a record? This
                # is `not decoder.at_boundary`, inlined: a property is a call
                # on the ping-pong path; change the two together.
                if decoder._end != decoder._start or decoder._fds:
                    try:
                        message = decoder.next_message()
                    except ProtocolError as exc:
                        transport.break_all(exc, "the peer broke the framing")
                        raise
                    if message is not None:
                        return message
                if self._eof:
                    raise EndOfStream
                if self._writer.outbox.nbytes:
                    self._writer.idle()  # what we queued goes out before we read
                if self._packets:  # the decoder stays empty: read one packet
                    return await self._receive_packet(driver)
                try:
                    view = decoder.get_buffer()
                except ProtocolError as exc:  # out of memory for the record
                    transport.break_all(exc, "no memory for the record")
                    raise
                try:
                    # Transport.recv_into's loop, inlined: one coroutine less
                    # per read on the ping-pong path.
                    got = transport.try_recv_into(view)
                    while got is None:  # nothing there yet
                        await driver.wait_readable()
                        got = transport.try_recv_into(view)
                finally:
                    view.release()
                # No await between the read and this: the decoder owns the
                # descriptors at once.
                nbytes, fds = got
                decoder.commit(nbytes, fds)
                # Counted per read, not per record: a read carries many.
                self._bytes_received += nbytes
                if fds:
                    self._fds_received += len(fds)
                if nbytes == 0:
                    self._eof = True
                    logger.debug("end of stream from the peer on %r", self)
                    try:
                        decoder.end_of_stream()
                    except ProtocolError as exc:
                        transport.break_all(exc, "the peer closed inside a record")
                        raise
        except BaseException:
            self._receive_failures += 1  # (no cost on the path that returns)
            raise
        finally:
            self._receiving = False

    async def _receive_packet(self, driver: Driver) -> Message:
        transport = self._transport
        limits = self._limits
        packet = transport.try_recv_packet(limits.max_payload, limits.max_fds)
        while packet is None:
            await driver.wait_readable()
            packet = transport.try_recv_packet(limits.max_payload, limits.max_fds)
        if not packet.control and not packet.data:
            self._eof = True  # no credentials: not a packet, the end
            logger.debug("end of stream from the peer on %r", self)
            raise EndOfStream
        self._bytes_received += len(packet.data)
        self._fds_received += len(packet.fds)
        return Message._unchecked(packet.data, packet.fds or None)

    def statistics(self) -> ChannelStatistics:
        """Return what this channel has sent and received, and what is queued now.

        Counting costs three integer additions per record sent and two per
        read when receiving. See :class:`ChannelStatistics`. It never raises,
        also after :meth:`aclose`.
        """
        writer = self._writer
        outbox = writer.outbox
        return ChannelStatistics(
            records_sent=self._records_sent,
            bytes_sent=self._bytes_sent,
            fds_sent=self._fds_sent,
            records_received=self._receive_calls - self._receive_failures,
            bytes_received=self._bytes_received,
            fds_received=self._fds_received,
            records_queued=outbox.nrecords,
            # A packet queue counts one more per packet (so that an empty
            # packet counts as queued): not bytes that go over the socket.
            bytes_queued=outbox.nbytes - outbox.nrecords
            if self._packets
            else outbox.nbytes,
            fds_queued=outbox.nfds,
            records_dropped=writer.dropped_records,
            bytes_dropped=writer.dropped_bytes,
            fds_dropped=writer.dropped_fds,
        )

    def _eof_received(self) -> bool:
        return self._eof

    def _repr_extra(self) -> str:
        return f" queued={self._writer.outbox.nrecords}"

    def _buffers_closer(self) -> Callable[[], None]:
        return self._decoder.close


def socket_type(kind: str) -> int:
    """Return the socket type for ``kind=`` (``"stream"`` or ``"seqpacket"``)."""
    if kind == "stream":
        return socket.SOCK_STREAM
    if kind == "seqpacket":
        return socket.SOCK_SEQPACKET
    raise ValueError(
        f"kind must be 'stream' or 'seqpacket', not {kind!r}; for datagrams "
        "use create_datagram_socket()"
    )


def channel_pair(
    *,
    kind: str = "stream",
    limits: Limits | None = None,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
) -> tuple[FdChannel, FdChannel]:
    """Return two connected channels (a ``socketpair``).

    ``kind="seqpacket"`` makes a ``SOCK_SEQPACKET`` pair: one packet per
    record, no header (see :meth:`FdChannel.from_socket`).

    Use it within one program, or before starting a child process: hand the
    child one end's descriptor (``channel.fileno()`` in ``pass_fds``) and
    adopt it there with :meth:`FdChannel.from_fd`; then close that end in
    the parent. The keyword arguments are those of
    :meth:`FdChannel.from_socket`.

    :raises ValueError: for a ``kind`` other than these two.
    :raises OSError: ``EMFILE`` if the process is out of descriptors.
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket_type(kind))
    return (
        FdChannel(a, limits=limits, close_timeout=close_timeout),
        FdChannel(b, limits=limits, close_timeout=close_timeout),
    )
