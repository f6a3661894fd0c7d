"""The channel under every way of running an event loop, not just anyio's runner.

Plain sync tests: each runs its scenario under ``asyncio.run``,
``uvloop.run``, ``asyncio.Runner``, a loop made by hand, ``trio.run`` and
``anyio.run`` (asyncio and trio), the way users run them. The pytest anyio
plugin (which starts every other test's loop through ``anyio.run``) hid a
lost-delivery bug here (issue 9). The scenario bodies use anyio's API, which
works inside any of these loops; what differs is who started the loop.

Each scenario returns what it observed and the test body asserts on it, so a
failure says what went wrong instead of surfacing as an exception from
inside the event loop. Waits that a broken implementation would never end
are bounded by ``DEADLINE``.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import gc
import logging
import os
import re
import resource
import socket
import sys
import termios
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import anyio
import pytest
import trio
import uvloop
from anyio.lowlevel import checkpoint
from anyio.streams.buffered import BufferedByteReceiveStream

from aiofdpass import FdChannel, ProtocolError, channel_pair, create_datagram_socket
from aiofdpass.prefork import WorkerPool

from .helpers import copies_of, pipe, raw, small_buffers, soft_fd_limit_at_least

T = TypeVar("T")

#: How long a scenario waits for something a working channel does at once.
DEADLINE = 3.0

#: Records a sender leaves queued by a peer that does not read: 300 records
#: of 44 bytes on the wire (12-byte header, 32-byte payload) are 13,200
#: bytes, more than a socket whose SO_SNDBUF is 4096 (8192 in the kernel)
#: can hold however they are packed into sendmsg calls, so some are always
#: left in the channel's queue, with its copies of their descriptors.
OVERFLOW = 300


def padded(tag: bytes, i: int) -> bytes:
    """A 32-byte payload that says which record it is."""
    return (tag + b"%07d" % i).ljust(32, b".")


# -- the ways to run a loop -------------------------------------------------


class Runner(Protocol):
    def __call__(self, main: Callable[[], Coroutine[Any, Any, T]]) -> T: ...


def run_asyncio(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(main())


def run_uvloop(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    result: T = uvloop.run(main())
    return result


def run_asyncio_runner(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    if sys.version_info < (3, 11):  # pragma: no cover - asyncio.Runner is 3.11+
        pytest.skip("asyncio.Runner is new in Python 3.11")
    else:
        with asyncio.Runner() as runner:
            return runner.run(main())


def run_hand_made_loop(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    # Not even set as the thread's current loop: only running it counts.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def run_trio(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return trio.run(main)


def run_anyio_asyncio(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return anyio.run(main, backend="asyncio")


def run_anyio_trio(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return anyio.run(main, backend="trio")


RUNNERS = [
    pytest.param(run_asyncio, id="asyncio.run"),
    pytest.param(run_uvloop, id="uvloop.run"),
    pytest.param(run_asyncio_runner, id="asyncio.Runner"),
    pytest.param(run_hand_made_loop, id="hand-made-loop"),
    pytest.param(run_trio, id="trio.run"),
    pytest.param(run_anyio_asyncio, id="anyio.run-asyncio"),
    pytest.param(run_anyio_trio, id="anyio.run-trio"),
]


# -- helpers ------------------------------------------------------------------


@pytest.fixture(autouse=True)
def enough_descriptors() -> Iterator[None]:
    """Raise a low soft RLIMIT_NOFILE to 4096 for the test; restore it after.

    The scenarios queue a few hundred records with descriptors while the
    peer does not read. A channel may bound its queued descriptors by a
    fraction of the limit (an eighth, today); under a common soft limit of
    1024 that bound, not the scenario, would decide when ``send`` waits.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    with soft_fd_limit_at_least(wanted):
        yield


def bytes_waiting(sock: socket.socket) -> int:
    """How many bytes the kernel holds for ``sock`` to read (``FIONREAD``)."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


async def receive_until_end(chan: FdChannel) -> list[tuple[bytes, int]]:
    """Receive (payload, descriptor count) until end of stream or DEADLINE.

    A record cut short when its sender closed ends the list too
    (``ProtocolError``): the peer never gets it, so it counts as dropped.
    """
    got: list[tuple[bytes, int]] = []
    with anyio.move_on_after(DEADLINE):
        while True:
            try:
                msg = await chan.receive()
            except (anyio.EndOfStream, ProtocolError):
                break
            with msg:
                got.append((msg.data, len(msg.fds)))
    return got


async def close_quietly(*chans: FdChannel) -> None:
    """Close channels after a failure without masking it (bounded, no raise)."""
    for chan in chans:
        with anyio.move_on_after(1), contextlib.suppress(Exception):
            await chan.aclose()
        if not chan.closed:  # pragma: no cover - only when aclose is broken
            raw(chan).close()


def describe_delivery(
    got: list[tuple[bytes, int]], expected: list[tuple[bytes, int]]
) -> str:
    """A short account of how ``got`` differs from ``expected``."""
    for i, (have, want) in enumerate(zip(got, expected, strict=False)):
        if have != want:
            return f"record {i} is {have!r}, expected {want!r}"
    if len(got) < len(expected):
        return (
            f"only {len(got)} of {len(expected)} records arrived; the first "
            f"missing one is {expected[len(got)]!r}"
        )
    return f"{len(got) - len(expected)} records more than the {len(expected)} sent"


def dropped_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if (r.name == "aiofdpass" or r.name.startswith("aiofdpass."))
        and r.levelno >= logging.WARNING
    ]


def assert_logged_dropped(caplog: pytest.LogCaptureFixture, dropped: int) -> None:
    messages = dropped_warnings(caplog)
    assert any(re.search(rf"\b{dropped}\b", m) for m in messages), (
        f"{dropped} records were dropped, but no WARNING on the 'aiofdpass' "
        f"logger says how many (its warnings: {messages})"
    )


# -- A: every record whose send() returned is delivered -----------------------

SCENARIO_A_RECORDS = 200


async def deliver_after_the_sends_returned() -> list[tuple[bytes, int]]:
    """Send 200 records, then start the receiver and await something unrelated.

    The bug in issue 9: under a loop that anyio did not start, the deferred
    flush failed in a loop callback and the queue was never written, while
    every ``send()`` had returned.
    """
    got: list[tuple[bytes, int]] = []
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    with pipe() as (r, _):
        try:
            for i in range(SCENARIO_A_RECORDS):
                await a.send(b"a%07d" % i, [r])
            all_counted = anyio.Event()

            async def receive_all() -> None:
                while len(got) < SCENARIO_A_RECORDS:
                    with await b.receive() as msg:
                        got.append((msg.data, len(msg.fds)))
                all_counted.set()

            async with anyio.create_task_group() as tg:
                tg.start_soon(receive_all)
                # The sender awaits something that is not the channel.
                with anyio.move_on_after(DEADLINE):
                    await all_counted.wait()
                tg.cancel_scope.cancel()
        finally:
            await close_quietly(b, a)
    return got


@pytest.mark.parametrize("run", RUNNERS)
def test_every_record_whose_send_returned_is_delivered(run: Runner) -> None:
    got = run(deliver_after_the_sends_returned)
    expected = [(b"a%07d" % i, 1) for i in range(SCENARIO_A_RECORDS)]
    assert got == expected, (
        "records whose send() returned were not delivered while the sender's "
        f"loop ran (the sender awaited an unrelated event): "
        f"{describe_delivery(got, expected)}"
    )


# -- B: one channel, loops in sequence: asyncio, trio, asyncio ----------------


@dataclass
class Phase:
    """What one loop's run of the shared pair delivered."""

    to_b: list[tuple[bytes, int]] = field(default_factory=list)
    to_a: list[tuple[bytes, int]] = field(default_factory=list)


def make_phase(
    a: FdChannel, b: FdChannel, r: int, tag: bytes, backlog: int, leave: int
) -> Callable[[], Coroutine[Any, Any, Phase]]:
    """A loop's turn: take the backlog, a record each way, leave a backlog.

    ``a.send`` is the channel's first use in this loop: the records left
    queued when the previous loop ended go out with it, before it.
    """

    async def phase() -> Phase:
        seen = Phase()
        with anyio.move_on_after(DEADLINE):
            await a.send(tag + b"-to-b", [r])
            await b.send(tag + b"-to-a", [r])
            for _ in range(backlog + 1):
                with await b.receive() as msg:
                    seen.to_b.append((msg.data, len(msg.fds)))
            with await a.receive() as msg:
                seen.to_a.append((msg.data, len(msg.fds)))
            # The peer does not read these: more than the socket holds.
            for i in range(leave):
                await a.send(padded(tag + b"-left-", i), [r])
        return seen

    return phase


def test_a_channel_moves_between_asyncio_and_trio_loops() -> None:
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    steps: list[tuple[str, Runner]] = [
        ("asyncio.run", run_asyncio),
        ("trio.run", run_trio),
        ("asyncio.run again", run_asyncio),
    ]
    with pipe() as (r, _):
        try:
            backlog: list[tuple[bytes, int]] = []
            for n, (name, run) in enumerate(steps):
                tag = b"%d" % n
                leave = OVERFLOW if n < len(steps) - 1 else 0
                seen = run(make_phase(a, b, r, tag, len(backlog), leave))
                expected = [*backlog, (tag + b"-to-b", 1)]
                assert seen.to_b == expected, (
                    f"in {name}, after the loop before: "
                    f"{describe_delivery(seen.to_b, expected)}"
                )
                assert seen.to_a == [(tag + b"-to-a", 1)], (
                    f"in {name}, the other direction got {seen.to_a}"
                )
                backlog = [(padded(tag + b"-left-", i), 1) for i in range(leave)]
                if leave:  # the scenario needs records queued as the loop ends
                    assert bytes_waiting(raw(b)) < 44 * leave, (
                        "test setup: the socket took the whole backlog"
                    )
            run_asyncio(lambda: close_quietly(a, b))
            assert a.closed and b.closed
        finally:
            if not (a.closed and b.closed):
                run_asyncio(lambda: close_quietly(a, b))


# -- C: used from a second loop while the first still runs ---------------------

LOOP_PAIRS = [
    pytest.param("asyncio", "asyncio", id="asyncio-then-asyncio"),
    pytest.param("asyncio", "trio", id="asyncio-then-trio"),
    pytest.param("trio", "asyncio", id="trio-then-asyncio"),
    pytest.param("trio", "trio", id="trio-then-trio"),
]


@pytest.mark.parametrize(("owner", "intruder"), LOOP_PAIRS)
def test_a_channel_used_from_a_second_running_loop_raises_runtime_error(
    owner: str, intruder: str
) -> None:
    a, b = channel_pair()
    blocked = threading.Event()
    owner_saw: list[object] = []

    async def own() -> None:
        # The owner's loop: its first use of `a` is a receive that blocks.
        async def receive_until_stop() -> None:
            with contextlib.suppress(anyio.EndOfStream):
                while owner_saw[-1:] != [b"stop"]:
                    with await a.receive() as msg:
                        owner_saw.append(msg.data)

        try:
            with anyio.move_on_after(DEADLINE * 2):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(receive_until_stop)
                    await anyio.wait_all_tasks_blocked()
                    blocked.set()
        finally:
            await a.aclose()

    def thread_one() -> None:
        try:
            anyio.run(own, backend=owner)
        except BaseException as exc:  # reported by the test body
            owner_saw.append(exc)

    async def stop_the_owner() -> list[tuple[bytes, int]]:
        # `b` was never used by the owner's loop: this loop may use it.
        try:
            await b.send(b"stop")
            return await receive_until_end(b)  # until the owner closes `a`
        finally:
            await b.aclose()

    thread = threading.Thread(target=thread_one, name="owner-loop")
    thread.start()
    try:
        assert blocked.wait(DEADLINE), "the owner loop never blocked in receive()"
        # Thread 2 (this one): a second event loop while the first runs.
        with pytest.raises(RuntimeError, match="event loop"):
            anyio.run(a.send, b"from a second loop", backend=intruder)
    finally:
        from_a = anyio.run(stop_the_owner, backend=intruder)
        thread.join(DEADLINE * 3)
    assert not thread.is_alive(), "the owner loop did not end after it was told to"
    assert owner_saw == [b"stop"], f"the owner loop saw {owner_saw}"
    assert from_a == [], f"the refused send still sent something: {from_a}"
    assert a.closed
    assert b.closed


# -- D: coalescing depends on the send pattern, never on a clock ---------------


class Counting(socket.socket):
    """A socket that counts its ``sendmsg`` calls."""

    sendmsg_calls = 0

    def sendmsg(self, *args: Any, **kwargs: Any) -> int:
        self.sendmsg_calls += 1
        return super().sendmsg(*args, **kwargs)


ROUNDS = 100


def fixed_send_pattern(
    between_rounds: Callable[[], Awaitable[None]],
) -> Callable[[], Coroutine[Any, Any, tuple[int, int, bool]]]:
    """100 rounds of k records (k = 1..5, cycling), ``between_rounds`` after each.

    The scenario returns (sendmsg calls, records sent, all delivered in order
    with one descriptor each).
    """

    async def scenario() -> tuple[int, int, bool]:
        sa, sb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Room for every record even if none were coalesced (about 1 KiB
        # each with its descriptor), so a full socket never takes part.
        sa.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        counting = Counting(fileno=sa.detach())
        a = FdChannel.from_socket(counting)
        b = FdChannel.from_socket(sb)
        sent = 0
        got: list[tuple[bytes, int]] = []
        with pipe() as (r, _):
            async with a, b:
                with anyio.fail_after(DEADLINE * 3):
                    for n in range(ROUNDS):
                        for _ in range(n % 5 + 1):
                            await a.send(b"d%07d" % sent, [r])
                            sent += 1
                        await between_rounds()
                    for _ in range(sent):
                        with await b.receive() as msg:
                            got.append((msg.data, len(msg.fds)))
                calls = counting.sendmsg_calls
        return calls, sent, got == [(b"d%07d" % i, 1) for i in range(sent)]

    return scenario


def _no_op_tracer(*args: object) -> None:
    return None


@pytest.mark.parametrize(
    ("run", "between_rounds"),
    [
        # checkpoint() is sleep(0): the loop runs once between rounds.
        pytest.param(run_asyncio, checkpoint, id="asyncio.run-checkpoint"),
        # wait_all_tasks_blocked(): the loop runs until nothing is runnable
        # (every callback and task the library scheduled has run or waits).
        pytest.param(
            run_asyncio, anyio.wait_all_tasks_blocked, id="asyncio.run-settle"
        ),
        pytest.param(run_trio, anyio.wait_all_tasks_blocked, id="trio.run-settle"),
        # No trio.run-checkpoint: trio runs each batch of runnable tasks in
        # a random order (trio/_core/_run.py reverses it half the time, by
        # design), so whether a flush scheduled in one round runs before the
        # next round's first send is a coin toss there, for any flush that
        # is not the sender's own code.
    ],
)
def test_coalescing_is_the_same_plain_and_under_a_tracer(
    run: Runner, between_rounds: Callable[[], Awaitable[None]]
) -> None:
    # Coverage installs a tracer (sys.settrace) that slows every call; the
    # number of sendmsg calls must not depend on how fast Python runs.
    # sys.settrace applies to this thread only, where the loop runs.
    scenario = fixed_send_pattern(between_rounds)
    plain = run(scenario)
    again = run(scenario)
    previous = sys.gettrace()
    sys.settrace(_no_op_tracer)
    try:
        traced = run(scenario)
    finally:
        sys.settrace(previous)
    for result in (plain, again, traced):
        assert result[2], "the records did not arrive in order with one fd each"
    calls = {"plain": plain[0], "plain again": again[0], "traced": traced[0]}
    assert plain[0] == again[0] == traced[0], (
        f"the same send pattern made different numbers of sendmsg calls: {calls}"
    )
    assert plain[0] < plain[1], (
        f"{plain[0]} sendmsg calls for {plain[1]} records: nothing was coalesced"
    )


# -- E: a channel dropped without aclose() ------------------------------------


@dataclass
class Dropped:
    queued_copies: int = 0
    copies_left: int = 0
    sent: int = 0
    received: int = 0


NOT_COLLECTED = (
    "a channel dropped without aclose() was not collected: something of the "
    "library still references it (a writer task or a loop callback?)"
)


def drop_and_collect(holder: list[FdChannel]) -> None:
    """Drop the last reference to the channel in ``holder``; collect garbage."""
    holder.clear()
    gc.collect()


async def drop_with_records_queued() -> Dropped:
    seen = Dropped()
    a, b = channel_pair()
    small_buffers(raw(a), raw(b))
    with pipe() as (r, _):
        try:
            for i in range(OVERFLOW):
                await a.send(padded(b"e", i), [r])
            seen.sent = OVERFLOW
            seen.queued_copies = copies_of(r) - 2  # all but r and w
            # Let the loop settle: whatever the library scheduled has run,
            # and its writer, if it has one, waits for the full socket.
            await anyio.wait_all_tasks_blocked()
            ref = weakref.ref(a)
            holder = [a]
            del a
            try:
                try:
                    with pytest.warns(ResourceWarning) as caught:
                        drop_and_collect(holder)
                except pytest.fail.Exception:
                    if ref() is None:
                        raise
                    collected = False  # and so nothing could warn
                else:
                    # A recorded warning holds its source (the socket, or
                    # the channel itself with source=self): let go first.
                    caught.clear()
                    gc.collect()
                    collected = ref() is None
                if not collected:
                    pytest.fail(NOT_COLLECTED)
            finally:
                leftover = ref()
                if leftover is not None:
                    await close_quietly(leftover)
                    del leftover
            seen.copies_left = copies_of(r) - 2
            seen.received = len(await receive_until_end(b))
        finally:
            await close_quietly(b)
    return seen


@pytest.mark.parametrize("run", RUNNERS)
def test_a_dropped_channel_is_collected_warns_and_closes_its_queued_fds(
    run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiofdpass")
    seen = run(drop_with_records_queued)
    assert seen.queued_copies > 0, "test setup: no record was left queued"
    assert seen.copies_left == 0, (
        f"{seen.copies_left} of the {seen.queued_copies} descriptor copies "
        "queued in the dropped channel are still open after it was collected"
    )
    assert_logged_dropped(caplog, seen.sent - seen.received)


# -- F: a bounded aclose() -----------------------------------------------------

CLOSE_TIMEOUT = 0.2
#: "Well under" the 10-second default: aclose must have given up long before.
CLOSE_BOUND = 2.0


def planned(chan: FdChannel) -> Any:
    """``chan`` typed ``Any``, for the planned ``close_timeout`` attribute.

    ``close_timeout`` (keyword of ``channel_pair`` and ``from_socket``, and a
    settable attribute) is the API issue 9 plans; ``Any`` keeps this module
    type-checking before and after it exists.
    """
    return chan


def pair_with_close_timeout(how: str, timeout: float) -> tuple[FdChannel, FdChannel]:
    """A pair whose first end gives up on its queue after ``timeout`` at close."""
    options: dict[str, Any] = {"close_timeout": timeout}
    if how == "channel_pair":
        return channel_pair(**options)
    sa, sb = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if how == "from_socket":
            a = FdChannel.from_socket(sa, **options)
        else:
            a = FdChannel.from_socket(sa)
            planned(a).close_timeout = timeout
    except BaseException:
        sa.close()
        sb.close()
        raise
    return a, FdChannel.from_socket(sb)


@dataclass
class Closed:
    seconds: float = 0.0
    gave_up: bool = False
    closed: bool = False
    queued_copies: int = 0
    copies_left: int = 0
    sent: int = 0
    received: int = 0


async def close_while_the_peer_never_reads(
    a: FdChannel, b: FdChannel, cancel_after: float | None
) -> Closed:
    """Queue records the peer does not read, then time ``a.aclose()``.

    ``cancel_after`` cancels the close from outside after that long;
    otherwise it is only bounded (``gave_up`` tells if the bound was hit).
    """
    seen = Closed()
    small_buffers(raw(a), raw(b))
    with pipe() as (r, _):
        try:
            for i in range(OVERFLOW):
                await a.send(padded(b"f", i), [r])
            seen.sent = OVERFLOW
            seen.queued_copies = copies_of(r) - 2
            start = time.monotonic()
            with anyio.move_on_after(cancel_after or CLOSE_BOUND) as scope:
                await a.aclose()
            seen.seconds = time.monotonic() - start
            seen.gave_up = cancel_after is None and scope.cancelled_caught
            seen.closed = a.closed
            seen.copies_left = copies_of(r) - 2
            seen.received = len(await receive_until_end(b))
        finally:
            await close_quietly(a, b)
    return seen


HOW = [
    pytest.param("channel_pair", id="channel_pair(close_timeout=)"),
    pytest.param("from_socket", id="from_socket(close_timeout=)"),
    pytest.param("attribute", id="chan.close_timeout="),
]


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("run", RUNNERS)
def test_aclose_gives_up_after_close_timeout(
    run: Runner, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aiofdpass")
    a, b = pair_with_close_timeout(how, CLOSE_TIMEOUT)
    seen = run(lambda: close_while_the_peer_never_reads(a, b, None))
    assert seen.queued_copies > 0, "test setup: no record was left queued"
    assert not seen.gave_up, (
        f"aclose() with close_timeout={CLOSE_TIMEOUT} was still waiting for a "
        f"peer that never reads after {CLOSE_BOUND} s"
    )
    assert seen.closed
    assert seen.seconds < CLOSE_BOUND
    assert seen.copies_left == 0, (
        f"{seen.copies_left} queued descriptor copies are still open after aclose()"
    )
    assert_logged_dropped(caplog, seen.sent - seen.received)


@pytest.mark.parametrize("run", RUNNERS)
def test_a_cancelled_aclose_closes_at_once(
    run: Runner, caplog: pytest.LogCaptureFixture
) -> None:
    # The default close_timeout (up to 10 s) is in force; a cancellation
    # from outside must not wait for it.
    caplog.set_level(logging.WARNING, logger="aiofdpass")
    a, b = channel_pair()
    seen = run(lambda: close_while_the_peer_never_reads(a, b, 0.1))
    assert seen.queued_copies > 0, "test setup: no record was left queued"
    assert seen.closed, "a cancelled aclose() left the channel open"
    assert seen.seconds < CLOSE_BOUND, f"a cancelled aclose() took {seen.seconds} s"
    assert seen.copies_left == 0, (
        f"{seen.copies_left} queued descriptor copies are still open after a "
        "cancelled aclose()"
    )
    assert_logged_dropped(caplog, seen.sent - seen.received)


def test_close_timeout_defaults_to_at_most_ten_seconds_and_can_be_set() -> None:
    chans: list[FdChannel] = []
    try:
        plain = channel_pair()
        chans += plain
        default = planned(plain[0]).close_timeout
        assert 0 < default <= 10, f"the default close_timeout is {default!r}"
        assert planned(plain[1]).close_timeout == default
        for how, value in (
            ("channel_pair", 0.5),
            ("from_socket", 1.5),
            ("attribute", 2.5),
        ):
            pair = pair_with_close_timeout(how, value)
            chans += pair
            assert planned(pair[0]).close_timeout == value, how
            if how == "channel_pair":  # both ends
                assert planned(pair[1]).close_timeout == value, how
    finally:
        run_asyncio(lambda: close_quietly(*chans))


# -- packet sockets: SEQPACKET channels and datagram sockets ------------------


async def deliver_packets() -> tuple[list[tuple[bytes, int]], list[tuple[bytes, int]]]:
    """200 SEQPACKET records and 100 datagrams, each with a descriptor.

    Both overflow what the kernel holds (about ten packets: the channel's
    small send buffer, the receiver's datagram queue), so the channel's
    background writer and the datagram socket's wait for room must run
    under every loop.
    """
    records: list[tuple[bytes, int]] = []
    datagrams: list[tuple[bytes, int]] = []
    a, b = channel_pair(kind="seqpacket")
    small_buffers(raw(a))
    name = f"\0aiofdpass-run-modes-{os.getpid()}-{id(records)}"
    receiver = await create_datagram_socket(name)
    sender = await create_datagram_socket()
    with pipe() as (r, _):
        try:
            for i in range(200):
                await a.send(b"p%d" % i, [r])

            async def send_datagrams() -> None:
                for i in range(100):
                    await sender.send(b"d%d" % i, [r], to=name)

            with anyio.move_on_after(DEADLINE):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(send_datagrams)
                    for _ in range(200):
                        with await b.receive() as msg:
                            records.append((msg.data, len(msg.fds)))
                    for _ in range(100):
                        with (await receiver.receive()).message as msg:
                            datagrams.append((msg.data, len(msg.fds)))
        finally:
            await close_quietly(b, a)
            await receiver.aclose()
            await sender.aclose()
    return records, datagrams


@pytest.mark.parametrize("run", RUNNERS)
def test_packet_sockets_deliver_everything(run: Runner) -> None:
    records, datagrams = run(deliver_packets)
    assert records == [(b"p%d" % i, 1) for i in range(200)]
    assert datagrams == [(b"d%d" % i, 1) for i in range(100)]


# -- a worker pool under every runner -----------------------------------------


async def pool_worker_loop() -> str:
    """Serve one connection through a WorkerPool; return the worker's loop."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with anyio.fail_after(DEADLINE * 10):
            async with WorkerPool("tests.prefork_child:lines", workers=1) as pool:
                stream = await anyio.connect_tcp(*listener.getsockname()[:2])
                sock, _ = listener.accept()
                with sock:
                    await pool.dispatch(sock)
                async with stream:
                    await stream.send(b"loop\n")
                    reader = BufferedByteReceiveStream(stream)
                    answer = await reader.receive_until(b"\n", 100)
    return answer.split()[1].decode()


@pytest.mark.system
@pytest.mark.parametrize("run", RUNNERS)
def test_a_worker_pool_runs_its_workers_on_the_masters_loop(run: Runner) -> None:
    name = getattr(run, "__name__", "")
    expected = "uvloop" if "uvloop" in name else "trio" if "trio" in name else "asyncio"
    assert run(pool_worker_loop) == expected
