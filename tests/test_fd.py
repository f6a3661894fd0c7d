"""Fd, Message and Limits: ownership of real descriptors."""

from __future__ import annotations

import copy
import errno
import gc
import os
import socket
import tempfile

import pytest

from aiofdpass import Fd, Limits, Message, channel_pair
from aiofdpass._codec import RecordDecoder, encode_header
from aiofdpass._fd import close_numbers

from .helpers import open_fds, pipe


def test_fileno_take_close() -> None:
    r, w = os.pipe()
    os.close(w)
    fd = Fd(r)
    assert fd.fileno() == r and not fd.closed
    assert fd.take() == r
    assert fd.closed
    with pytest.raises(ValueError, match="closed or taken"):
        fd.fileno()
    with pytest.raises(ValueError, match="closed or taken"):
        fd.take()
    fd.close()  # nothing to close: no error, and r is still ours
    os.close(r)


def test_close_is_idempotent_and_really_closes() -> None:
    r, w = os.pipe()
    fd = Fd(w)
    fd.close()
    fd.close()
    with pytest.raises(OSError):  # noqa: PT011 - EBADF
        os.fstat(w)
    assert repr(fd) == "<Fd closed>"
    os.close(r)


def test_context_manager_closes() -> None:
    r, w = os.pipe()
    with Fd(r) as fd:
        assert repr(fd) == f"<Fd {r}>"
    assert fd.closed
    os.close(w)


def test_garbage_collected_fd_closes_and_warns() -> None:
    r, w = os.pipe()
    fd = Fd(r)
    with pytest.warns(ResourceWarning, match=f"unclosed Fd\\({r}\\)"):  # noqa: PT031
        del fd
        gc.collect()
    with pytest.raises(OSError):  # noqa: PT011
        os.fstat(r)
    os.close(w)


@pytest.mark.parametrize("bad", [-1, True, "3", 1.0])
def test_bad_numbers(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        Fd(bad)  # type: ignore[arg-type]


def test_to_file_takes_ownership() -> None:
    with tempfile.TemporaryFile() as f:
        f.write(b"content")
        f.flush()
        fd = Fd(os.dup(f.fileno()))
        with fd.to_file("rb") as g:
            assert fd.closed
            g.seek(0)
            assert g.read() == b"content"


def test_to_file_with_bad_arguments_keeps_ownership() -> None:
    r, w = os.pipe()
    fd = Fd(r)
    with pytest.raises(ValueError):  # noqa: PT011
        fd.to_file("rz")
    with pytest.raises(ValueError):  # noqa: PT011
        fd.to_file("rb", encoding="utf-8")
    assert not fd.closed
    os.fstat(r)  # still open
    fd.close()
    os.close(w)


def test_to_socket() -> None:
    a, b = socket.socketpair()
    fd = Fd(os.dup(a.fileno()))
    a.close()
    with fd.to_socket() as s:
        assert fd.closed
        s.sendall(b"ping")
        assert b.recv(4) == b"ping"
    b.close()


def test_to_socket_on_a_non_socket_keeps_ownership() -> None:
    r, w = os.pipe()
    fd = Fd(r)
    with pytest.raises(OSError):  # noqa: PT011 - ENOTSOCK
        fd.to_socket()
    assert not fd.closed
    fd.close()
    os.close(w)


def test_message() -> None:
    r, w = os.pipe()
    fds = (Fd(r), Fd(w))
    msg = Message(bytearray(b"abc"), fds)
    assert msg.data == b"abc" and type(msg.data) is bytes
    assert msg.fds == fds
    assert msg == Message(b"abc", fds)
    assert msg != Message(b"abd", fds)
    assert msg.__eq__(object()) is NotImplemented
    assert hash(msg) == hash(Message(b"abc", fds))
    assert "3 bytes" in repr(msg)
    assert "..." in repr(Message(b"x" * 100))
    fds[0].take()
    with msg:
        pass
    assert all(fd.closed for fd in fds)
    os.close(r)  # taken: still ours
    with pytest.raises(AttributeError):
        msg.data = b"new"  # type: ignore[misc]


def test_message_needs_fd_objects() -> None:
    with pytest.raises(TypeError, match="must be Fd objects"):
        Message(b"", [3])  # type: ignore[list-item]


@pytest.mark.parametrize(
    "kwargs", [{"max_fds": 254}, {"max_fds": -1}, {"max_payload": 2**32}]
)
def test_limits_out_of_range(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="must be between"):
        Limits(**kwargs)


def test_limits_type() -> None:
    with pytest.raises(TypeError):
        Limits(max_fds=True)
    assert Limits() == Limits(16 * 1024 * 1024, 253)


def test_message_close_with_a_contiguous_run_closes_exactly_those() -> None:
    r, w = os.pipe()
    # Dup into a contiguous run of numbers, with a neighbour on each side.
    base = os.dup(r)
    run = [os.dup(r) for _ in range(5)]
    after = os.dup(r)
    assert run == list(range(run[0], run[0] + 5))
    msg = Message(b"", [Fd(n) for n in reversed(run)])
    msg.close()
    assert all(fd.closed for fd in msg.fds)
    for n in run:
        with pytest.raises(OSError):  # noqa: PT011
            os.fstat(n)
    os.fstat(base)  # the neighbours are untouched
    os.fstat(after)
    for n in (base, after, r, w):
        os.close(n)


def test_message_close_with_gaps_closes_one_by_one() -> None:
    r, w = os.pipe()
    a, gap, b, c = (os.dup(r) for _ in range(4))
    msg = Message(b"", [Fd(a), Fd(b), Fd(c)])
    msg.fds[1].take()  # taken: the rest is no longer one run
    msg.close()
    os.fstat(gap)
    os.fstat(b)  # taken, so still open
    for n in (gap, b, r, w):
        os.close(n)


# -- Received messages: numbers stay plain ints until `fds` is read ----------


def received(numbers: list[int], data: bytes = b"") -> Message:
    """A message as the decoder returns it: it owns ``numbers``, unwrapped."""
    dec = RecordDecoder(Limits())
    dec.feed(encode_header(len(data), len(numbers)) + data, numbers)
    msg = dec.next_message()
    assert msg is not None and dec.at_boundary
    return msg


def contiguous_run(r: int, n: int) -> tuple[int, list[int], int]:
    """Dup ``r`` into a run of ``n`` numbers with an open neighbour each side."""
    # The numbers of a try that straddled a hole stay open until a try
    # succeeds: closed at once, the next try would get the same numbers.
    held: list[int] = []
    try:
        while True:
            fds = [os.dup(r) for _ in range(n + 2)]
            if fds == list(range(fds[0], fds[0] + n + 2)):
                return fds[0], fds[1:-1], fds[-1]
            held += fds
    finally:
        for fd in held:
            os.close(fd)


def test_received_message_closes_exactly_its_run_without_wrapping() -> None:
    r, w = os.pipe()
    # A hole in the table under an open number: the run must go past it.
    hole, above = os.dup(r), os.dup(r)
    os.close(hole)
    before, run, after = contiguous_run(r, 64)
    os.close(above)
    baseline = open_fds()
    msg = received(list(reversed(run)), b"data")
    assert msg.nfds == 64 and msg.data == b"data"
    assert open_fds() == baseline  # nothing opened or closed yet
    msg.close()
    assert open_fds() == baseline - set(run)  # exactly the run, neighbours kept
    # Closed before it was ever wrapped: fds still says how many, all closed.
    assert msg.nfds == 64 and len(msg.fds) == 64
    assert all(fd.closed for fd in msg.fds)
    msg.close()
    assert open_fds() == baseline - set(run)
    for fd in (before, after, r, w):
        os.close(fd)


def test_received_message_with_gaps_closes_one_by_one() -> None:
    r, w = os.pipe()
    a, gap, b, c = (os.dup(r) for _ in range(4))
    msg = received([c, a, b])
    msg.close()
    assert open_fds() >= {gap, r, w}
    assert not open_fds() & {a, b, c}
    for fd in (gap, r, w):
        os.close(fd)


def test_close_numbers_never_closes_between_a_repeated_number() -> None:
    # [a, a, c] spans a..c with three entries: a check of the span alone
    # would close_range the neighbour b, which nobody here owns.
    r, w = os.pipe()
    a, b, c = (os.dup(r) for _ in range(3))
    with pytest.raises(OSError) as info:  # noqa: PT011
        close_numbers([a, a, c])
    assert info.value.errno == errno.EBADF  # the second close of a
    os.fstat(b)
    assert not open_fds() & {a, c}
    for fd in (b, r, w):
        os.close(fd)


def test_message_with_the_same_fd_twice_closes_it_once() -> None:
    r, w = os.pipe()
    a, b, c = (os.dup(r) for _ in range(3))
    fa, fc = Fd(a), Fd(c)
    msg = Message(b"", [fa, fa, fc])
    msg.close()  # no EBADF: the Fd forgot its number after the first close
    os.fstat(b)  # not in the message: untouched, although a..c is a run
    assert fa.closed and fc.closed and not open_fds() & {a, c}
    for fd in (b, r, w):
        os.close(fd)


def test_message_close_closes_all_then_raises_the_first_error() -> None:
    r, w = os.pipe()
    for wrapped in (True, False):
        a, gone, b, other, c = (os.dup(r) for _ in range(5))
        os.close(gone)  # as if something else closed it behind our back
        owned = [a, gone, b, c]  # not a run: `other` is in between
        msg = Message(b"", map(Fd, owned)) if wrapped else received(owned)
        with pytest.raises(OSError) as info:  # noqa: PT011
            msg.close()
        assert info.value.errno == errno.EBADF
        assert all(fd.closed for fd in msg.fds)
        assert not open_fds() & {a, b, c}
        msg.close()  # closed already: nothing to do, no error
        os.close(other)  # still open: never the message's
    os.close(r)
    os.close(w)


def test_reading_fds_wraps_once_and_the_message_keeps_owning_them() -> None:
    r, w = os.pipe()
    run = [os.dup(r) for _ in range(5)]
    msg = received(run)
    fds = msg.fds
    assert [fd.fileno() for fd in fds] == run
    assert msg.fds is fds and msg.nfds == 5
    kept = fds[2].take()
    msg.close()
    assert all(fd.closed for fd in fds)
    assert open_fds() & set(run) == {kept}
    for fd in (kept, r, w):
        os.close(fd)


def test_received_message_equality_hash_and_repr() -> None:
    r, w = os.pipe()
    msg = received([os.dup(r)], b"abc")
    assert msg == msg and msg != received([], b"abc")
    assert hash(msg) == hash(msg)
    assert f"<Fd {msg.fds[0].fileno()}>" in repr(msg)
    assert received([], b"abc") == Message(b"abc")
    msg.close()
    os.close(r)
    os.close(w)


def test_garbage_collected_received_message_closes_and_warns() -> None:
    r, w = os.pipe()
    run = [os.dup(r) for _ in range(3)]
    msg = received(run)
    with pytest.warns(ResourceWarning, match="unclosed Message with 3 descriptor"):  # noqa: PT031
        del msg
        gc.collect()
    assert not open_fds() & set(run)
    # Once wrapped, the Fd objects own them (and warn for themselves).
    msg = received([os.dup(r)])
    [fd] = msg.fds
    number = fd.fileno()
    del msg
    gc.collect()
    os.fstat(number)  # still open: fd owns it
    fd.close()
    os.close(r)
    os.close(w)


def test_nfds_of_a_message_built_by_hand() -> None:
    r, w = os.pipe()
    msg = Message(b"x", [Fd(r), Fd(w)])
    assert msg.nfds == 2 == len(msg.fds)
    msg.close()
    assert Message(b"").nfds == 0


@pytest.mark.anyio
async def test_copies_of_a_received_message_share_its_descriptors() -> None:
    # Two messages owning the same plain numbers would close them twice (the
    # second close hitting whatever reused the numbers): copies share Fds.
    a, b = channel_pair()
    async with a, b:
        with pipe() as (r, w):
            await a.send(b"x", [r, w])
            msg = await b.receive()
            shallow, deep = copy.copy(msg), copy.deepcopy(msg)
            assert shallow == msg and deep == msg
            numbers = [fd.fileno() for fd in msg.fds]
            msg.close()
            reuse_r, reuse_w = os.pipe()  # likely the numbers just freed
            try:
                shallow.close()
                deep.close()
                os.fstat(reuse_r)
                os.fstat(reuse_w)  # still open: nobody closed them twice
            finally:
                os.close(reuse_r)
                os.close(reuse_w)
            assert len(numbers) == 2
            fd = Fd(os.dup(r))
            assert copy.copy(fd) is fd and copy.deepcopy(fd) is fd
            fd.close()
