"""The write path: the send queue, its lock, when to write, backpressure, closing.

Everything that decides when bytes and descriptors go to the socket lives
here; :class:`~aiofdpass._transport.Transport` makes the syscalls and the
:class:`~aiofdpass._outbox.Outbox` holds what waits. ``docs/write-path.md``
tells the story; the rules, each kept in one place:

Rule 1 (order): records reach the socket in the order their ``send()``
returned. A record is written at once only when nothing is queued and
nobody holds the lock; otherwise it joins the queue.

Rule 2 (coalescing, no clock): a small record is written at once unless the
connection already wrote one at once since it last received or since the
loop last ran its flush callback: then it is queued, and the queue is
written by the flush callback, which the loop runs on its next iteration,
or earlier by a receive, or by ``send``'s own periodic yield. So a reply
sent after a receive goes straight out, and the records a task sends one
after another go out together, in one ``sendmsg`` per segment. Only the
program's own sequence of calls, and the socket's room, decide this. A
packet socket (SOCK_SEQPACKET) never coalesces: one sendmsg is one packet,
so each record is written at once when nothing is queued ahead of it, and
its queue (``PacketOutbox``) holds one packet per entry.

Rule 3 (flush on release): whoever holds the lock writes what the socket
takes before letting go (``_Exclusive``). A flush that finds the
socket full starts the background writer, a task of the library that takes
the lock, waits until the queue is written, and ends.

Rule 4 (lifetime): the background writer holds the writer, never the
channel; closing the socket ends it, and ``aclose()`` waits for that. The
queue waits at most ``close_timeout`` seconds at ``aclose()``; whatever is
dropped (at close, on a write error, by garbage collection) is logged with
its count.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING

import anyio
import anyio.lowlevel
from anyio import BrokenResourceError, ClosedResourceError

from ._errors import LimitError
from ._outbox import Outbox, PacketOutbox
from ._transport import OPEN, SHUT, PacketTooLargeError, Transport

if TYPE_CHECKING:
    from ._backend import Driver

__all__ = ["DEFAULT_CLOSE_TIMEOUT", "DIRECT_BYTES", "DIRECT_FDS", "SendLock", "Writer"]

logger = logging.getLogger("aiofdpass")

#: How long ``aclose()`` waits for queued records to be written, by default.
DEFAULT_CLOSE_TIMEOUT = 10.0

#: Records larger than this (or with more descriptors) are written directly
#: from the caller's buffer instead of being copied into the queue.
DIRECT_BYTES = 64 * 1024
DIRECT_FDS = 16
# send() waits for the queue to drain below _LOW_WATER once it holds
# _HIGH_WATER bytes ...
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
# ... and once it holds this many of our duplicate descriptors: each one is
# an open file in this process until it is sent. At most 1024, and never
# more than an eighth of RLIMIT_NOFILE (read when the channel is made).
_FD_HIGH_WATER = 1024
# A call that never has to wait still yields every 32 calls (fairness, and
# a cancellation point in a loop that never blocks).
_YIELD_EVERY_MASK = 31
# The flush callback's states.
_NOT_SCHEDULED = "not scheduled"
_DUE = "due"
_STALE = "stale"


class SendLock:
    """A FIFO lock that works on any event loop (one at a time).

    anyio's lock binds to the backend that first used it; a channel may be
    used by asyncio and later by trio. The lock passes straight to the next
    waiter on release, so nobody can barge in between.
    """

    __slots__ = ("_held", "_waiters")

    def __init__(self) -> None:
        self._held = False
        self._waiters: deque[anyio.Event] = deque()

    async def acquire(self) -> None:
        """Take the lock, waiting behind earlier callers (a cancellation point)."""
        if not self._held:
            self._held = True
            return
        event = anyio.Event()
        self._waiters.append(event)
        try:
            await event.wait()
        except BaseException:
            if event.is_set():
                self.release()  # it was handed to us: pass it on
            else:
                self._waiters.remove(event)
            raise

    def release(self) -> None:
        """Hand the lock to the next waiter, or free it."""
        if self._waiters:
            self._waiters.popleft().set()
        else:
            self._held = False


class _Exclusive:
    """``async with writer._exclusive():`` the lock, and Rule 3 on the way out."""

    __slots__ = ("_lock", "_writer")

    def __init__(self, writer: Writer) -> None:
        self._writer = writer
        # The lock of the loop we acquire on (a new loop gets a new lock).
        self._lock = writer.lock

    async def __aenter__(self) -> None:
        await self._lock.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        writer = self._writer
        try:
            done = writer.lock is not self._lock or writer.write_now()
        finally:
            self._lock.release()
        if not done:
            writer.start_background()


class Writer:
    """The sending side of one connection: queue, lock, policy, writer task."""

    __slots__ = (
        "_calls",
        "_closing",
        "_coalesce",
        "_fd_high_water",
        "_fd_low_water",
        "_flush_pending",
        "_parked",
        "background",
        "burst",
        "close_timeout",
        "dropped_bytes",
        "dropped_fds",
        "dropped_records",
        "lock",
        "outbox",
        "transport",
    )

    def __init__(self, transport: Transport, close_timeout: float) -> None:
        self.transport = transport
        # A packet socket never coalesces: one sendmsg is one packet.
        self._coalesce = not transport.packets
        self.outbox: Outbox | PacketOutbox = (
            PacketOutbox() if transport.packets else Outbox()
        )
        self.lock = SendLock()
        self.close_timeout = close_timeout
        #: What was queued and never written (statistics()): counted where
        #: the queue is dropped, never on the way of a record.
        self.dropped_records = self.dropped_bytes = self.dropped_fds = 0
        #: A record was written at once since the connection last received
        #: or the loop last ran the flush: the next small one is queued
        #: (Rule 2).
        self.burst = False
        #: The flush callback: not scheduled, due, or scheduled but stale
        #: (the queue it was for was written meanwhile).
        self._flush_pending = _NOT_SCHEDULED
        #: The background writer task runs.
        self.background = False
        #: The lock holder waits for room with nothing but the queue to
        #: write, so others may write the queue meanwhile (Rule 3).
        self._parked = False
        self._closing = False
        self._calls = 0
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        self._fd_high_water = max(16, min(_FD_HIGH_WATER, soft // 8))
        self._fd_low_water = self._fd_high_water // 4
        transport.on_send_break = self._on_send_break
        transport.on_new_loop = self._on_new_loop

    # -- sending ------------------------------------------------------------

    async def send_direct(
        self, header: bytes, payload: bytes | memoryview, numbers: list[int]
    ) -> None:
        """Send one large record from the caller's buffer, behind the queue."""
        driver = self.transport.enter()
        if self.transport.send_state is not OPEN:
            self.transport.check_send()
        self._calls += 1
        await self._yield_if_due(driver)
        buffers = [memoryview(header), memoryview(payload)]
        await self._send_exclusive(buffers if payload else buffers[:1], numbers)

    def write_through(
        self, header: bytes, payload: bytes | memoryview, numbers: list[int]
    ) -> bool:
        """Write a record of many descriptors at once, if nothing stands before it.

        For records over ``DIRECT_FDS`` descriptors and at most
        ``DIRECT_BYTES`` of payload, which are never queued (that would take
        a duplicate of each descriptor). Returns ``False``, having written
        nothing, when :meth:`send_direct` must send it instead: something is
        queued or the lock is held (Rule 1), the periodic yield is due, the
        socket is full, or ``ETOOMANYREFS``. A partial write queues the rest
        of the bytes, as :meth:`send_record` does. No coroutine on this path.
        """
        transport = self.transport
        driver = transport.driver
        if driver is None or not driver.is_current():
            transport.enter()  # trio, or another loop than last time
        if transport.send_state is not OPEN:
            transport.check_send()
        if (
            self.outbox.nbytes
            or self.lock._held
            or not (self._calls + 1) & _YIELD_EVERY_MASK
        ):
            return False  # send_direct counts the call and yields
        data = header + payload
        try:
            sent = transport.try_send(data, numbers)
        except PacketTooLargeError:
            raise  # EMSGSIZE: it never fits
        except LimitError:
            # ETOOMANYREFS: send_direct tries once more (behind the queue)
            # and raises LimitError, as for any record written directly.
            return False
        if sent < 0:
            return False  # full: nothing written
        self._calls += 1
        self.burst = self._coalesce
        if sent < len(data):
            # Its descriptors went with the first bytes; the rest follows.
            self.outbox.add_tail(data[sent:])
            self.start_background()
        return True

    def send_record(
        self,
        header: bytes,
        payload: bytes | memoryview,
        numbers: list[int],
        *,
        waited: bool = False,
    ) -> bool:
        """Write or queue one small record now, if that needs no wait.

        Rules 1 and 2; see ``FdChannel.send``. Small: at most
        ``DIRECT_BYTES`` of payload and ``DIRECT_FDS`` descriptors (larger
        ones go to :meth:`send_direct`). Returns ``False`` when the record
        must wait first (the periodic yield, a full queue, or out of
        descriptors while our queued copies hold some): then await
        :meth:`send_record_waiting`, which calls this again with
        ``waited=True``. The common path is one function call, no coroutine.
        """
        transport = self.transport
        driver = transport.driver
        if driver is None or not driver.is_current():
            driver = transport.enter()  # trio, or another loop than last time
        if transport.send_state is not OPEN:
            transport.check_send()
        outbox = self.outbox
        queued = outbox.nbytes  # nonzero exactly when something is queued
        if not waited:
            self._calls += 1
            if not self._calls & _YIELD_EVERY_MASK or (
                queued and (queued >= _HIGH_WATER or outbox.nfds >= self._fd_high_water)
            ):
                return False
        if queued or self.burst or self.lock._held:
            # Queued with our own duplicates (the caller may close its
            # copies on return), to go out with the others.
            try:
                owned = _duplicate(numbers) if numbers else numbers
            except OSError as exc:
                if waited or exc.errno not in (errno.EMFILE, errno.ENFILE):
                    raise
                return False  # our queued copies may be what fills the table
            outbox.add(header, payload, owned)
            if self._flush_pending is not _DUE and not self.background:
                self._schedule_flush(driver)
            return True
        self.burst = self._coalesce
        try:
            sent = transport.try_send(header + payload, numbers)
        except PacketTooLargeError:
            raise  # EMSGSIZE: it never fits, queueing would not help
        except LimitError:
            # ETOOMANYREFS: too many of this user's descriptors in flight.
            # For a small record that is backpressure: queue it; the
            # background writer retries as the peer receives.
            sent = -1
        if sent < 0:  # nothing written: queue all of it
            outbox.add(header, payload, _duplicate(numbers))
        elif sent < len(header) + len(payload):
            # Its descriptors went with the first bytes; the rest follows.
            outbox.add_tail((header + payload)[sent:])
        else:
            return True
        self.start_background()
        return True

    async def send_record_waiting(
        self, header: bytes, payload: bytes | memoryview, numbers: list[int]
    ) -> None:
        """Wait as :meth:`send_record` asked, then write or queue the record."""
        driver = self.transport.driver
        assert driver is not None
        await self._yield_if_due(driver)
        outbox = self.outbox
        if outbox.nbytes >= _HIGH_WATER or outbox.nfds >= self._fd_high_water:
            async with _Exclusive(self):
                await self._drain(full=False)
        try:
            self.send_record(header, payload, numbers, waited=True)
        except OSError as exc:
            # Out of descriptors while our own queued copies hold some: wait
            # until the queue is written, then try once more.
            if exc.errno not in (errno.EMFILE, errno.ENFILE) or not outbox:
                raise
            async with _Exclusive(self):
                await self._drain(full=True)
            self.send_record(header, payload, numbers, waited=True)

    async def _yield_if_due(self, driver: Driver) -> None:
        """Yield to the loop on every 32nd send (counted in ``_calls``)."""
        if not self._calls & _YIELD_EVERY_MASK:
            # Our own yield: write the queue first, so that whether the flush
            # callback runs before or after us (trio varies the order) does
            # not change what is written when. The burst goes on (Rule 2).
            self._flush_before_waiting()
            await driver.checkpoint()

    async def send_bytes(self, buffers: list[memoryview], numbers: list[int]) -> None:
        """Write ``buffers`` completely, ``numbers`` with the first byte (no queue)."""
        driver = self.transport.enter()
        await driver.checkpoint()
        await self._send_exclusive(buffers, numbers)

    async def _send_exclusive(
        self, buffers: list[memoryview], numbers: list[int]
    ) -> None:
        transport = self.transport
        async with _Exclusive(self):
            # A cancelled caller must not write a first byte.
            await anyio.lowlevel.checkpoint_if_cancelled()
            transport.check_send()
            await self._drain(full=True)
            await transport.send_all(buffers, numbers)

    async def send_eof(self) -> None:
        """Write the queue, then shut down sending; a second call does nothing."""
        transport = self.transport
        driver = transport.enter()
        await driver.checkpoint()
        if transport.send_state is SHUT:
            return
        async with _Exclusive(self):
            if transport.send_state is SHUT:
                return
            transport.check_send()
            await self._drain(full=True)
            transport.shutdown_write()

    def idle(self) -> None:
        """End the burst and write the queue now: the connection receives."""
        self.burst = False
        self._flush_before_waiting()

    def _flush_before_waiting(self) -> None:
        if self._flush_pending is _DUE:
            # The callback already in flight must not act later: when it
            # runs, relative to our own task, is up to the scheduler.
            self._flush_pending = _STALE
        if self.outbox:
            self._flush()

    # -- closing ------------------------------------------------------------

    async def aclose(self) -> None:
        """Give the queue up to ``close_timeout`` seconds, then close."""
        transport = self.transport
        if transport.closed:
            await anyio.lowlevel.checkpoint()
            return
        driver = transport.enter()
        try:
            if self.outbox and transport.send_state is OPEN:
                self._closing = True
                with anyio.move_on_after(self.close_timeout) as scope:
                    async with _Exclusive(self):
                        await self._drain(full=True)
                if scope.cancelled_caught:
                    self.close(
                        f"the peer did not read them within close_timeout "
                        f"({self.close_timeout} s)"
                    )
        except (BrokenResourceError, ClosedResourceError):
            pass  # the peer is gone: nothing more can be delivered
        finally:
            self.close("the channel was closed before they were written")
            if self.background or driver.busy:
                # Closing woke the library's own tasks; they end at once, or
                # after the pause of an ETOOMANYREFS retry (at most 0.1 s).
                with anyio.CancelScope(shield=True):
                    await driver.checkpoint()
                    while self.background or driver.busy:
                        await driver.sleep(0.001)
        await driver.checkpoint()

    def close(self, reason: str) -> None:
        """Close now, dropping (and logging) whatever is still queued."""
        self._closing = True
        self._drop(reason)
        self.transport.close()

    def _drop(self, reason: str) -> None:
        outbox = self.outbox
        self.dropped_bytes += outbox.nbytes
        self.dropped_fds += outbox.nfds
        dropped = outbox.discard()
        if dropped:
            self.dropped_records += dropped
            logger.warning(
                "dropped %d queued record(s) that were never written: %s",
                dropped,
                reason,
            )

    # -- the queue ----------------------------------------------------------

    def write_now(self) -> bool:
        """Write what the socket takes now; ``True`` if nothing is left to do.

        The caller holds the lock, or nobody does. Never raises: errors are
        recorded on the transport, which drops the queue.
        """
        if not self.outbox or self.transport.send_state is not OPEN:
            return True
        try:
            return self.transport.write_queue(self.outbox)
        except LimitError:
            return False  # ETOOMANYREFS: the background writer retries
        except (BrokenResourceError, ClosedResourceError):
            return True

    def start_background(self) -> None:
        """Start the background writer unless it runs (or we are closing)."""
        if self.background or self._closing or not self.outbox:
            return
        driver = self.transport.driver
        assert driver is not None
        # Set first: with an eager task factory the task may run to its end
        # inside spawn() (and clear the flag there).
        self.background = True
        try:
            driver.spawn(self._background)
        except BaseException:
            self.background = False
            raise

    async def _background(self) -> None:
        """Run the background writer: take the lock, write the whole queue, end."""
        try:
            async with _Exclusive(self):
                await self._drain(full=True)
        except (BrokenResourceError, ClosedResourceError):
            pass  # recorded on the transport: the next call raises it
        except Exception:  # pragma: no cover - a bug; the next call retries
            logger.exception("aiofdpass background writer failed")
        except BaseException as exc:
            # A cancellation: the event loop is ending, and the queue waits
            # for the channel's next use.
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
        finally:
            self.background = False

    def _schedule_flush(self, driver: Driver) -> None:
        state = self._flush_pending
        if state is _NOT_SCHEDULED:
            driver.call_soon(self._on_flush)
        if state is not _DUE:
            self._flush_pending = _DUE

    def _on_flush(self) -> None:
        """Flush the queue: the event loop runs this on its next iteration (Rule 2)."""
        due = self._flush_pending is _DUE
        self._flush_pending = _NOT_SCHEDULED
        if due:
            self.burst = False
            self._flush()

    def _flush(self) -> None:
        if self.lock._held and not self._parked:
            return  # Rule 3: the lock holder writes the queue
        if not self.write_now():
            self.start_background()

    async def _drain(self, *, full: bool) -> None:
        """Write queued records: all of them, or until below the low marks.

        The caller holds the lock. ``ETOOMANYREFS`` (this user has too many
        descriptors in flight) is backpressure too: the count drops as the
        peer receives, but no event says when, so it retries with a growing
        pause.
        """
        outbox = self.outbox
        transport = self.transport
        driver = transport.driver
        assert driver is not None
        pause = 0.001
        while (
            outbox
            if full
            else (outbox.nbytes > _LOW_WATER or outbox.nfds > self._fd_low_water)
        ):
            transport.check_send()
            try:
                if transport.write_queue(outbox):
                    return
            except LimitError:
                await driver.sleep(pause)
                pause = min(pause * 2, 0.1)
                continue
            pause = 0.001
            self._parked = True
            try:
                await driver.wait_writable()
            finally:
                self._parked = False

    # -- events from the transport -------------------------------------------

    def _on_send_break(self) -> None:
        self._drop("sending failed")

    def _on_new_loop(self) -> None:
        # The loop that used the channel last has ended: its tasks and
        # callbacks are gone. Records it left queued go out on this loop.
        self.lock = SendLock()
        self.burst = self.background = self._parked = False
        self._flush_pending = _NOT_SCHEDULED
        if self.outbox:
            driver = self.transport.driver
            assert driver is not None
            self._schedule_flush(driver)


def _duplicate(numbers: list[int]) -> list[int]:
    """Return our own duplicates of ``numbers`` (close-on-exec).

    :raises OSError: ``EBADF`` if one of ``numbers`` is not open (nothing
        kept), ``EMFILE`` if this process is out of descriptors.
    """
    owned: list[int] = []
    try:
        if len(numbers) == 1:
            return [os.dup(numbers[0])]
        for n in numbers:
            owned.append(os.dup(n))
        # dup takes the lowest free number: a closed number in the list may
        # have become one of our copies, and duplicating it copied ours (the
        # record would carry another descriptor twice instead of failing).
        if not set(owned).isdisjoint(numbers):
            raise OSError(errno.EBADF, "a number in the list was free")
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
            closed = next((n for n in numbers if n in owned), None)
            raise OSError(
                errno.EBADF,
                f"descriptor {numbers[len(owned)] if closed is None else closed} "
                "is not open (was it closed before send?); nothing was sent",
            ) from None
        raise
    return owned
