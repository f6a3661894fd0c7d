"""Cancellation injected at every await point of send and receive.

A canceller task yields ``k`` times and then cancels the operation, for every
``k`` from 0 until the operation completes before the cancel lands. The
scheduler interleaves the tasks the same way for the same ``k`` on asyncio
and uvloop (trio shuffles a little), so the sweep walks the cancellation
through every await of the operation: the initial checkpoint, each wait for
readiness, and after completion. Every outcome is checked against what
``FdChannel.send`` / ``receive`` document, and the autouse fixture checks
that no descriptor leaked.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter

import anyio
import pytest
from anyio.abc import TaskGroup
from anyio.lowlevel import checkpoint

from aiofdpass import FdChannel, Message, ProtocolError, channel_pair, stream_pair

from .helpers import identity, pipe, raw, small_buffers

pytestmark = pytest.mark.anyio

BIG = bytes(range(256)) * 1200  # 300 KiB: many partial writes with 4 KiB buffers


async def cancel_after(k: int, scope: anyio.CancelScope) -> None:
    """Cancel ``scope`` after yielding ``k`` times (-1: cancel it right now)."""
    if k < 0:
        scope.cancel()
        return
    for _ in range(k):
        await checkpoint()
    scope.cancel()


async def collect(chan: FdChannel, out: list[Message]) -> str:
    """Receive until the end; return how it ended."""
    try:
        async for msg in chan:
            out.append(msg)
    except ProtocolError as exc:
        return f"protocol: {exc}"
    return "eof"


async def one_cancelled_send(k: int, r: int, w: int) -> str:
    """Send BIG with two fds, cancelled after ``k`` yields; check the result."""
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    received: list[Message] = []
    ends: list[str] = []
    completed = broken = False
    try:
        async with a, b, anyio.create_task_group() as tg:

            async def receiver() -> None:
                ends.append(await collect(b, received))

            tg.start_soon(receiver)
            with anyio.CancelScope() as scope:
                if k < 0:  # already cancelled when send is called
                    await cancel_after(k, scope)
                else:
                    tg.start_soon(cancel_after, k, scope)
                await a.send(BIG, [r, w])
                completed = True
            try:
                await a.send(b"after", [r])
            except anyio.BrokenResourceError:
                broken = True
            else:
                await a.send_eof()
        datas = [m.data for m in received]
        fds = [[identity(fd.fileno()) for fd in m.fds] for m in received]
    finally:
        for m in received:
            m.close()
    assert not (completed and broken)
    if completed:
        # The cancel came too late: the record went out exactly once.
        assert datas == [BIG, b"after"]
        assert fds == [[identity(r), identity(w)], [identity(r)]]
        assert ends == ["eof"]
        return "completed"
    if not broken:
        # Cancelled before the first byte: nothing happened, channel fine.
        assert datas == [b"after"]
        assert fds == [[identity(r)]]
        assert ends == ["eof"]
        return "cancelled-clean"
    # Cancelled mid-record: never delivered, the peer sees the break.
    assert datas == []
    assert len(ends) == 1 and ends[0].startswith("protocol: ")
    assert "middle of a record" in ends[0]
    return "cancelled-broken"


async def test_cancel_send_at_every_await_point() -> None:
    outcomes: Counter[str] = Counter()
    with pipe() as (r, w):
        k = -1
        while outcomes["completed"] < 3:
            outcomes[await one_cancelled_send(k, r, w)] += 1
            k += 1
            assert k < 2000, outcomes
    # The sweep went through all three documented outcomes.
    assert outcomes["cancelled-clean"] >= 1
    assert outcomes["cancelled-broken"] >= 5
    print(dict(outcomes))


def records(n: int, seed: int) -> list[tuple[bytes, int]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        size = rng.choice([0, 1, 100, 5000, 70_000, 200_000])
        out.append((bytes([i % 256]) * size + i.to_bytes(4, "big"), rng.randint(0, 3)))
    return out


async def arm(attempt: int, k: int, scope: anyio.CancelScope, tg: TaskGroup) -> None:
    """Have ``scope`` cancelled after ``k`` yields, except on every third attempt.

    The attempts left alone let an operation that needs more than ``k``
    yields get through.
    """
    if attempt % 3 == 2:
        return
    if k < 0:
        await cancel_after(k, scope)
    else:
        tg.start_soon(cancel_after, k, scope)


async def one_cancelled_receiver(k: int, r: int) -> int:
    """Receive 30 records, cancelling two receives in three after ``k`` yields."""
    expected = records(30, seed=k)
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    got: list[tuple[bytes, int]] = []
    cancellations = 0
    async with a, b, anyio.create_task_group() as tg:

        async def sender() -> None:
            for data, nfds in expected:
                await a.send(data, [r] * nfds)
            await a.send_eof()

        tg.start_soon(sender)
        for attempt in itertools.count():
            with anyio.CancelScope() as scope:
                await arm(attempt, k, scope, tg)
                try:
                    msg = await b.receive()
                except anyio.EndOfStream:
                    break
                with msg:
                    assert all(identity(fd.fileno()) == identity(r) for fd in msg.fds)
                    got.append((msg.data, len(msg.fds)))
            cancellations += scope.cancelled_caught
    # Nothing lost, nothing duplicated, in order, every fd with its record.
    assert got == expected
    return cancellations


async def test_cancel_receive_at_every_await_point() -> None:
    with pipe() as (r, _):
        total = 0
        for k in range(-1, 12):
            total += await one_cancelled_receiver(k, r)
    assert total > 50


async def test_cancel_a_sender_waiting_behind_a_blocked_large_send() -> None:
    # A holds the send lock in a blocked large send. Small sends queue behind
    # it and return at once until the queue is full; the next one waits
    # (backpressure) and, cancelled there, never reaches the wire. Every send
    # that returned is delivered, in order, after A's record.
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    with pipe() as (r, w):
        async with a, b, anyio.create_task_group() as tg:
            tg.start_soon(a.send, BIG, [r])
            await anyio.wait_all_tasks_blocked()
            queued = 0
            with anyio.move_on_after(0.2) as scope:
                while True:
                    await a.send(queued.to_bytes(4, "big") * 1000, [w])
                    queued += 1
            assert scope.cancelled_caught
            assert queued * 4012 >= 256 * 1024  # it waited only once full
            tg.start_soon(a.send, b"C", [w])
            with await b.receive() as first:
                assert first.data == BIG
                assert [identity(fd.fileno()) for fd in first.fds] == [identity(r)]
            for i in range(queued):
                with await b.receive() as msg:
                    assert msg.data == i.to_bytes(4, "big") * 1000
                    assert [identity(fd.fileno()) for fd in msg.fds] == [identity(w)]
            with await b.receive() as last:
                assert last.data == b"C"


async def test_many_senders_cancelled_at_random() -> None:
    # 20 tasks send 25 small records each while a canceller cancels random
    # sends; a record is received exactly when its send returned.
    a, b = channel_pair()
    rng = random.Random(1234)
    done: set[tuple[int, int]] = set()
    scopes: dict[int, anyio.CancelScope] = {}
    got: list[tuple[int, int]] = []
    with pipe() as (r, _):

        async def receiver() -> None:
            async for msg in b:
                with msg:
                    t, i = map(int, msg.data.split(b":"))
                    assert len(msg.fds) == i % 3
                    got.append((t, i))

        async with a, b, anyio.create_task_group() as tg:
            tg.start_soon(receiver)
            async with anyio.create_task_group() as senders:

                async def sender(t: int) -> None:
                    for i in range(25):
                        with anyio.CancelScope() as scopes[t]:
                            await a.send(f"{t}:{i}".encode(), [r] * (i % 3))
                            done.add((t, i))
                        await checkpoint()

                async def canceller() -> None:
                    for _ in range(300):
                        await checkpoint()
                        scope = scopes.get(rng.randrange(20))
                        if scope is not None:
                            scope.cancel()

                for t in range(20):
                    senders.start_soon(sender, t)
                senders.start_soon(canceller)
            await a.send_eof()
    assert set(got) == done and len(got) == len(done)
    for t in range(20):
        mine = [i for tt, i in got if tt == t]
        assert mine == sorted(mine)
    # Small sends rarely suspend (at most every 32nd call yields), so a
    # random cancel seldom lands inside one: that is allowed, and which sends
    # were cancelled varies. What must hold is above: received == returned.
    # test_cancel_send_at_every_await_point cancels at each point for sure.
    assert 0 < len(done) <= 500


async def one_cancelled_stream_reader(k: int, r: int) -> int:
    """Read 30 framed records off an FdStream, cancelling reads after ``k`` yields.

    Each record is a line ``<length>`` read with ``receive_until``, then its
    payload read with ``receive_exactly``; a cancelled read is tried again.
    """
    expected = records(30, seed=k)
    a, b = stream_pair()
    small_buffers(raw(a), raw(b))
    payloads: list[bytes] = []
    nfds = 0
    cancellations = 0
    async with a, b, anyio.create_task_group() as tg:

        async def sender() -> None:
            for data, n in expected:
                await a.send([b"%d\n" % len(data), data], [r] * n)
            await a.send_eof()

        tg.start_soon(sender)
        length: int | None = None
        for attempt in itertools.count():
            with anyio.CancelScope() as scope:
                await arm(attempt, k, scope, tg)
                try:
                    if length is None:
                        line, fds = await b.receive_until(b"\n", 100)
                        length = int(line)
                    else:
                        data, fds = await b.receive_exactly(length)
                        payloads.append(data)
                        length = None
                except anyio.IncompleteRead:
                    break
                assert all(identity(fd.fileno()) == identity(r) for fd in fds)
                nfds += len(fds)
                for fd in fds:
                    fd.close()
            cancellations += scope.cancelled_caught
        assert b.queued_fds == 0
    # Nothing lost, nothing duplicated, in order; every descriptor once.
    assert payloads == [data for data, _ in expected]
    assert nfds == sum(n for _, n in expected)
    return cancellations


async def test_cancel_stream_reads_at_every_await_point() -> None:
    with pipe() as (r, _):
        total = 0
        for k in range(-1, 12):
            total += await one_cancelled_stream_reader(k, r)
    assert total > 50
