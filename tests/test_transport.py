"""parse_ancillary: what a recvmsg's ancillary data turns into, with real fds."""

from __future__ import annotations

import array
import os
import socket
import struct

from aiofdpass._transport import _SCM_PIDFD, parse_ancillary

from .helpers import open_fds, pipe


def ints(*fds: int) -> bytes:
    return array.array("i", fds).tobytes()


def test_passed_descriptors_come_back_as_numbers_the_caller_owns() -> None:
    with pipe() as (r, _):
        a, b = os.dup(r), os.dup(r)
        # A cut buffer can leave a trailing partial int: it is dropped.
        got = parse_ancillary(
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, ints(a, b) + b"\0\0")]
        )
        assert got == [a, b]
        assert {a, b} <= open_fds()  # nothing closed: the caller owns them
        os.close(a)
        os.close(b)


def test_credentials_are_ignored_and_a_pidfd_is_closed() -> None:
    with pipe() as (r, _):
        a, b, pidfd = os.dup(r), os.dup(r), os.dup(r)
        creds = struct.pack("3i", os.getpid(), os.getuid(), os.getgid())
        assert _SCM_PIDFD is not None
        got = parse_ancillary(
            [
                (socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds),
                (socket.SOL_SOCKET, _SCM_PIDFD, ints(pidfd)),
                (socket.SOL_SOCKET, socket.SCM_RIGHTS, ints(a) + b"\0"),
                (socket.SOL_SOCKET, socket.SCM_RIGHTS, ints(b)),
                (socket.IPPROTO_IP, 8, b"\0" * 4),  # another level: skipped
            ]
        )
        assert got == [a, b]
        assert pidfd not in open_fds()
        os.close(a)
        os.close(b)
