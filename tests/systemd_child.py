"""The peer processes for test_systemd.py.

Run as ``python systemd_child.py MODE BACKEND``: ``activated`` is a server
that systemd-socket-activate started (it reads its socket with
``listen_fds()``); ``libsystemd`` uploads a pipe to ``$NOTIFY_SOCKET``'s fd
store with libsystemd's own ``sd_pid_notify_with_fds``.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import os
import sys

import anyio

import aiofdpass.systemd
from aiofdpass import FdChannel


def activated(backend: str) -> None:
    """Report what listen_fds() gave, over the activated SEQPACKET socket."""
    passed = aiofdpass.systemd.listen_fds()
    report = {
        "names": [name for name, _ in passed],
        "cloexec": [
            bool(fcntl.fcntl(fd.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
            for _, fd in passed
        ],
        "environment": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "again": len(aiofdpass.systemd.listen_fds()),
    }
    ((_, fd),) = passed
    with fd.to_socket() as listener:
        report["type"] = int(listener.type)
        conn, _ = listener.accept()  # the connection that woke the activator

    async def main() -> None:
        async with FdChannel.from_socket(conn) as chan:
            r, w = os.pipe()
            os.write(w, b"through the activated socket")
            os.close(w)
            await chan.send(json.dumps(report).encode(), [r], close_fds=True)
            with contextlib.suppress(anyio.EndOfStream):
                await chan.receive()

    options = {"use_uvloop": True} if backend == "uvloop" else {}
    name = "trio" if backend == "trio" else "asyncio"
    anyio.run(main, backend=name, backend_options=options)


def libsystemd() -> None:
    """Store a pipe's read end with sd_pid_notify_with_fds; print its result."""
    lib = ctypes.CDLL("libsystemd.so.0")
    lib.sd_pid_notify_with_fds.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.POINTER(ctypes.c_int),
        ctypes.c_uint,
    ]
    r, w = os.pipe()
    os.write(w, b"stored by libsystemd")
    os.close(w)
    fds = (ctypes.c_int * 1)(r)
    state = b"FDSTORE=1\nFDNAME=from-libsystemd"
    print(lib.sd_pid_notify_with_fds(0, 0, state, fds, 1), flush=True)
    os.close(r)


if __name__ == "__main__":
    if sys.argv[1] == "activated":
        activated(sys.argv[2])
    else:
        libsystemd()
