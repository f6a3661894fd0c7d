"""statistics(), reprs, and the debug log of a connection's life."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute

import aiofdpass
from aiofdpass import ChannelStatistics, StreamStatistics
from aiofdpass._codec import HEADER_SIZE, encode_header

from .helpers import fill, pipe, raw

pytestmark = pytest.mark.anyio


def zero_channel_stats() -> ChannelStatistics:
    return ChannelStatistics(0, 0, 0, 0, 0, 0, 0, 0, 0)


async def test_channel_counts_records_bytes_and_descriptors() -> None:
    left, right = aiofdpass.channel_pair()
    async with left, right:
        assert left.statistics() == zero_channel_stats()
        with pipe() as (r, w):
            await left.send(b"abc", [r, w])
            await left.send(b"", [r])
            await left.send(b"x" * 70_000)  # a large record: written directly
        for _ in range(3):
            (await right.receive()).close()
        wire = 3 * HEADER_SIZE + 70_003  # headers included
        sent = left.statistics()
        assert (sent.records_sent, sent.bytes_sent, sent.fds_sent) == (3, wire, 3)
        assert (sent.records_received, sent.bytes_received, sent.fds_received) == (
            0,
            0,
            0,
        )
        got = right.statistics()
        assert (got.records_received, got.bytes_received, got.fds_received) == (
            3,
            wire,
            3,
        )
        assert (got.records_sent, got.records_queued, got.bytes_queued) == (0, 0, 0)


async def test_receive_counts_only_the_records_it_returns() -> None:
    left, right = aiofdpass.channel_pair()
    async with left, right:
        with anyio.move_on_after(0):  # cancelled before anything arrived
            await right.receive()
        with pipe() as (r, _):
            await left.send(b"one", [r])
        # Half of the next record: read, but not a record yet.
        raw(left).send(encode_header(5, 0) + b"tw")
        (await right.receive()).close()
        stats = right.statistics()
        assert stats.records_received == 1
        assert stats.fds_received == 1
        assert HEADER_SIZE + 3 <= stats.bytes_received <= 2 * HEADER_SIZE + 5
        raw(left).send(b"o!!")
        await left.send_eof()
        assert (await right.receive()).data == b"two!!"
        with pytest.raises(anyio.EndOfStream):
            await right.receive()
        stats = right.statistics()
        assert stats.records_received == 2
        assert stats.bytes_received == 2 * HEADER_SIZE + 8


async def test_statistics_show_what_is_queued_now() -> None:
    left, right = aiofdpass.channel_pair(close_timeout=0)
    async with left, right:
        fill(raw(left))  # the socket is full: what follows is queued
        with pipe() as (r, _):
            await left.send(b"1234", [r])
            await left.send(b"5")
        stats = left.statistics()
        assert stats.records_sent == 2
        assert stats.records_queued == 2
        assert stats.bytes_queued == 2 * HEADER_SIZE + 5  # headers included
        assert stats.fds_queued == 1
        assert "queued=2" in repr(left)
        while left.statistics().records_queued:
            (await right.receive()).close()


async def test_a_failed_send_counts_nothing() -> None:
    left, right = aiofdpass.channel_pair(limits=aiofdpass.Limits(max_payload=4))
    async with left, right:
        with pytest.raises(aiofdpass.LimitError):
            await left.send(b"too long")
        assert left.statistics() == zero_channel_stats()


async def test_stream_counts_bytes_and_descriptors() -> None:
    left, right = aiofdpass.stream_pair()
    async with left, right:
        assert left.statistics() == StreamStatistics(0, 0, 0, 0)
        with pipe() as (r, w):
            await left.send(b"hello", [r, w])
        data, fds = await right.receive_with_fds()
        for fd in fds:
            fd.close()
        assert left.statistics() == StreamStatistics(5, 2, 0, 0)
        assert right.statistics() == StreamStatistics(0, 0, len(data), 2)


async def test_reprs_say_descriptor_peer_and_state() -> None:
    left, right = aiofdpass.channel_pair()
    fd = left.fileno()
    who = f"peer=pid {os.getpid()} uid {os.getuid()}"
    assert repr(left) == f"<FdChannel fd={fd} {who} open queued=0>"
    await left.send_eof()
    assert repr(left) == f"<FdChannel fd={fd} {who} send shut down queued=0>"
    await left.aclose()
    assert repr(left) == f"<FdChannel fd=-1 {who} closed queued=0>"
    # Closed before its peer was ever asked: no peer to show, and no error.
    await right.aclose()
    assert repr(right) == "<FdChannel fd=-1 closed queued=0>"

    a, b = aiofdpass.stream_pair()
    async with a, b:
        assert repr(a) == f"<FdStream fd={a.fileno()} {who} open>"
        a.extra(SocketAttribute.raw_socket).close()  # gone under its feet
        with pytest.raises(anyio.BrokenResourceError):
            await a.send(b"x")
        assert repr(a) == f"<FdStream fd=-1 {who} send broken>"


async def test_listener_repr(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    listener = await aiofdpass.listen(path)
    fd = listener.extra(SocketAttribute.raw_socket).fileno()
    shown = f"<FdListener path={str(path)!r} fd={fd} listening accepted=0>"
    assert repr(listener) == shown
    async with await aiofdpass.connect(path), await listener.accept():
        pass
    await listener.aclose()
    assert repr(listener) == f"<FdListener path={str(path)!r} fd=-1 closed accepted=1>"


async def test_debug_log_of_a_connection_life(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiofdpass")
    path = tmp_path / "s.sock"
    async with await aiofdpass.listen(path) as listener:
        async with await aiofdpass.connect(path) as client:
            async with await listener.accept() as server:
                await client.send_eof()
                with pytest.raises(anyio.EndOfStream):
                    await server.receive()
    messages = [r.getMessage() for r in caplog.records if r.name == "aiofdpass"]
    assert all(
        r.levelno == logging.DEBUG for r in caplog.records if r.name == "aiofdpass"
    )
    expected = [
        "listening: <FdListener",
        "opened <FdChannel",  # the client
        "opened <FdChannel",  # the server's end
        "sent end of stream on <FdChannel",
        "end of stream from the peer on <FdChannel",
        "closing <FdChannel",
        "closing <FdChannel",
        "stopped listening: <FdListener",
    ]
    assert len(messages) == len(expected), messages
    for message, start in zip(messages, expected, strict=True):
        assert message.startswith(start), messages


async def test_debug_log_says_why_a_channel_broke(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiofdpass")
    left, right = aiofdpass.channel_pair()
    async with left, right:
        raw(left).send(b"not a record header")
        with pytest.raises(aiofdpass.ProtocolError):
            await right.receive()
    broken = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert len(broken) == 1
    assert "the peer broke the framing" in broken[0]


async def test_stream_listener_repr(tmp_path: Path) -> None:
    path = tmp_path / "s.sock"
    async with await aiofdpass.listen_stream(path) as listener:
        async with await aiofdpass.connect_stream(path), await listener.accept():
            pass
        assert repr(listener).startswith(f"<FdStreamListener path={str(path)!r} fd=")
        assert repr(listener).endswith(" listening accepted=1>")
