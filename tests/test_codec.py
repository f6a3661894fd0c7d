"""The sans-I/O record codec: no sockets, real descriptors.

The decoder takes descriptor numbers and owns them from then on; "closed"
below means the number is no longer open in this process.
"""

from __future__ import annotations

import contextlib
import os
import random
import struct
from collections import deque
from collections.abc import Iterable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiofdpass import Limits, Message, ProtocolError
from aiofdpass._codec import HEADER_SIZE, READ_SIZE, RecordDecoder, encode_header

from .helpers import examples


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def dup_fds(base: int, n: int) -> list[int]:
    return [os.dup(base) for _ in range(n)]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def all_closed(fds: Iterable[int]) -> bool:
    return not any(is_open(fd) for fd in fds)


def numbers(msgs: Iterable[Message]) -> list[int]:
    """The descriptor numbers the messages carry, in order (wrapping them)."""
    return [fd.fileno() for m in msgs for fd in m.fds]


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
    assert msg.nfds == 2
    assert numbers([msg]) == fds
    assert dec.at_boundary
    msg.close()
    assert all_closed(fds)
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
        assert numbers(msgs) == first_fds
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
    assert [(m.data, m.nfds) for m in msgs] == records
    assert numbers(msgs) == fds
    for m in msgs:
        m.close()
    assert all_closed(fds)


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
    # Kept while big records may follow; given back after 16 small reads.
    for _ in range(17):
        dec.feed(encode(b"small", 0))
        drain(dec)
        with dec.get_buffer() as view:
            size = len(view)
    assert size <= READ_SIZE


def test_commit_more_than_offered_is_refused(pipe: tuple[int, int]) -> None:
    dec = RecordDecoder(Limits())
    with dec.get_buffer() as view:
        size = len(view)
    fds = dup_fds(pipe[0], 1)
    with pytest.raises(ValueError, match="more than"):
        dec.commit(size + 1, fds)
    assert all_closed(fds)


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
    assert all_closed(fds)
    # The decoder stays failed, and closes whatever it is given later.
    more = dup_fds(pipe[0], 1)
    with pytest.raises(ProtocolError, match="already failed"):
        dec.feed(b"x", more)
    assert all_closed(more)
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
    assert all_closed(fds)


def test_fds_may_arrive_before_their_record(pipe: tuple[int, int]) -> None:
    # A coalescing sender attaches the fds of several records to the first
    # sendmsg; a partial write can end exactly at a record boundary.
    dec = RecordDecoder(Limits())
    fds = dup_fds(pipe[0], 3)
    dec.feed(encode(b"one", 1), fds)
    [first] = drain(dec)
    assert numbers([first]) == fds[:1]
    assert dec.buffered_fds == 2 and not dec.at_boundary
    dec.feed(encode(b"two", 2))
    [second] = drain(dec)
    assert numbers([second]) == fds[1:]
    first.close()
    second.close()
    dec.end_of_stream()


def test_too_many_unclaimed_fds(pipe: tuple[int, int]) -> None:
    dec = RecordDecoder(Limits())
    fds = dup_fds(pipe[0], 254)
    dec.feed(b"F", fds)
    with pytest.raises(ProtocolError, match="254 descriptors arrived that no"):
        dec.next_message()
    assert all_closed(fds)


def test_eof_inside_a_record(pipe: tuple[int, int]) -> None:
    dec = RecordDecoder(Limits())
    fds = dup_fds(pipe[0], 1)
    dec.feed(encode(b"abcdef", 1)[:-2], fds)
    assert drain(dec) == []
    with pytest.raises(ProtocolError, match="middle of a record"):
        dec.end_of_stream()
    assert all_closed(fds)


def test_eof_with_unclaimed_fds(pipe: tuple[int, int]) -> None:
    dec = RecordDecoder(Limits())
    fds = dup_fds(pipe[0], 2)
    dec.feed(encode(b"abc", 1), fds)
    [msg] = drain(dec)
    msg.close()
    with pytest.raises(ProtocolError, match="no record claimed"):
        dec.end_of_stream()
    assert all_closed(fds)


def test_close_releases_everything(pipe: tuple[int, int]) -> None:
    dec = RecordDecoder(Limits())
    fds = dup_fds(pipe[0], 2)
    dec.feed(encode(b"abc", 2)[:5], fds)
    dec.close()
    assert all_closed(fds)
    assert dec.at_boundary


# -- Property tests: the kernel's delivery model -------------------------------
#
# KernelStream models an AF_UNIX stream socket's receive queue the way
# net/unix/af_unix.c (unix_stream_read_generic) serves it: one skb per piece
# of a sendmsg, the descriptors on the first skb of their sendmsg; a read
# copies bytes from consecutive skbs and stops right after the first skb
# whose descriptors it took (plain bytes sent earlier may come in front).


class KernelStream:
    def __init__(self) -> None:
        self.skbs: deque[tuple[bytearray, list[int]]] = deque()
        self.delivered: list[int] = []  # fds handed to the reader so far

    def close(self) -> None:
        """The socket is closed: the kernel releases fds still queued."""
        for _, fds in self.skbs:
            for fd in fds:
                os.close(fd)
        self.skbs.clear()

    def sendmsg(self, data: bytes, fds: list[int], pieces: list[int]) -> None:
        """Queue ``data`` as skbs of the given sizes; ``fds`` on the first."""
        assert data or not fds, "Linux drops fds sent with no bytes"
        assert len(fds) <= 253
        pos = 0
        for size in [*pieces, len(data)]:
            chunk = data[pos : pos + max(size, 1)]
            if not chunk:
                break
            self.skbs.append((bytearray(chunk), fds if pos == 0 else []))
            pos += len(chunk)

    def recvmsg(self, size: int) -> tuple[bytes, list[int]]:
        out = bytearray()
        while self.skbs and len(out) < size:
            data, fds = self.skbs[0]
            take = min(size - len(out), len(data))
            out += data[:take]
            del data[:take]
            self.skbs[0] = (data, [])  # the fds go with the first byte read
            if not data:
                self.skbs.popleft()
            if fds:
                self.delivered.extend(fds)
                return bytes(out), fds
        return bytes(out), []


def payload(index: int, length: int) -> bytes:
    return random.Random(index).randbytes(length)


# A record: payload length 0..64 KiB (mostly small) and 0..253 fds.
record_shapes = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 64), st.integers(0, 64 * 1024)),
        st.one_of(st.integers(0, 3), st.integers(0, 253)),
        st.booleans(),  # does this record start a new sendmsg (else coalesced)
    ),
    max_size=8,
)
piece_sizes = st.lists(st.integers(1, 70_000), max_size=4)
read_sizes = st.lists(st.integers(1, 100_000), min_size=1, max_size=16)


def send_records(
    kernel: KernelStream,
    shapes: list[tuple[int, int, bool]],
    pieces: list[int],
    null: int,
) -> tuple[list[tuple[bytes, int]], list[int]]:
    """Queue the records as senders do: one per sendmsg, or coalesced."""
    records = [(payload(i, n), k) for i, (n, k, _) in enumerate(shapes)]
    groups: list[list[int]] = []
    for i, (_, nfds, new) in enumerate(shapes):
        if not groups or new or sum(shapes[j][1] for j in groups[-1]) + nfds > 253:
            groups.append([])
        groups[-1].append(i)
    all_fds: list[int] = []
    for group in groups:
        wire = b"".join(encode(*records[i]) for i in group)
        fds = dup_fds(null, sum(records[i][1] for i in group))
        all_fds.extend(fds)
        kernel.sendmsg(wire, fds, pieces)
    return records, all_fds


def receive_all(
    kernel: KernelStream, dec: RecordDecoder, reads: list[int], out: list[Message]
) -> None:
    """Read as FdChannel.receive does, into get_buffer(); then end of stream."""
    # Tiny reads only for small streams: a byte at a time through 500 KiB
    # would make each example slow without finding anything new.
    floor = sum(len(data) for data, _ in kernel.skbs) // 128
    i = 0
    while kernel.skbs:
        with dec.get_buffer() as view:
            size = max(reads[i % len(reads)], floor)
            data, fds = kernel.recvmsg(min(size, len(view)))
            view[: len(data)] = data
        i += 1
        dec.commit(len(data), fds)
        while (msg := dec.next_message()) is not None:
            out.append(msg)  # kept even if the next record is bad
    dec.end_of_stream()


@settings(
    max_examples=examples(1500),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(shapes=record_shapes, pieces=piece_sizes, reads=read_sizes)
def test_property_kernel_delivery_decodes_the_same(
    shapes: list[tuple[int, int, bool]], pieces: list[int], reads: list[int]
) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    out: list[Message] = []
    try:
        kernel = KernelStream()
        records, all_fds = send_records(kernel, shapes, pieces, null)
        dec = RecordDecoder(Limits(max_payload=64 * 1024))
        receive_all(kernel, dec, reads, out)
        assert [(m.data, m.nfds) for m in out] == records
        assert numbers(out) == all_fds
        assert dec.at_boundary
        for m in out:
            m.close()
        assert all_closed(all_fds)
    finally:
        for m in out:
            m.close()
        os.close(null)


@st.composite
def corruptions(draw: st.DrawFn) -> list[tuple[str, int, int]]:
    kinds = st.sampled_from(["flip", "set", "cut", "insert", "delete", "fds"])
    return draw(
        st.lists(
            st.tuples(kinds, st.integers(0, 2**20), st.integers(-3, 255)),
            min_size=1,
            max_size=4,
        )
    )


@settings(
    max_examples=examples(1000),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    shapes=record_shapes,
    pieces=piece_sizes,
    reads=read_sizes,
    damage=corruptions(),
)
def test_property_corruption_is_a_protocol_error_never_a_leak(
    shapes: list[tuple[int, int, bool]],
    pieces: list[int],
    reads: list[int],
    damage: list[tuple[str, int, int]],
) -> None:
    null = os.open(os.devnull, os.O_RDONLY)
    out: list[Message] = []
    sent: list[int] = []
    try:
        kernel = KernelStream()
        send_records(kernel, shapes, pieces, null)
        if not kernel.skbs:
            kernel.sendmsg(b"\0", [], [])
        skbs = kernel.skbs
        for kind, where, value in damage:
            data, fds = skbs[where % len(skbs)]
            pos = where % (len(data) + 1)
            if kind == "flip" and data:
                data[pos % len(data)] ^= 1 << (value % 8)
            elif kind == "set" and data:
                data[pos % len(data)] = value % 256
            elif kind == "cut":
                del data[pos:]
            elif kind == "insert":
                data[pos:pos] = bytes([value % 256]) * (1 + where % 16)
            elif kind == "delete":
                del data[pos : pos + 1 + value % 16]
            elif kind == "fds":
                # value < 0: drop fds; otherwise add that many extra (to 253).
                if value < 0:
                    for fd in fds[value:]:
                        os.close(fd)
                    del fds[value:]
                else:
                    fds.extend(dup_fds(null, min(value % 8, 253 - len(fds))))
        # Linux drops fds that travel with no byte: model that too.
        for data, fds in skbs:
            if not data:
                for fd in fds:
                    os.close(fd)
                fds.clear()
        kernel.skbs = deque(skb for skb in skbs if skb[0])
        wire = b"".join(bytes(data) for data, _ in kernel.skbs)
        sent = [fd for _, fds in kernel.skbs for fd in fds]
        dec = RecordDecoder(Limits(max_payload=64 * 1024, max_fds=253))
        try:
            receive_all(kernel, dec, reads, out)
        except ProtocolError:
            # The channel closes the socket: the kernel releases the rest.
            kernel.close()
        else:
            # Accepted: the records re-encode to exactly what arrived, and
            # they took every descriptor, in arrival order.
            assert b"".join(encode(m.data, m.nfds) for m in out) == wire
            assert numbers(out) == sent == kernel.delivered
        for m in out:
            m.close()
        # Never a leaked descriptor: everything the decoder was given is
        # closed now, whether a message carried it or the decoder gave up.
        assert all_closed(kernel.delivered)
    except BaseException:
        # Do not let a failed example leak into the next one.
        for m in out:
            m.close()
        for fd in sent:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    finally:
        os.close(null)


@pytest.mark.parametrize(
    ("first", "match"),
    [
        (b"\0", "bad magic b'\\\\x00'"),
        (b"G", "bad magic b'G'"),
        (b"FX", "bad magic b'FX'"),
        (b"FD\x02", "unsupported protocol version 2"),
        (b"FD\x01\x80", "flags 0x80"),
    ],
)
def test_the_first_bytes_that_cannot_begin_a_header_fail_at_once(
    pipe: tuple[int, int], first: bytes, match: str
) -> None:
    # A foreign peer may send a few bytes and wait for an answer: waiting
    # for a whole header would hang, so a prefix that no header has fails.
    dec = RecordDecoder(Limits())
    fds = dup_fds(pipe[0], 1)
    dec.feed(first, fds)
    with pytest.raises(ProtocolError, match=match) as info:
        dec.next_message()
    if b"\x80" not in first:
        assert "FdStream" in str(info.value)
    assert all_closed(fds)


@pytest.mark.parametrize("prefix", [b"F", b"FD", b"FD\x01", b"FD\x01\x00"])
def test_a_valid_header_prefix_waits_for_the_rest(prefix: bytes) -> None:
    dec = RecordDecoder(Limits())
    whole = encode(b"payload", 0)
    dec.feed(prefix)
    assert dec.next_message() is None
    dec.feed(whole[len(prefix) :])
    [msg] = drain(dec)
    assert msg.data == b"payload"
