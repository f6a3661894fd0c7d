"""Fd, Message and Limits: ownership of real descriptors."""

from __future__ import annotations

import gc
import os
import socket
import tempfile

import pytest

from aiofdpass import Fd, Limits, Message


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
