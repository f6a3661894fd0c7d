"""`FdChannel`: records of bytes plus descriptors over a connected socket."""

from __future__ import annotations

import errno
import os
import resource
import socket
from collections.abc import Iterable
from time import perf_counter_ns
from typing import TYPE_CHECKING

import anyio
from anyio import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    EndOfStream,
)
from anyio.abc import ObjectStream
from anyio.lowlevel import checkpoint

from ._backend import current_hooks
from ._codec import MAGIC, VERSION, RecordDecoder, pack_header
from ._connection import Connection, adopt_fd
from ._convert import close_sent, filenos_of
from ._errors import LimitError, ProtocolError
from ._message import Limits, Message
from ._outbox import Outbox

if TYPE_CHECKING:
    from typing_extensions import Buffer, Self

__all__ = ["FdChannel", "channel_pair"]

_DEFAULT_LIMITS = Limits()

# Records larger than this (or with more descriptors) are written directly
# from the caller's buffer instead of being copied into the queue.
_DIRECT_BYTES = 64 * 1024
_DIRECT_FDS = 16
# send() waits for the queue to drain below _LOW_WATER once it holds
# _HIGH_WATER bytes.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
# ... and once it holds this many of our duplicate descriptors: each one is
# an open file in this process until it is sent. At most 1024, and never
# more than an eighth of RLIMIT_NOFILE (read when the channel is made).
_FD_HIGH_WATER = 1024
# A send less than this long after the previous one is part of a burst and
# is coalesced with it; an isolated send is written at once.
_BURST_NS = 10_000
# A call that never has to wait still yields every 32 calls (fairness, and
# a cancellation point in a loop that never blocks).
_YIELD_EVERY_MASK = 31


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
        self._receiving = False
        self._outbox = Outbox()
        self._flush_scheduled = False
        self._flusher_running = False
        self._send_calls = 0
        self._last_write = 0
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        self._fd_high_water = max(16, min(_FD_HIGH_WATER, soft // 8))
        self._fd_low_water = self._fd_high_water // 4
        self._receive_calls = 0
        # A broken channel closes the descriptors it holds at once; a broken
        # sending side drops (and closes) only what was queued to send.
        self._transport.on_break = self._release_buffers
        self._transport.on_write_break = self._outbox.discard

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
        return adopt_fd(fd, lambda sock: cls(sock, limits=limits))

    def _release_buffers(self) -> None:
        self._outbox.discard()
        self._decoder.close()

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
        of the descriptors. Either way the caller may close its copies at
        once, or pass ``close_fds=True`` to have them closed now. If ``send``
        raises, nothing was queued, the caller still owns its descriptors and
        ``close_fds`` closed nothing.

        An isolated small record is written at once. Records sent in a burst
        (less than 10 microseconds apart, as in a loop that sends without
        waiting) are queued and coalesced: many go out in one ``sendmsg``,
        written on the event loop's next iteration, by the next
        :meth:`receive` before it waits, when the queue is full, or by
        :meth:`send_eof` / :meth:`aclose` (which wait for the queue to be
        written). A record that meets a full socket, or the kernel's limit on
        descriptors in flight (``ETOOMANYREFS``), is queued too. A write
        error (the peer went away or stopped reading) breaks the sending
        side only: queued records are dropped with their descriptors, the
        next ``send`` raises :class:`anyio.BrokenResourceError` with the
        error as its cause, and :meth:`receive` still returns what the peer
        sent before. Large records (over 64 KiB, or over 16 descriptors) are
        written directly from ``data``, without a copy. When the queue holds
        256 KiB, or 1024 descriptors (at most an eighth of
        ``RLIMIT_NOFILE``), ``send`` waits for it to drain (backpressure):
        memory and descriptors never grow without bound.

        Cancellation: a cancelled ``send`` never delivers its record. Small
        records are queued only after every wait, so a cancelled one was
        never queued. A large record cancelled after part of it was written
        breaks the channel (the peer gets :class:`ProtocolError` for the
        truncated record and closes its descriptors); cancelled before its
        first byte, nothing happened. ``send`` checks for cancellation and
        yields to the event loop whenever it waits, and at least every 32nd
        call when it never has to wait.

        :raises TypeError: if ``data`` is not bytes-like or an item of
            ``fds`` is not a descriptor.
        :raises ValueError: for a negative descriptor number, or for ``fds``
            given together with a ``Message``.
        :raises OSError: ``EBADF`` if a descriptor is closed, ``EMFILE`` if
            this process is out of descriptors even after the queue drained;
            nothing sent.
        :raises LimitError: if the record is over this channel's limits;
            nothing sent.
        :raises anyio.ClosedResourceError: after :meth:`aclose` or
            :meth:`send_eof`.
        :raises anyio.BrokenResourceError: if the connection failed.
        """
        if type(data) is bytes:
            payload: bytes | memoryview = data
        elif isinstance(data, Message):
            if fds:
                raise ValueError(
                    "pass descriptors either inside the Message or as fds=, not both"
                )
            fds = data.fds
            payload = data.data
        else:
            try:
                payload = memoryview(data).cast("B")
            except TypeError:
                raise TypeError(
                    f"data must be bytes-like or a Message, not {type(data).__name__}"
                ) from None
        objs = fds if type(fds) is list or type(fds) is tuple else list(fds)
        numbers = filenos_of(objs)
        limits = self._limits
        if len(payload) > limits.max_payload:
            raise LimitError(
                f"the payload is {len(payload)} bytes, over this channel's "
                f"max_payload of {limits.max_payload}: split it across records "
                "or raise Limits.max_payload on both sides. Nothing was sent"
            )
        if len(numbers) > limits.max_fds:
            raise LimitError(
                f"{len(numbers)} descriptors in one record, over this channel's "
                f"max_fds of {limits.max_fds} (Linux carries at most 253 "
                "per sendmsg); split them across records. Nothing was sent"
            )
        transport = self._transport
        if not transport.can_send:
            transport.check_writable()  # raises the precise error
        header = pack_header(MAGIC, VERSION, 0, len(numbers), 0, len(payload))
        self._send_calls += 1
        if self._send_calls & _YIELD_EVERY_MASK == 0:
            await checkpoint()
        if len(payload) > _DIRECT_BYTES or len(numbers) > _DIRECT_FDS:
            try:
                async with self._send_lock:
                    transport.check_writable()
                    await self._drain(full=True)
                    buffers = [memoryview(header), memoryview(payload)]
                    await transport.send_all(
                        buffers if payload else buffers[:1], numbers
                    )
            finally:
                # Records others queued while we held the lock (also when we
                # failed or were cancelled) must not wait for the next call.
                self._flush_now()
        else:
            outbox = self._outbox
            if outbox.nbytes >= _HIGH_WATER or outbox.nfds >= self._fd_high_water:
                try:
                    async with self._send_lock:
                        await self._drain(full=False)
                finally:
                    self._flush_now()
            if not transport.can_send:
                transport.check_writable()
            now = perf_counter_ns()
            if (
                self._outbox
                or now - self._last_write < _BURST_NS
                or self._send_lock.locked()
            ):
                # A burst: queue the record, with our own duplicates (the
                # caller may close its copies on return), to go out with the
                # others in one sendmsg on the next loop iteration.
                try:
                    owned = _duplicate(numbers) if numbers else numbers
                except OSError as exc:
                    owned = await self._duplicate_or_wait(numbers, exc)
                self._outbox.add(header, payload, owned)
                if not self._flush_scheduled:
                    self._schedule_flush()
            else:
                # An isolated record goes out at once, with no copy.
                self._write_through(header, payload, numbers)
            self._last_write = now
        if close_fds:
            await close_sent(objs)

    async def receive(self) -> Message:
        """Receive the next record.

        Cancellation never loses a record or a descriptor: whatever was read
        stays buffered for the next call. ``receive`` checks for
        cancellation and yields to the event loop whenever it waits for
        data, and at least every 32nd call when records are already
        buffered. Records this channel queued for sending are written
        before it waits.

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
        if self._receiving:
            raise BusyResourceError("receiving from")
        self._receiving = True
        try:
            self._receive_calls += 1
            if self._receive_calls & _YIELD_EVERY_MASK == 0:
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
                if self._outbox:
                    self._flush_now()
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
        finally:
            self._receiving = False

    async def send_eof(self) -> None:
        """Write every queued record, then shut down the sending side.

        The peer receives end of stream after the last record. Receiving
        still works. Later sends raise :class:`anyio.ClosedResourceError`.

        :raises anyio.ClosedResourceError: after :meth:`aclose` or an
            earlier :meth:`send_eof`.
        :raises anyio.BrokenResourceError: if the connection failed.
        """
        await checkpoint()
        try:
            async with self._send_lock:
                self._transport.check_writable()
                await self._drain(full=True)
                self._transport.shutdown_write()
        finally:
            # If we failed or were cancelled, records others queued behind
            # the lock must still go out.
            self._flush_now()

    async def aclose(self) -> None:
        """Write every queued record, then close the channel and its descriptors.

        Waits while the peer is slow to read the queued records; cancel it
        (e.g. with a timeout) to close at once, dropping them. Tasks blocked
        in send or receive raise :class:`anyio.ClosedResourceError`. Calling
        it again does nothing. It never raises, except the cancellation
        that interrupts its wait (the channel is closed all the same).
        """
        if self._outbox and not self._transport.closed:
            try:
                async with self._send_lock:
                    await self._drain(full=True)
            except (BrokenResourceError, ClosedResourceError):
                pass  # the peer is gone: nothing more can be delivered
            finally:
                self._close_now()
        await super().aclose()

    # -- the write queue ----------------------------------------------------

    async def _duplicate_or_wait(self, numbers: list[int], error: OSError) -> list[int]:
        """After ``_duplicate`` failed with ``error``: wait for the queue, retry.

        Only running out of descriptors is worth waiting for, and only while
        our own queued copies may be what fills the table.
        """
        if error.errno not in (errno.EMFILE, errno.ENFILE) or not self._outbox:
            raise error
        try:
            async with self._send_lock:
                await self._drain(full=True)
        finally:
            self._flush_now()
        return _duplicate(numbers)

    def _write_through(
        self, header: bytes, payload: bytes | memoryview, numbers: list[int]
    ) -> None:
        """Try to write a small record now; queue whatever the socket refuses."""
        try:
            sent = self._transport.try_send(header + payload, numbers)
        except LimitError:
            # ETOOMANYREFS: too many of this user's descriptors in flight.
            # For a small record that is backpressure, as in a burst: queue
            # it; the flusher retries as the peer receives.
            sent = -1
        if sent < 0:  # nothing written: queue all of it
            self._outbox.add(header, payload, _duplicate(numbers))
        elif sent < len(header) + len(payload):
            # Its descriptors went with the first bytes; the rest follows.
            self._outbox.add_tail((header + payload)[sent:])
        else:
            return
        self._schedule_flush()  # the socket is full: a flusher waits for it

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            # Looked up each time: a channel may outlive one event loop.
            current_hooks().call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        self._flush_now()

    def _flush_now(self) -> None:
        """Write what the socket takes now; leave the rest to a flusher task."""
        transport = self._transport
        if transport.closed or transport.broken or self._send_lock.locked():
            return  # whoever holds the lock writes the queue before letting go
        if not self._outbox:
            return
        try:
            done = self._outbox.write_some(transport.sock)
        except OSError as exc:
            if exc.errno != errno.ETOOMANYREFS:
                transport.fail_write(exc)
                return
            done = False  # the flusher retries once the peer took some
        if not done and not self._flusher_running:
            self._flusher_running = True
            current_hooks().spawn(self._flusher)

    async def _flusher(self) -> None:
        """Background task: wait for a full socket to drain, write the queue."""
        try:
            async with self._send_lock:
                await self._drain(full=True)
        except BaseException:  # errors are recorded on the transport
            # Errors broke the channel (the next call reports them); a
            # cancellation means the event loop is shutting down.
            pass
        finally:
            self._flusher_running = False

    async def _drain(self, *, full: bool) -> None:
        """Write queued records: all of them, or until below the low marks.

        The caller holds the send lock, so nobody else waits for the socket
        to become writable. ``ETOOMANYREFS`` (this user has too many
        descriptors in flight) is backpressure too: the count drops as the
        peer receives, but no event says when, so it retries with a growing
        pause.
        """
        outbox = self._outbox
        transport = self._transport
        pause = 0.001
        while (
            outbox
            if full
            else (outbox.nbytes > _LOW_WATER or outbox.nfds > self._fd_low_water)
        ):
            transport.check_sending()
            try:
                if outbox.write_some(transport.sock):
                    return
            except OSError as exc:
                if exc.errno == errno.ETOOMANYREFS:
                    await anyio.sleep(pause)
                    pause = min(pause * 2, 0.1)
                    continue
                transport.fail_write(exc)
                transport.check_sending()
            pause = 0.001
            await transport.wait_writable()

    def _close_now(self) -> None:
        super()._close_now()
        self._outbox.discard()
        self._decoder.close()


def _duplicate(numbers: list[int]) -> list[int]:
    """Return our own duplicates of ``numbers`` (close-on-exec)."""
    owned: list[int] = []
    try:
        for n in numbers:
            owned.append(os.dup(n))
    except OSError as exc:
        for fd in owned:
            os.close(fd)
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise OSError(
                exc.errno,
                "out of descriptors while queueing a record (this channel "
                "holds its own copies of queued descriptors until they are "
                "sent): close descriptors, raise RLIMIT_NOFILE, or let the "
                "peer catch up. Nothing was sent",
            ) from None
        if exc.errno == errno.EBADF:
            raise OSError(
                errno.EBADF,
                f"descriptor {numbers[len(owned)]} is not open (was it closed "
                "before send?); nothing was sent",
            ) from None
        raise
    return owned


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
