"""The coalescing write path: records queued, written later, never lost."""

from __future__ import annotations

import array
import asyncio
import gc
import logging
import os
import random
import resource
import socket
import threading
import weakref
from contextlib import ExitStack
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint

from aiofdpass import FdChannel, Limits, ProtocolError, channel_pair
from aiofdpass._codec import RecordDecoder, encode_header
from aiofdpass._outbox import Outbox
from aiofdpass._writer import SendLock

from .helpers import copies_of, fill, identity, pipe, raw, small_buffers

pytestmark = pytest.mark.anyio


async def test_a_partly_written_record_never_lends_its_tail_to_later_fds() -> None:
    # A record written at once but cut by a full socket leaves its tail
    # queued; a burst then queues 15 x 16 fds. The tail must not carry them,
    # or the receiver would hold 16 + 240 > 253 unclaimed fds: a valid
    # sender would look like a protocol violation.
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    with pipe() as (r, _):
        async with a, b:
            await a.send(b"A" * 60_000, [r] * 16)  # the first: written at once
            for i in range(15):
                await a.send(b"b%d" % i, [r] * 16)
            for i in range(16):
                with await b.receive() as msg:
                    assert msg.data == (b"A" * 60_000 if i == 0 else b"b%d" % (i - 1))
                    assert len(msg.fds) == 16


async def test_records_queued_behind_a_cancelled_large_send_still_go_out() -> None:
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    count = fill(raw(a))
    async with a, b, anyio.create_task_group() as tg:
        big_scope = anyio.CancelScope()

        async def big() -> None:
            with big_scope:
                await a.send(b"x" * (70 * 1024))

        tg.start_soon(big)
        await anyio.wait_all_tasks_blocked()
        await a.send(b"small")  # queued behind the large send
        # Let the scheduled flush run now, while the lock is still held (it
        # must then leave the record to whoever releases the lock).
        await anyio.wait_all_tasks_blocked()
        big_scope.cancel()  # before the large send wrote its first byte
        await anyio.wait_all_tasks_blocked()
        for _ in range(count):
            assert (await b.receive()).data == b""
        with anyio.fail_after(5):  # nothing but the queue's own flush
            assert (await b.receive()).data == b"small"


async def test_queued_descriptors_are_bounded() -> None:
    # The peer does not read: records queue with our duplicates of their
    # fds, and send waits once 1024 are queued instead of piling up copies
    # until the process runs out of descriptors.
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    fill(raw(a))
    before = len(os.listdir("/proc/self/fd"))
    with pipe() as (r, _):
        async with a, b:
            returned = 0
            with anyio.move_on_after(0.5) as scope:
                while True:
                    await a.send(b"", [r])
                    returned += 1
            assert scope.cancelled_caught
            budget = a._writer._fd_high_water  # 1024, or less under a low RLIMIT
            assert budget <= returned < budget + 50
            assert len(os.listdir("/proc/self/fd")) - before < budget + 50


def test_a_dropped_outbox_closes_its_queued_duplicates() -> None:
    # A channel dropped without aclose() (or whose event loop ended with
    # records queued) must not keep its copies open for the process's life.
    with pipe() as (r, w):
        outbox = Outbox()
        outbox.add(encode_header(1, 2), b"x", [os.dup(r), os.dup(r)])
        assert copies_of(w) == 4
        del outbox
        gc.collect()
        assert copies_of(w) == 2  # only r and w


async def test_close_fds_failure_after_delivery_does_not_raise(
    caplog: pytest.LogCaptureFixture,
) -> None:
    a, b = channel_pair()
    with pipe() as (r, w):
        dup = os.dup(r)
        async with a, b:
            # The same number twice: closed once, and send does not raise
            # (raising would invite the caller to hand the fds off again).
            await a.send(b"handoff", [dup, dup], close_fds=True)
            with pytest.raises(OSError):  # noqa: PT011
                os.fstat(dup)
            with await b.receive() as msg:
                assert len(msg.fds) == 2

            class Broken:
                def fileno(self) -> int:
                    return w

                def close(self) -> None:
                    raise OSError("cannot close")

            caplog.set_level(logging.WARNING, logger="aiofdpass")
            await a.send(b"again", [Broken()], close_fds=True)
            (await b.receive()).close()
            assert "the record was sent all the same" in caplog.text


def test_a_channel_outlives_its_first_event_loop(anyio_backend_name: str) -> None:
    a, b = channel_pair()

    async def exchange() -> None:
        for i in range(5):
            await a.send(b"r%d" % i)
        for i in range(5):
            assert (await b.receive()).data == b"r%d" % i

    anyio.run(exchange, backend=anyio_backend_name)
    anyio.run(exchange, backend=anyio_backend_name)

    async def close() -> None:
        await a.aclose()
        await b.aclose()

    anyio.run(close, backend=anyio_backend_name)


async def test_records_the_peer_sent_survive_our_failed_write() -> None:
    # Records are queued; the peer stops reading (SHUT_RD), sends its last
    # words and ends. Our flush then fails (EPIPE): that breaks only sending.
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    fill(raw(a))
    with pipe() as (r, _):
        async with a:
            for i in range(20):
                await a.send(b"queued%d" % i, [r])
            raw(b).shutdown(socket.SHUT_RD)
            await b.send(b"goodbye", [r])
            await b.send_eof()
            with await a.receive() as msg:  # the flush inside fails here
                assert msg.data == b"goodbye"
                assert len(msg.fds) == 1
            with pytest.raises(anyio.EndOfStream):
                await a.receive()
            with pytest.raises(anyio.BrokenResourceError, match="can still"):
                await a.send(b"more")
        await b.aclose()


async def test_a_cancelled_send_eof_does_not_strand_queued_records() -> None:
    # L, a large record, holds the send lock on a full socket; four small
    # records queue behind it; send_eof waits for the lock. The peer reads
    # L, so the lock passes from L to send_eof, which drains the small
    # records into a socket that fills again and is cancelled there. The
    # rest of the queue must still go out once the peer reads on.
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    async with a, b, anyio.create_task_group() as tg:
        tg.start_soon(a.send, b"L" * 200_000)
        await anyio.wait_all_tasks_blocked()
        for i in range(4):
            await a.send(b"S%d" % i + b"s" * 60_000)

        async def eof_with_timeout() -> None:
            with anyio.move_on_after(0.5):
                await a.send_eof()

        tg.start_soon(eof_with_timeout)
        await anyio.wait_all_tasks_blocked()
        assert (await b.receive()).data == b"L" * 200_000
        await anyio.sleep(0.6)  # send_eof holds the lock, then is cancelled
        with anyio.fail_after(5):
            for i in range(4):
                assert (await b.receive()).data == b"S%d" % i + b"s" * 60_000


def test_the_descriptor_budget_follows_rlimit_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        a, b = channel_pair()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert a._writer._fd_high_water == 64  # an eighth of 512, not 1024
    a._transport.close()
    b._transport.close()


class Counting(socket.socket):
    """A socket that counts its ``sendmsg`` calls."""

    calls = 0

    def sendmsg(self, *args: Any, **kwargs: Any) -> int:
        self.calls += 1
        return super().sendmsg(*args, **kwargs)


def counting_pair() -> tuple[Counting, FdChannel, FdChannel]:
    """A channel pair whose first end counts its writes (room for all)."""
    sa, sb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sa.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    counting = Counting(fileno=sa.detach())
    return counting, FdChannel.from_socket(counting), FdChannel.from_socket(sb)


async def test_records_sent_one_after_another_go_out_together() -> None:
    # Rule 2: the first is written at once; the nine sent without waiting
    # are queued and written in one sendmsg when the loop runs its callbacks.
    counting, a, b = counting_pair()
    with pipe() as (r, _):
        async with a, b:
            for i in range(10):
                await a.send(b"r%d" % i, [r])
            assert counting.calls == 1
            await anyio.wait_all_tasks_blocked()
            assert counting.calls == 2
            for i in range(10):
                with await b.receive() as msg:
                    assert msg.data == b"r%d" % i
                    assert [identity(fd.fileno()) for fd in msg.fds] == [identity(r)]


async def test_a_reply_after_a_receive_goes_out_at_once() -> None:
    # Request/response: a receive ends a burst, so each reply is written by
    # its own send, before send returns.
    counting, a, b = counting_pair()
    with pipe() as (r, _):
        async with a, b:
            for i in range(5):
                await b.send(b"q%d" % i)
                assert (await a.receive()).data == b"q%d" % i
                await a.send(b"a%d" % i, [r])
                assert counting.calls == i + 1
                (await b.receive()).close()


async def test_a_receive_writes_the_queue_before_it_reads() -> None:
    counting, a, b = counting_pair()
    async with a, b:
        for i in range(3):
            await a.send(b"r%d" % i)  # one written, two queued
        await b.send(b"ping")
        assert counting.calls == 1
        assert (await a.receive()).data == b"ping"  # data was there: no wait
        assert counting.calls == 2
        assert [(await b.receive()).data for _ in range(3)] == [b"r0", b"r1", b"r2"]


async def test_a_record_of_many_descriptors_goes_out_at_once_without_copies() -> None:
    # Over 16 descriptors a record is never queued (that would take a
    # duplicate of each); with nothing queued before it, send writes it
    # itself, and no copy of a descriptor is ever made.
    counting, a, b = counting_pair()
    with pipe() as (r, _):
        async with a, b:
            before = copies_of(r)
            await a.send(b"many", [r] * 40)
            assert counting.calls == 1
            assert copies_of(r) == before  # in flight, but not duplicated here
            with await b.receive() as msg:
                assert msg.data == b"many" and len(msg.fds) == 40


async def test_a_record_of_many_descriptors_waits_behind_queued_records() -> None:
    # Rule 1: the two small records queued behind the first go out before
    # the record of 20 descriptors sent after them.
    counting, a, b = counting_pair()
    with pipe() as (r, _):
        async with a, b:
            for i in range(3):
                await a.send(b"r%d" % i, [r])  # one written, two queued
            assert counting.calls == 1
            await a.send(b"many", [r] * 20)
            for expected, nfds in ((b"r0", 1), (b"r1", 1), (b"r2", 1), (b"many", 20)):
                with await b.receive() as msg:
                    assert (msg.data, len(msg.fds)) == (expected, nfds)


async def test_a_record_of_many_descriptors_cut_by_a_full_socket_is_completed() -> None:
    # The socket takes part of it: its descriptors went with the first
    # bytes, the rest of its bytes follow (queued, without descriptors), and
    # the record after it is intact.
    counting, a, b = counting_pair()
    small_buffers(counting, raw(b))
    with pipe() as (r, _):
        async with a, b, anyio.create_task_group() as tg:
            await a.send(b"A" * 60_000, [r] * 20)
            assert counting.calls == 1  # returned, the rest queued
            tg.start_soon(a.send, b"after", [r] * 17)  # waits for room
            with await b.receive() as msg:
                assert msg.data == b"A" * 60_000 and len(msg.fds) == 20
                assert {identity(fd.fileno()) for fd in msg.fds} == {identity(r)}
            with await b.receive() as msg:
                assert msg.data == b"after" and len(msg.fds) == 17


async def test_many_descriptor_records_still_check_cancellation_every_32nd() -> None:
    # Written without a wait, a send loop of them would never check for
    # cancellation (nor yield); the 32nd send does, so in a cancelled scope
    # 31 go out and the 32nd is not sent.
    a, b = channel_pair()
    sent = 0
    with pipe() as (r, _):
        async with a, b:
            with anyio.CancelScope() as scope:
                scope.cancel()
                for _ in range(32):
                    await a.send(b"x", [r] * 17)
                    sent += 1
            assert scope.cancelled_caught and sent == 31
            await a.send_eof()
            got = 0
            async for msg in b:
                msg.close()
                got += 1
            assert got == 31


def mixed_records(
    seed: int, n: int, *, max_size: int = 100_000
) -> list[tuple[int, int]]:
    """(payload size, descriptors) of ``n`` records that take every send path.

    Small (queued or written at once), over 16 descriptors and at most
    64 KiB (written through, or behind the queue), and over 64 KiB (direct).
    Each carries at least one descriptor, so a receiver can tell its sender.
    """
    rng = random.Random(seed)
    # (size range, descriptor range) of each shape, upper bounds exclusive.
    shapes = [
        ((0, 64), (1, 17)),
        ((0, 8_000), (16, 17)),
        ((0, 16), (17, 254)),
        ((0, 64 * 1024 + 1), (17, 254)),
        ((40_000, 64 * 1024 + 1), (253, 254)),
        ((64 * 1024 + 1, 100_000), (1, 254)),
    ]
    records = []
    for _ in range(n):
        sizes, counts = rng.choice(shapes)
        records.append((min(rng.randrange(*sizes), max_size), rng.randrange(*counts)))
    return records


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
@pytest.mark.parametrize("seed", range(3))
async def test_mixed_records_from_several_tasks_arrive_in_return_order(
    kind: str, seed: int
) -> None:
    # Rule 1 across tasks, with every path at once: a record whose send()
    # returned before another send() was called is received first, with
    # exactly its own descriptors (each task sends copies of its own pipe).
    # Small buffers cut the records (partial writes, tails queued).
    a, b = channel_pair(kind=kind)
    if kind == "stream":
        small_buffers(raw(a), raw(b))
    n_tasks, per_task = 3, 30
    max_size = 50_000 if kind == "seqpacket" else 100_000  # one packet
    plans = [
        mixed_records(seed * 10 + t, per_task, max_size=max_size)
        for t in range(n_tasks)
    ]
    events: list[tuple[str, tuple[int, int]]] = []
    got: list[tuple[int, int]] = []
    with ExitStack() as stack:
        pipes = [stack.enter_context(pipe())[0] for _ in range(n_tasks)]
        ids = [identity(fd) for fd in pipes]

        async def sender(t: int) -> None:
            for i, (size, nfds) in enumerate(plans[t]):
                events.append(("call", (t, i)))
                await a.send(b"%d:%d|" % (t, i) + b"x" * size, [pipes[t]] * nfds)
                events.append(("return", (t, i)))
                if i % 4 == t:
                    await checkpoint()

        async with a, b, anyio.create_task_group() as tg:
            for t in range(n_tasks):
                tg.start_soon(sender, t)
            with anyio.fail_after(30):
                for _ in range(n_tasks * per_task):
                    with await b.receive() as msg:
                        head, rest = msg.data.split(b"|", 1)
                        t, i = map(int, head.split(b":"))
                        assert (len(rest), len(msg.fds)) == plans[t][i]
                        assert {identity(fd.fileno()) for fd in msg.fds} == {ids[t]}
                        got.append((t, i))
    position = {record: n for n, record in enumerate(got)}
    returned: list[tuple[int, int]] = []
    for what, record in events:
        if what == "return":
            returned.append(record)
        else:
            assert all(position[r] < position[record] for r in returned)


async def test_a_record_of_many_descriptors_never_cuts_into_a_large_one() -> None:
    # A large record holds the lock while it waits for room, with nothing
    # queued. Room appears (the peer read some bytes) before its task runs
    # again: a record of 20 descriptors sent now must wait for the lock,
    # not write itself into the middle of the large record's bytes.
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    big = bytes(range(256)) * 800
    sock = raw(b)
    decoder = RecordDecoder(Limits())
    with pipe() as (r, _):
        async with a, b, anyio.create_task_group() as tg:
            tg.start_soon(a.send, big)
            await anyio.wait_all_tasks_blocked()  # the large send waits for room
            decoder.feed(sock.recv(6000))  # room, and no task has run since
            tg.start_soon(a.send, b"many", [r] * 20)
            await anyio.wait_all_tasks_blocked()
            got: list[tuple[bytes, int]] = []
            with anyio.fail_after(10):
                while len(got) < 2:
                    await anyio.wait_readable(sock)
                    data, ancdata, _, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(1024))
                    fds = [
                        fd
                        for *_, raw_fds in ancdata
                        for fd in array.array("i", raw_fds)
                    ]
                    decoder.feed(data, fds)
                    while (msg := decoder.next_message()) is not None:
                        with msg:
                            got.append((msg.data, msg.nfds))
            assert got == [(big, 0), (b"many", 20)]


@pytest.mark.parametrize("seed", range(3))
async def test_a_reader_of_tiny_chunks_never_holds_over_253_unclaimed(
    seed: int,
) -> None:
    # A peer that reads a few bytes at a time gets each write's descriptors
    # with its first byte. Records of 253 descriptors cut by a full socket,
    # their tails, and queued records must never put more than 253 of them
    # ahead of the record being read (the decoder's ProtocolError).
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    sock = raw(b)
    rng = random.Random(seed)
    records = mixed_records(seed, 60)
    decoder = RecordDecoder(Limits())
    with pipe() as (r, _):
        async with a, b, anyio.create_task_group() as tg:

            async def sender() -> None:
                for i, (size, nfds) in enumerate(records):
                    await a.send(b"%d|" % i + b"y" * size, [r] * nfds)
                await a.send_eof()

            tg.start_soon(sender)
            n = 0
            with anyio.fail_after(30):
                while True:
                    await anyio.wait_readable(sock)
                    try:
                        data, ancdata, _, _ = sock.recvmsg(
                            rng.choice([1, 2, 7, 16, 100, 5000]),
                            socket.CMSG_SPACE(253 * 4),
                        )
                    except BlockingIOError:
                        continue
                    decoder.feed(
                        data,
                        [fd for *_, fds in ancdata for fd in array.array("i", fds)],
                    )
                    if not data:
                        decoder.end_of_stream()
                        break
                    while (msg := decoder.next_message()) is not None:
                        with msg:
                            assert msg.data.startswith(b"%d|" % n)
                            assert msg.nfds == records[n][1]
                            n += 1
            assert n == len(records)


@pytest.mark.parametrize(
    ("bad", "error", "says"),
    [
        ([True] * 17, TypeError, "a bool is not a descriptor"),
        ([0] * 16 + [True], TypeError, "a bool is not a descriptor"),
        ([0] * 16 + [-1], ValueError, "between 0 and 2147483647, got -1"),
        ([0] * 16 + [2**31], ValueError, "between 0 and 2147483647, got 2147483648"),
        ([0] * 16 + [3.0], TypeError, "cannot send float"),
    ],
    ids=["bools", "a-bool", "negative", "too-large", "a-float"],
)
@pytest.mark.parametrize("queued", [False, True], ids=["write-through", "behind-queue"])
async def test_a_bad_item_in_a_many_descriptor_list_sends_and_copies_nothing(
    bad: list[object], error: type[Exception], says: str, queued: bool
) -> None:
    # The list of plain numbers is checked in C; anything else in it (a
    # bool is an int subclass) is refused by the checks, as list, tuple or
    # iterator, before a byte or a descriptor goes anywhere.
    a, b = channel_pair()
    with pipe() as (r, _), pipe() as (w, _):
        items = [r if type(x) is int and x == 0 else x for x in bad]
        async with a, b:
            if queued:
                await a.send(b"q1", [w])
                await a.send(b"q2", [w])  # queued behind q1
            before = copies_of(r)
            for fds in (items, tuple(items), iter(items)):
                with pytest.raises(error, match=says):
                    await a.send(b"bad", fds, close_fds=True)
            assert copies_of(r) == before
            await a.send(b"ok", [r] * 17)
            await a.send_eof()
            got = []
            async for msg in b:
                with msg:
                    got.append((msg.data, len(msg.fds)))
            assert got == [(b"q1", 1), (b"q2", 1)] * queued + [(b"ok", 17)]


@pytest.mark.parametrize("queued", [False, True], ids=["write-through", "behind-queue"])
async def test_a_closed_number_in_a_many_descriptor_list_is_ebadf(queued: bool) -> None:
    # Refused before anything is written; the record queued before it
    # (with our copy of its descriptor) is still written, once.
    a, b = channel_pair()
    with pipe() as (r, _), pipe() as (w, _):
        closed = os.dup(r)
        os.close(closed)
        async with a, b:
            if queued:
                await a.send(b"q1", [w])
                await a.send(b"q2", [w])
            before = copies_of(r)
            for where in (0, 16, 39):
                fds = [r] * 40
                fds[where] = closed
                with pytest.raises(OSError, match=f"descriptor {closed} is not open"):
                    await a.send(b"bad", fds, close_fds=True)
            assert copies_of(r) == before
            await a.send(b"ok", [r] * 17)
            await a.send_eof()
            got = []
            async for msg in b:
                with msg:
                    got.append((msg.data, len(msg.fds)))
            assert got == [(b"q1", 1), (b"q2", 1)] * queued + [(b"ok", 17)]


async def test_a_record_written_through_in_part_is_completed_by_aclose() -> None:
    # Its send returned with the tail queued: aclose() writes the tail.
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    with pipe() as (r, _):
        async with b, anyio.create_task_group() as tg:
            await a.send(b"T" * 60_000, [r] * 30)
            assert a.statistics().bytes_queued > 0  # the tail
            got = []

            async def reader() -> None:
                async for msg in b:
                    with msg:
                        got.append((msg.data, len(msg.fds)))

            tg.start_soon(reader)
            with anyio.fail_after(10):
                await a.aclose()
        assert got == [(b"T" * 60_000, 30)]


async def test_a_tail_not_written_within_close_timeout_is_dropped_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The peer never reads: aclose() gives up, logs the record it dropped,
    # and the peer sees a truncated record (its descriptors closed there).
    a, b = channel_pair(close_timeout=0.05)
    small_buffers(raw(a), raw(b))
    with pipe() as (r, _):
        async with b:
            await a.send(b"T" * 60_000, [r] * 30)
            assert a.statistics().bytes_queued > 0
            caplog.set_level(logging.WARNING, logger="aiofdpass")
            await a.aclose()
            assert "dropped 1 queued record(s)" in caplog.text
            assert a.statistics().records_dropped == 1
            with anyio.fail_after(5), pytest.raises(ProtocolError, match="middle"):
                await b.receive()


async def test_send_eof_after_a_partial_write_through_ends_after_the_record() -> None:
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    with pipe() as (r, _):
        async with a, b, anyio.create_task_group() as tg:
            buf = bytearray(b"T" * 60_000)
            await a.send(buf, [r] * 30)
            assert a.statistics().bytes_queued > 0
            buf[:] = b"U" * 60_000  # the caller's buffer is its own again
            tg.start_soon(a.send_eof)
            got = []
            with anyio.fail_after(10):
                async for msg in b:
                    with msg:
                        got.append((msg.data, len(msg.fds)))
            assert got == [(b"T" * 60_000, 30)]
            with pytest.raises(anyio.ClosedResourceError):
                await a.send(b"late", [r] * 20)


@pytest.mark.parametrize("second", ["asyncio", "trio"])
def test_a_tail_left_by_an_ended_event_loop_goes_out_first_on_the_next(
    anyio_backend_name: str, second: str
) -> None:
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    with pipe() as (r, w):

        async def first() -> None:
            await a.send(b"T" * 60_000, [r] * 30)
            assert a.statistics().bytes_queued > 0  # the loop ends here

        async def later() -> list[tuple[bytes, int, tuple[int, int]]]:
            got = []

            async def sender() -> None:
                await a.send(b"next", [w] * 20)
                await a.send(b"small", [w])
                await a.send_eof()

            async with anyio.create_task_group() as tg:
                tg.start_soon(sender)
                with anyio.fail_after(10):
                    async for msg in b:
                        with msg:
                            fd = msg.fds[0].fileno()
                            got.append((msg.data[:4], len(msg.fds), identity(fd)))
            await a.aclose()
            await b.aclose()
            return got

        anyio.run(first, backend=anyio_backend_name)
        got = anyio.run(later, backend=second)
        assert got == [
            (b"TTTT", 30, identity(r)),
            (b"next", 20, identity(w)),
            (b"smal", 1, identity(w)),
        ]


async def test_a_packet_of_many_descriptors_waits_behind_queued_packets() -> None:
    a, b = channel_pair(kind="seqpacket")
    small_buffers(raw(a))  # the sender's buffer bounds a connected SEQPACKET
    filled = 0
    while True:
        try:
            raw(a).send(b"f")
        except BlockingIOError:
            break
        filled += 1
    with pipe() as (r, w):
        async with a, b, anyio.create_task_group() as tg:
            for i in range(3):
                await a.send(b"s%d" % i, [w])  # the socket is full: queued
            tg.start_soon(a.send, b"many", [r] * 40)
            await anyio.wait_all_tasks_blocked()
            for _ in range(filled):
                assert (await b.receive()).data == b"f"
            for data, fd, nfds in (
                (b"s0", w, 1),
                (b"s1", w, 1),
                (b"s2", w, 1),
                (b"many", r, 40),
            ):
                with await b.receive() as msg:
                    assert (msg.data, len(msg.fds)) == (data, nfds)
                    assert {identity(f.fileno()) for f in msg.fds} == {identity(fd)}


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
@pytest.mark.parametrize("pattern", [(1, 17), (17, 1), (0, 20, 3), (253,)])
async def test_mixed_sends_check_cancellation_every_32nd_call(
    kind: str, pattern: tuple[int, ...]
) -> None:
    a, b = channel_pair(kind=kind)
    sent = 0
    with pipe() as (r, _):
        async with a, b:
            for k in range(5):  # the count does not start at zero
                await a.send(b"w", [r] * pattern[k % len(pattern)])
            with anyio.CancelScope() as scope:
                scope.cancel()
                for k in range(64):
                    await a.send(b"x", [r] * pattern[k % len(pattern)])
                    sent += 1
            assert scope.cancelled_caught and sent <= 31
            await a.send_eof()
            got = 0
            async for msg in b:
                msg.close()
                got += 1
            assert got == 5 + sent


@pytest.mark.parametrize("kind", ["stream", "seqpacket"])
@pytest.mark.parametrize("seed", range(4))
async def test_mixed_senders_cancelled_at_random_deliver_what_returned(
    kind: str, seed: int
) -> None:
    # Every record whose send returned arrives, none whose send was
    # cancelled does, in return order; unless a large record cancelled
    # midway broke the channel (documented), then only a prefix arrives.
    a, b = channel_pair(kind=kind)
    if kind == "stream":
        small_buffers(raw(a), raw(b))
    rng = random.Random(seed)
    n_tasks = 5
    max_size = 50_000 if kind == "seqpacket" else 100_000
    plans = [
        mixed_records(seed * 10 + t, 30, max_size=max_size) for t in range(n_tasks)
    ]
    done: list[tuple[int, int]] = []
    got: list[tuple[int, int]] = []
    events: list[tuple[str, tuple[int, int]]] = []
    scopes: dict[int, anyio.CancelScope] = {}
    broken = False
    with ExitStack() as stack:
        pipes = [stack.enter_context(pipe())[0] for _ in range(n_tasks)]
        ids = [identity(fd) for fd in pipes]

        async def receiver() -> None:
            nonlocal broken
            try:
                async for msg in b:
                    with msg:
                        t, i = map(int, msg.data.split(b"|", 1)[0].split(b":"))
                        assert len(msg.fds) == plans[t][i][1]
                        assert {identity(fd.fileno()) for fd in msg.fds} == {ids[t]}
                        got.append((t, i))
            except ProtocolError:
                broken = True

        async def sender(t: int) -> None:
            nonlocal broken
            for i, (size, nfds) in enumerate(plans[t]):
                with anyio.CancelScope() as scopes[t]:
                    events.append(("call", (t, i)))
                    data = b"%d:%d|" % (t, i) + b"x" * size
                    try:
                        await a.send(data, [pipes[t]] * nfds)
                    except anyio.BrokenResourceError:
                        broken = True
                        return
                    done.append((t, i))
                    events.append(("return", (t, i)))
                if i % 3 == 0:
                    await checkpoint()

        async def canceller() -> None:
            for _ in range(300):
                await checkpoint()
                scope = scopes.get(rng.randrange(n_tasks))
                if scope is not None and rng.random() < 0.3:
                    scope.cancel()

        async with b, anyio.create_task_group() as tg:
            tg.start_soon(receiver)
            with anyio.fail_after(30):
                async with a:
                    async with anyio.create_task_group() as senders:
                        for t in range(n_tasks):
                            senders.start_soon(sender, t)
                        senders.start_soon(canceller)
                    try:
                        await a.send_eof()
                    except anyio.BrokenResourceError:
                        broken = True
    assert set(got) <= set(done)
    if not broken:
        assert sorted(got) == sorted(done)
    position = {record: n for n, record in enumerate(got)}
    returned: list[tuple[int, int]] = []
    for what, record in events:
        if what == "return":
            returned.append(record)
        elif record in position:
            assert all(
                position[r] < position[record] for r in returned if r in position
            )


async def test_a_large_send_waits_for_the_lock_behind_another() -> None:
    # Our own FIFO lock: the second large record waits, whole, behind the
    # first (records never interleave on the wire).
    a, b = channel_pair()
    async with a, b, anyio.create_task_group() as tg:
        small_buffers(raw(a), raw(b))
        tg.start_soon(a.send, b"L" * 200_000)  # holds the lock, socket full
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(a.send, b"M" * 100_000)  # waits for the lock
        await anyio.wait_all_tasks_blocked()
        assert (await b.receive()).data == b"L" * 200_000
        assert (await b.receive()).data == b"M" * 100_000


async def test_a_waiter_handed_the_lock_and_cancelled_passes_it_on() -> None:
    # The lock passes straight to the next waiter on release; if that waiter
    # is cancelled before it runs, it must hand the lock on, not strand it.
    lock = SendLock()
    await lock.acquire()
    order: list[str] = []

    async def waiter(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            await lock.acquire()
            order.append(name)
            lock.release()

    async with anyio.create_task_group() as tg:
        b_scope, c_scope = anyio.CancelScope(), anyio.CancelScope()
        tg.start_soon(waiter, "b", b_scope)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(waiter, "c", c_scope)
        await anyio.wait_all_tasks_blocked()
        b_scope.cancel()  # b is cancelled but has not run yet ...
        lock.release()  # ... so the lock is handed to it
        with anyio.fail_after(5):
            while not order:  # noqa: ASYNC110
                await anyio.sleep(0.01)
    assert order == ["c"]
    await lock.acquire()  # free again


class CollectingSocket(socket.socket):
    """Runs the garbage collector right after its next ``sendmsg``."""

    armed = False

    def sendmsg(self, *args: Any, **kwargs: Any) -> int:
        sent = super().sendmsg(*args, **kwargs)
        if self.armed:
            self.armed = False
            gc.collect()
        return sent


async def test_a_channel_collected_during_its_own_flush_delivers_and_closes() -> None:
    # The collector may finalise a dropped channel in the middle of the
    # flush's bookkeeping (after sendmsg, before the queue advances): the
    # close must wait for a safe point (on trio a failure here ended the
    # whole run), and nothing that was written is reported as dropped.
    sa, sb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sock = CollectingSocket(fileno=sa.detach())
    a = FdChannel.from_socket(sock)
    with pipe() as (r, _):
        async with FdChannel.from_socket(sb) as b:
            await a.send(b"first", [r])  # written at once
            await a.send(b"second", [r])  # queued; the loop flushes it
            a.cycle = a  # type: ignore[attr-defined]  # only gc can free it
            ref = weakref.ref(a)
            del a
            gc.disable()
            try:
                sock.armed = True
                with pytest.warns(ResourceWarning, match="unclosed FdChannel"):
                    await anyio.wait_all_tasks_blocked()
            finally:
                gc.enable()
            assert ref() is None
            for expected in (b"first", b"second"):
                with await b.receive() as msg:
                    assert msg.data == expected
                    assert [identity(fd.fileno()) for fd in msg.fds] == [identity(r)]
            with anyio.fail_after(5), pytest.raises(anyio.EndOfStream):
                await b.receive()


def collect_in_another_thread() -> None:
    thread = threading.Thread(target=gc.collect)
    thread.start()
    thread.join()


def test_a_channel_collected_in_another_thread_is_closed_on_its_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # asyncio in debug mode refuses loop calls from another thread: the
    # finaliser hands the close to the loop (it used to hang asyncio.run).
    async def main() -> tuple[bool, int]:
        a, b = channel_pair()
        small_buffers(raw(a), raw(b))
        fill(raw(a))
        with pipe() as (r, _):
            for i in range(50):
                await a.send(b"q%d" % i, [r])  # queued: the socket is full
            a.cycle = a  # type: ignore[attr-defined]
            ref = weakref.ref(a)
            del a
            gc.disable()
            try:
                with pytest.warns(ResourceWarning, match="unclosed FdChannel"):
                    collect_in_another_thread()
            finally:
                gc.enable()
            collected = ref() is None
            await asyncio.sleep(0.01)  # the loop runs the close
            copies = copies_of(r) - 2
        await b.aclose()
        return collected, copies

    caplog.set_level(logging.WARNING, logger="aiofdpass")
    collected, copies = asyncio.run(asyncio.wait_for(main(), 10), debug=True)
    assert collected
    assert copies == 0  # the queued duplicates were closed
    assert "dropped 50 queued record(s)" in caplog.text
