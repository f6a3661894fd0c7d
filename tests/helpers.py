"""Shared test helpers: descriptors of every kind, and identity checks."""

from __future__ import annotations

import array
import os
import resource
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import pytest
from anyio.abc import SocketAttribute

from aiofdpass import Fd, FdChannel, FdStream
from aiofdpass._codec import encode_header

#: ``make fuzz`` sets this to run every property test this many times longer.
FUZZ_FACTOR = int(os.environ.get("AIOFDPASS_FUZZ", "1"))


def examples(ci: int) -> int:
    """Hypothesis examples for a property test: ``ci`` in ``make test``."""
    return ci * FUZZ_FACTOR


def identity(fd: int) -> tuple[int, int]:
    """The open file's identity: the same on both sides of a pass."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


@contextmanager
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def rights(*fds: int) -> list[tuple[int, int, array.array[int]]]:
    """Ancillary data passing ``fds``, for a raw ``sendmsg`` playing a peer."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]


def open_fds() -> set[int]:
    """The descriptors open in this process now (from ``/proc/self/fd``)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        # The listing's own descriptor is gone by the time we look at it.
        with suppress(OSError):
            os.readlink(f"/proc/self/fd/{name}")
            fds.add(int(name))
    return fds


def limit_with_free_slots(free: int) -> int:
    """The RLIMIT_NOFILE under which exactly ``free`` new fds fit."""
    used = {int(x) for x in os.listdir("/proc/self/fd")}
    n = 0
    while free:
        free -= n not in used
        n += 1
    return n


@contextmanager
def soft_fd_limit_at_least(wanted: int) -> Iterator[None]:
    """Raise a lower soft RLIMIT_NOFILE to ``wanted`` for the block; restore it after.

    ``wanted`` must not be over the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def small_buffers(*socks: socket.socket) -> None:
    """Shrink kernel buffers so large writes are split (partial writes)."""
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


def backend_id(anyio_backend: object) -> str:
    """The backend's name as a child process's command line takes it."""
    if isinstance(anyio_backend, tuple):
        return "uvloop"
    return str(anyio_backend)


def raw(chan: FdChannel | FdStream) -> socket.socket:
    """The channel's (or stream's) socket, to play a peer byte by byte."""
    sock: socket.socket = chan.extra(SocketAttribute.raw_socket)
    return sock


def copies_of(fd: int) -> int:
    """How many descriptors of this process refer to ``fd``'s open file.

    A pipe's two ends share one inode, so for a pipe this counts both ends
    plus every copy of either.
    """
    count = 0
    for name in os.listdir("/proc/self/fd"):
        # The listing's own descriptor is closed by the time we look.
        with suppress(OSError):
            count += identity(int(name)) == identity(fd)
    return count


def fill(sock: socket.socket) -> int:
    """Fill the socket's buffer with empty records; return how many."""
    filler = encode_header(0, 0)
    count = 0
    while True:
        try:
            assert sock.send(filler) == len(filler)
        except BlockingIOError:
            return count
        count += 1


def check_from_fd_refusals(from_fd: Callable[[Fd], object]) -> None:
    """``from_fd`` refuses a non-stream socket, a closed Fd and a pipe.

    Each refused ``Fd`` is still the caller's (open, not taken).
    """
    # A datagram socket: neither FdChannel (stream or SEQPACKET) nor
    # FdStream takes one.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as seq:
        refused = Fd(os.dup(seq.fileno()))
        with pytest.raises(ValueError, match="SOCK_STREAM"):
            from_fd(refused)
        assert not refused.closed
        os.fstat(refused.fileno())
        refused.close()
    closed = Fd(os.dup(0))
    closed.close()
    with pytest.raises(ValueError, match="closed or taken"):
        from_fd(closed)
    r, w = os.pipe()
    os.close(w)
    not_a_socket = Fd(r)
    with pytest.raises(OSError, match="is not a socket"):
        from_fd(not_a_socket)
    assert not not_a_socket.closed
    not_a_socket.close()
