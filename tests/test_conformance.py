"""Both connection classes held to the anyio stream contracts they claim.

Like trio's ``check_two_way_stream`` / ``check_half_closeable_stream`` do
for byte streams, but one test per clause of the contract, each run over
``channel_pair()`` (:class:`FdChannel`, an ``ObjectStream[Message]``), its
SOCK_SEQPACKET kind ``channel_pair(kind="seqpacket")``, and
``stream_pair()`` (:class:`FdStream`, bytes plus descriptors), so a broken
clause names itself in the test id instead of hiding the clauses after it.
The quoted contract text is from anyio's ``abc/_streams.py`` and
``_core/_exceptions.py`` (anyio 4.x) unless it says otherwise.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import pytest
from anyio.abc import ByteStream, ObjectStream, SocketAttribute
from anyio.lowlevel import checkpoint

from aiofdpass import Fd, FdChannel, FdStream, channel_pair, stream_pair

from .helpers import identity, pipe

pytestmark = pytest.mark.anyio

#: A test that has not finished after this many seconds is stuck, not slow.
TIMEOUT = 5

End = FdChannel | FdStream
Maker = Callable[[], tuple[End, End]]


def _channels() -> tuple[End, End]:
    return channel_pair()


def _packets() -> tuple[End, End]:
    return channel_pair(kind="seqpacket")


def _streams() -> tuple[End, End]:
    return stream_pair()


@pytest.fixture(
    params=[
        pytest.param(_channels, id="FdChannel"),
        pytest.param(_packets, id="FdChannel-seqpacket"),
        pytest.param(_streams, id="FdStream"),
    ]
)
def make_pair(request: pytest.FixtureRequest) -> Maker:
    """The class under test, as a maker of connected pairs (a socketpair)."""
    maker: Maker = request.param
    return maker


@asynccontextmanager
async def connected(make: Maker) -> AsyncIterator[tuple[End, End]]:
    """Yield a connected pair; fail after TIMEOUT instead of hanging.

    Both ends are closed on the way out whatever happened (with a bound of
    their own, so a close that hangs fails the test too).
    """
    left, right = make()
    try:
        with anyio.fail_after(TIMEOUT):
            yield left, right
    finally:
        for end in (left, right):
            with anyio.move_on_after(TIMEOUT):
                await end.aclose()


async def receive_one(end: End) -> tuple[bytes, list[Fd]]:
    """One receive call: a record on a channel, one read on a stream."""
    if isinstance(end, FdChannel):
        msg = await end.receive()
        return msg.data, list(msg.fds)
    return await end.receive_with_fds()


async def receive_exactly(end: End, size: int) -> tuple[bytes, list[Fd]]:
    """What one ``send`` of ``size`` bytes sent: a record, or ``size`` bytes."""
    if isinstance(end, FdChannel):
        record, record_fds = await receive_one(end)
        assert len(record) == size, f"a record of {size} bytes arrived as {record!r}"
        return record, record_fds
    data = b""
    fds: list[Fd] = []
    while len(data) < size:  # a stream may split a send across reads
        chunk, more = await end.receive_with_fds(size - len(data))
        data += chunk
        fds += more
    return data, fds


def close_all(fds: list[Fd]) -> None:
    for fd in fds:
        fd.close()


async def test_fdchannel_is_an_object_stream_and_fdstream_a_byte_stream() -> None:
    # STYLE.md: implement anyio's ABCs where the shape fits, so our objects
    # compose with anyio's tools (stapled streams, memory-stream bridges,
    # BufferedByteReceiveStream...).
    async with connected(_channels) as (left, right):
        assert isinstance(left, ObjectStream)
        assert isinstance(right, ObjectStream)
    async with connected(_streams) as (s1, s2):
        assert isinstance(s1, ByteStream)
        assert isinstance(s2, ByteStream)


async def test_a_byte_stream_receive_is_never_empty_and_async_for_ends_at_eof() -> None:
    # ByteReceiveStream.receive: "Implementers of this interface should not
    # return an empty bytes object"; ":raises ValueError: if max_bytes is less
    # than 1"; iterating "will yield a byte string of arbitrary length, but no
    # more than 65536 bytes", and ends at EndOfStream.
    async with connected(_streams) as (left, right):
        assert isinstance(left, FdStream) and isinstance(right, FdStream)
        with pytest.raises(ValueError, match="max_bytes"):
            await right.receive(0)
        await left.send(b"x" * 100_000)
        await left.send(b"end")
        await left.send_eof()
        chunks = [chunk async for chunk in right]
        assert all(0 < len(chunk) <= 65536 for chunk in chunks)
        assert b"".join(chunks) == b"x" * 100_000 + b"end"


async def test_records_and_fds_flow_both_ways_in_order(make_pair: Maker) -> None:
    # ObjectStream: "guarantees the order and reliability of message
    # delivery"; for FdStream the descriptors arrive with their send's bytes.
    with pipe() as (r, w):
        async with connected(make_pair) as (left, right):
            for sender, receiver in ((left, right), (right, left)):
                for i, fds in enumerate(([r], [r, w], [], [w])):
                    await sender.send(b"record-%d" % i, fds)
                for i, fds in enumerate(([r], [r, w], [], [w])):
                    data, got = await receive_exactly(receiver, len(b"record-%d" % i))
                    assert data == b"record-%d" % i
                    assert [identity(fd.fileno()) for fd in got] == [
                        identity(n) for n in fds
                    ], f"record {i}: the descriptors did not come with it"
                    close_all(got)


async def test_send_eof_is_idempotent(make_pair: Maker) -> None:
    # ObjectStream.send_eof / ByteStream.send_eof: "This method is
    # idempotent (does nothing on successive calls)." So does trio's
    # check_half_closeable_stream: "but we can do send_eof again".
    async with connected(make_pair) as (left, right):
        await left.send(b"last")
        await left.send_eof()
        error: Exception | None = None
        try:
            await left.send_eof()
        except Exception as exc:
            error = exc
        assert error is None, (
            f"a second send_eof() raised {error!r}; anyio's contract says it "
            "is idempotent (does nothing on successive calls)"
        )
        assert (await receive_exactly(right, 4))[0] == b"last"
        with pytest.raises(anyio.EndOfStream):
            await receive_one(right)
        # Nothing more went out on the second call, and the other way works.
        await right.send(b"back")
        assert (await receive_exactly(left, 4))[0] == b"back"


async def test_after_send_eof_send_raises_closed_and_the_peer_reads_eof_last(
    make_pair: Maker,
) -> None:
    # send_eof: "You should not try to send any further data to this stream
    # after calling this method"; trio makes that ClosedResourceError ("now
    # sending is disallowed"), and so do our docstrings. EndOfStream: "Raised
    # when trying to read from a stream that has been closed from the other
    # end": after every record sent before, and on every later call.
    with pipe() as (r, _):
        async with connected(make_pair) as (left, right):
            await left.send(b"one", [r])
            await left.send(b"two", [r])
            await left.send_eof()
            with pytest.raises(anyio.ClosedResourceError):
                await left.send(b"late", [r])
            with pytest.raises(anyio.ClosedResourceError):
                await left.send(b"late")
            for expected in (b"one", b"two"):
                data, fds = await receive_exactly(right, 3)
                assert data == expected
                assert len(fds) == 1
                close_all(fds)
            for _ in range(2):
                with pytest.raises(anyio.EndOfStream):
                    await receive_one(right)


async def test_receiving_still_works_after_our_own_send_eof(make_pair: Maker) -> None:
    # send_eof shuts down one direction only (trio: "and we can still send
    # stuff back the other way").
    with pipe() as (r, _):
        async with connected(make_pair) as (left, right):
            await left.send_eof()
            with pytest.raises(anyio.EndOfStream):
                await receive_one(right)
            await right.send(b"reply", [r])
            data, fds = await receive_exactly(left, 5)
            assert data == b"reply"
            assert [identity(fd.fileno()) for fd in fds] == [identity(r)]
            close_all(fds)
            await right.send_eof()
            with pytest.raises(anyio.EndOfStream):
                await receive_one(left)


async def test_aclose_is_idempotent_and_never_raises(make_pair: Maker) -> None:
    # trio's check_two_way_stream: "we can close the same stream repeatedly,
    # it's fine", also once the peer is gone; our docstrings: "Calling it
    # again does nothing; it never raises."
    with pipe() as (r, _):
        async with connected(make_pair) as (left, right):
            await left.send(b"pending", [r])
            await right.aclose()
            await right.aclose()
            await left.aclose()  # the peer is gone with the record unread
            await left.aclose()
            assert left.closed
            assert right.closed
    async with connected(make_pair) as (left, right):
        await left.send_eof()
        await left.aclose()
        await left.aclose()


async def test_a_graceful_aclose_delivers_what_was_sent_then_eof(
    make_pair: Maker,
) -> None:
    # trio: "if send-then-graceful-close, receiver gets data then b''".
    with pipe() as (r, _):
        async with connected(make_pair) as (left, right):
            await left.send(b"before close", [r])
            await left.aclose()
            data, fds = await receive_exactly(right, 12)
            assert data == b"before close"
            assert len(fds) == 1
            close_all(fds)
            with pytest.raises(anyio.EndOfStream):
                await receive_one(right)


async def test_send_and_receive_after_aclose_raise_closed_resource_error(
    make_pair: Maker,
) -> None:
    # UnreliableObjectSendStream.send / receive: ":raises ClosedResourceError:
    # if the (send|receive) stream has been explicitly closed"; trio: "even
    # if it's an empty send". Our send_eof docstrings say the same.
    with pipe() as (r, _):
        async with connected(make_pair) as (left, _right):
            await left.aclose()
            with pytest.raises(anyio.ClosedResourceError):
                await left.send(b"x", [r])
            with pytest.raises(anyio.ClosedResourceError):
                await left.send(b"")
            with pytest.raises(anyio.ClosedResourceError):
                await receive_one(left)
            with pytest.raises(anyio.ClosedResourceError):
                await left.send_eof()


async def test_a_cancelled_aclose_still_closes(make_pair: Maker) -> None:
    # trio's check_two_way_stream: "cancelled aclose still closes".
    async with connected(make_pair) as (left, right):
        for end in (left, right):
            with anyio.CancelScope() as scope:
                scope.cancel()
                await end.aclose()
            assert end.closed
        with pytest.raises(anyio.ClosedResourceError):
            await left.send(b"123")
        with pytest.raises(anyio.ClosedResourceError):
            await receive_one(right)


async def test_a_receive_blocked_when_another_task_closes_raises_closed(
    make_pair: Maker,
) -> None:
    # ClosedResourceError: "Raised when trying to use a resource that has
    # been closed" -- including a use in progress (trio's Stream.aclose:
    # other tasks blocked on it raise ClosedResourceError).
    outcome: list[BaseException | tuple[bytes, list[Fd]]] = []
    async with connected(make_pair) as (_left, right):

        async def blocked_receive() -> None:
            try:
                outcome.append(await receive_one(right))
            except Exception as exc:
                outcome.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(blocked_receive)
            await anyio.wait_all_tasks_blocked()
            await right.aclose()
        assert len(outcome) == 1
        assert isinstance(outcome[0], anyio.ClosedResourceError), (
            f"a receive blocked while another task closed the object ended "
            f"with {outcome[0]!r}, not ClosedResourceError"
        )


async def test_a_second_concurrent_receiver_gets_busy_resource_error(
    make_pair: Maker,
) -> None:
    # BusyResourceError: "Raised when two tasks are trying to read from or
    # write to the same resource concurrently." The first receiver is not
    # disturbed by it.
    first: list[bytes] = []
    async with connected(make_pair) as (left, right):

        async def first_receiver() -> None:
            first.append((await receive_exactly(right, 5))[0])

        async with anyio.create_task_group() as tg:
            tg.start_soon(first_receiver)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(anyio.BusyResourceError):
                await receive_one(right)
            await left.send(b"first")
        assert first == [b"first"]


async def test_async_for_over_a_channel_ends_at_end_of_stream() -> None:
    # UnreliableObjectReceiveStream.__anext__ turns EndOfStream into
    # StopAsyncIteration: "Asynchronously iterating over objects of this
    # type will yield objects matching the given type parameter."
    with pipe() as (r, _):
        async with connected(_channels) as (left, right):
            assert isinstance(right, FdChannel)
            for i in range(3):
                await left.send(b"item-%d" % i, [r])
            await left.send_eof()
            seen = []
            async for msg in right:
                with msg:
                    seen.append((msg.data, len(msg.fds)))
            assert seen == [(b"item-%d" % i, 1) for i in range(3)]


async def test_sending_to_a_closed_peer_eventually_raises_broken_resource_error(
    make_pair: Maker,
) -> None:
    # BrokenResourceError: "Raised when trying to use a resource that has
    # been rendered unusable due to external causes (e.g. a send stream
    # whose peer has disconnected)". trio: "closing the r side leads to
    # BrokenResourceError on the s side (eventually)" and "once detected,
    # the stream stays broken". Queued records may hide it for a while, so
    # keep sending (each send returns or raises; none may hang).
    with pipe() as (r, _):
        async with connected(make_pair) as (left, right):
            await right.aclose()
            error: Exception | None = None
            sends = 0
            while error is None and sends < 100_000:
                try:
                    await left.send(b"x" * 100, [r])
                except Exception as exc:
                    error = exc
                sends += 1
                await checkpoint()
            assert isinstance(error, anyio.BrokenResourceError), (
                f"{sends} sends to a closed peer ended with {error!r}"
            )
            with pytest.raises(anyio.BrokenResourceError):
                await left.send(b"x" * 100, [r])


async def test_typed_attributes(make_pair: Maker) -> None:
    # TypedAttributeProvider.extra: returns the attribute, or the default,
    # else ":raises TypedAttributeLookupError: if the search failed and no
    # default value was given". SocketAttribute.family is "the address
    # family of the underlying socket", raw_socket "the underlying stdlib
    # socket object".
    async with connected(make_pair) as (left, right):
        for end in (left, right):
            assert end.extra(SocketAttribute.family) == socket.AF_UNIX
            raw = end.extra(SocketAttribute.raw_socket)
            assert isinstance(raw, socket.socket)
            assert raw.fileno() == end.fileno()
            assert raw.family == socket.AF_UNIX
            assert raw.type in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)
            # A socketpair's ends are unnamed: AF_UNIX gives "" for both.
            assert end.extra(SocketAttribute.local_address) == ""
            assert end.extra(SocketAttribute.remote_address) == ""
            # Ports belong to IP sockets only.
            with pytest.raises(anyio.TypedAttributeLookupError):
                end.extra(SocketAttribute.local_port)
            assert end.extra(SocketAttribute.remote_port, None) is None
