"""The sans-I/O record codec: no sockets, real descriptors."""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiofdpass import Fd, Limits, Message, ProtocolError
from aiofdpass._codec import HEADER_SIZE, READ_SIZE, RecordDecoder, encode_header


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def dup_fds(base: int, n: int) -> list[Fd]:
    return [Fd(os.dup(base)) for _ in range(n)]


def encode(data: bytes, nfds: int) -> bytes:
    return encode_header(len(data), nfds) + data


def drain(decoder: RecordDecoder) -> list[Message]:
    out = []
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    return out


def test_header_layout_is_the_documented_one() -> None:
    assert HEADER_SIZE == 12
    assert encode_header(5, 2) == b"FD\x01\x00\x00\x02\x00\x00\x00\x00\x00\x05"


def test_one_record_round_trip(pipe: tuple[int, int]) -> None:
    dec = RecordDecoder(Limits())
    fds = dup_fds(pipe[0], 2)
    dec.feed(encode(b"hello", 2), fds)
    [msg] = drain(dec)
    assert msg.data == b"hello"
    assert msg.fds == tuple(fds)
    assert dec.at_boundary
    msg.close()
    dec.end_of_stream()


@pytest.mark.parametrize("nfds", [0, 1, 3])
def test_split_at_every_byte_boundary(pipe: tuple[int, int], nfds: int) -> None:
    wire = encode(b"payload-bytes", nfds) + encode(b"", 0) + encode(b"z" * 3, 1)
    for cut in range(len(wire) + 1):
        dec = RecordDecoder(Limits())
        # The kernel hands fds over with the first byte of the sendmsg.
        first_fds = dup_fds(pipe[0], nfds + 1)
        if cut == 0:
            dec.feed(b"", [])
            dec.feed(wire, first_fds)
        else:
            dec.feed(wire[:cut], first_fds)
            dec.feed(wire[cut:])
        msgs = drain(dec)
        assert [m.data for m in msgs] == [b"payload-bytes", b"", b"zzz"]
        assert [len(m.fds) for m in msgs] == [nfds, 0, 1]
        assert [fd for m in msgs for fd in m.fds] == first_fds
        for m in msgs:
            m.close()
        dec.end_of_stream()


def test_byte_at_a_time(pipe: tuple[int, int]) -> None:
    wire = encode(b"abc", 1) * 3
    dec = RecordDecoder(Limits())
    got: list[Message] = []
    for i, byte in enumerate(wire):
        dec.feed(
            bytes([byte]), dup_fds(pipe[0], 1) if i % (HEADER_SIZE + 3) == 0 else []
        )
        got.extend(drain(dec))
    assert [m.data for m in got] == [b"abc"] * 3
    for m in got:
        m.close()


def test_many_records_in_one_read_decode_in_order(pipe: tuple[int, int]) -> None:
    records = [(str(i).encode() * (i % 7), i % 3) for i in range(500)]
    wire = b"".join(encode(d, n) for d, n in records)
    fds = dup_fds(pipe[0], sum(n for _, n in records))
    dec = RecordDecoder(Limits())
    dec.feed(wire, fds)
    msgs = drain(dec)
    assert [(m.data, len(m.fds)) for m in msgs] == records
    assert [fd for m in msgs for fd in m.fds] == fds
    for m in msgs:
        m.close()


def test_large_record_through_get_buffer(pipe: tuple[int, int]) -> None:
    payload = os.urandom(3 * READ_SIZE + 17)
    wire = encode(payload, 0)
    dec = RecordDecoder(Limits())
    pos = 0
    msgs: list[Message] = []
    while pos < len(wire):
        with dec.get_buffer() as view:
            n = min(len(view), len(wire) - pos, 10_000)
            view[:n] = wire[pos : pos + n]
        dec.commit(n)
        pos += n
        msgs.extend(drain(dec))
    assert [m.data for m in msgs] == [payload]


def test_buffer_shrinks_after_a_large_record() -> None:
    dec = RecordDecoder(Limits())
    dec.feed(encode(b"x" * (8 * READ_SIZE), 0))
    drain(dec)
    dec.feed(encode(b"small", 0))
    drain(dec)
    with dec.get_buffer() as view:
        assert len(view) <= READ_SIZE


def test_commit_more_than_offered_is_refused(pipe: tuple[int, int]) -> None:
    dec = RecordDecoder(Limits())
    with dec.get_buffer() as view:
        size = len(view)
    fds = dup_fds(pipe[0], 1)
    with pytest.raises(ValueError, match="more than"):
        dec.commit(size + 1, fds)
    assert fds[0].closed


def corrupt(header: bytes, offset: int, value: int) -> bytes:
    b = bytearray(header)
    b[offset] = value
    return bytes(b)


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (corrupt(encode(b"x", 0), 0, ord("G")), "bad magic"),
        (corrupt(encode(b"x", 0), 2, 2), "version 2"),
        (corrupt(encode(b"x", 0), 3, 1), "flags"),
        (corrupt(encode(b"x", 0), 7, 1), "reserved"),
        (
            struct.pack("!2sBBHHI", b"FD", 1, 0, 0, 0, 1001),
            "over this channel's max_payload",
        ),
        (struct.pack("!2sBBHHI", b"FD", 1, 0, 5, 0, 0), "over this channel's max_fds"),
        (b"GET / HTTP/1.1\r\n\r\n", "bad magic"),
    ],
)
def test_bad_headers_fail_and_close_fds(
    pipe: tuple[int, int], wire: bytes, match: str
) -> None:
    dec = RecordDecoder(Limits(max_payload=1000, max_fds=4))
    fds = dup_fds(pipe[0], 2)
    dec.feed(wire, fds)
    with pytest.raises(ProtocolError, match=match):
        drain(dec)
    assert all(fd.closed for fd in fds)
    # The decoder stays failed, and closes whatever it is given later.
    more = dup_fds(pipe[0], 1)
    with pytest.raises(ProtocolError, match="already failed"):
        dec.feed(b"x", more)
    assert more[0].closed
    with pytest.raises(ProtocolError):
        dec.next_message()


def test_oversized_payload_is_refused_before_it_is_buffered() -> None:
    dec = RecordDecoder(Limits(max_payload=1000))
    dec.feed(encode_header(2**32 - 1, 0))
    with pytest.raises(ProtocolError, match="4294967295-byte payload"):
        dec.next_message()


def test_fewer_fds_than_announced(pipe: tuple[int, int]) -> None:
    dec = RecordDecoder(Limits())
    fds = dup_fds(pipe[0], 1)
    dec.feed(encode(b"ab", 2), fds)
    with pytest.raises(ProtocolError, match="announced 2 descriptor"):
        drain(dec)
    assert fds[0].closed


def test_fds_may_arrive_before_their_record(pipe: tuple[int, int]) -> None:
    # A coalescing sender attaches the fds of several records to the first
    # sendmsg; a partial write can end exactly at a record boundary.
    dec = RecordDecoder(Limits())
    fds = dup_fds(pipe[0], 3)
    dec.feed(encode(b"one", 1), fds)
    [first] = drain(dec)
    assert first.fds == (fds[0],)
    assert dec.buffered_fds == 2 and not dec.at_boundary
    dec.feed(encode(b"two", 2))
    [second] = drain(dec)
    assert second.fds == (fds[1], fds[2])
    first.close()
    second.close()
    dec.end_of_stream()


def test_too_many_unclaimed_fds(pipe: tuple[int, int]) -> None:
    dec = RecordDecoder(Limits())
    fds = dup_fds(pipe[0], 254)
    dec.feed(b"F", fds)
    with pytest.raises(ProtocolError, match="254 descriptors arrived that no"):
        dec.next_message()
    assert all(fd.closed for fd in fds)


def test_eof_inside_a_record(pipe: tuple[int, int]) -> None:
    dec = RecordDecoder(Limits())
    fds = dup_fds(pipe[0], 1)
    dec.feed(encode(b"abcdef", 1)[:-2], fds)
    assert drain(dec) == []
    with pytest.raises(ProtocolError, match="middle of a record"):
        dec.end_of_stream()
    assert fds[0].closed


def test_eof_with_unclaimed_fds(pipe: tuple[int, int]) -> None:
    dec = RecordDecoder(Limits())
    fds = dup_fds(pipe[0], 2)
    dec.feed(encode(b"abc", 1), fds)
    [msg] = drain(dec)
    msg.close()
    with pytest.raises(ProtocolError, match="no record claimed"):
        dec.end_of_stream()
    assert fds[1].closed


def test_close_releases_everything(pipe: tuple[int, int]) -> None:
    dec = RecordDecoder(Limits())
    fds = dup_fds(pipe[0], 2)
    dec.feed(encode(b"abc", 2)[:5], fds)
    dec.close()
    assert all(fd.closed for fd in fds)
    assert dec.at_boundary


records_strategy = st.lists(
    st.tuples(st.binary(max_size=300), st.integers(0, 5)), max_size=12
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=records_strategy, cuts=st.lists(st.integers(0, 5000), max_size=8))
def test_property_any_split_decodes_the_same(
    records: list[tuple[bytes, int]], cuts: list[int]
) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        wire = b"".join(encode(d, n) for d, n in records)
        # Chunks as a sender would write them: one sendmsg per record, fds
        # with its first byte; the receiver's reads are cut anywhere.
        starts, pos = [], 0
        for d, n in records:
            starts.append((pos, n))
            pos += HEADER_SIZE + len(d)
        bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
        dec = RecordDecoder(Limits())
        out: list[Message] = []
        all_fds: list[Fd] = []
        for lo, hi in itertools.pairwise(bounds):
            nfds = sum(n for s, n in starts if lo <= s < hi)
            fds = dup_fds(null, nfds)
            all_fds.extend(fds)
            dec.feed(wire[lo:hi], fds)
            out.extend(drain(dec))
        dec.end_of_stream()
        assert [(m.data, len(m.fds)) for m in out] == records
        assert [fd for m in out for fd in m.fds] == all_fds
        for m in out:
            m.close()
    finally:
        os.close(null)


@settings(max_examples=300, deadline=None)
@given(
    records=records_strategy,
    flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1),
)
def test_property_corruption_is_a_protocol_error_never_a_leak(
    records: list[tuple[bytes, int]], flips: list[tuple[int, int]]
) -> None:
    wire = bytearray(b"".join(encode(d, n) for d, n in records) or b"\0")
    for pos, value in flips:
        wire[pos % len(wire)] = value
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        fds = dup_fds(null, sum(n for _, n in records))
        dec = RecordDecoder(Limits(max_payload=4096, max_fds=8))
        out: list[Message] = []
        try:
            dec.feed(bytes(wire), fds)
            while (msg := dec.next_message()) is not None:
                out.append(msg)
            dec.end_of_stream()
        except ProtocolError:
            pass
        for m in out:
            m.close()
        assert all(fd.closed for fd in fds)
    finally:
        os.close(null)
