"""Shared test helpers: descriptors of every kind, and identity checks."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress

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


def open_fds() -> set[int]:
    """The descriptors open in this process now (from ``/proc/self/fd``)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        # The listing's own descriptor is gone by the time we look at it.
        with suppress(OSError):
            os.readlink(f"/proc/self/fd/{name}")
            fds.add(int(name))
    return fds


def small_buffers(*socks: socket.socket) -> None:
    """Shrink kernel buffers so large writes are split (partial writes)."""
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
