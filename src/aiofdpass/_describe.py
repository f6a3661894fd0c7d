"""Say what a descriptor is, from ``/proc``: its kind, target and access mode.

Used by the command-line tool (``python -m aiofdpass``) and the pytest
plugin's leak report. Linux only: everything comes from ``/proc/PID/fd``
and ``/proc/PID/fdinfo``.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

__all__ = ["FdInfo", "describe", "list_fds"]

# anon_inode:[eventpoll] and friends: the kernel's names, made readable.
_ANON_KINDS = {"eventpoll": "epoll", "timerfd": "timerfd", "pidfd": "pidfd"}
_ACCESS = {os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "rw"}


@dataclass(frozen=True)
class FdInfo:
    """One open descriptor of a process, as ``/proc`` shows it."""

    fd: int
    #: file, directory, pipe, fifo, socket, memfd, eventfd, epoll, tty, ...
    kind: str
    #: The ``/proc/PID/fd/N`` link's target: a path, ``pipe:[123]``, ...
    target: str
    #: ``r``, ``w`` or ``rw`` (``?`` when ``fdinfo`` is unreadable).
    access: str

    def __str__(self) -> str:
        return f"fd {self.fd}: {self.kind} {self.target} ({self.access})"


def _kind(target: str, mode: int | None) -> str:
    if target.startswith("anon_inode:"):
        name = target[len("anon_inode:") :].strip("[]")
        return _ANON_KINDS.get(name, name)
    if target.startswith("/memfd:"):
        return "memfd"
    if mode is None:
        return "unknown"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISFIFO(mode):
        return "pipe" if target.startswith("pipe:") else "fifo"
    if stat.S_ISCHR(mode):
        if target.startswith(("/dev/pts/", "/dev/tty", "/dev/console")):
            return "tty"
        return "char device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISREG(mode):
        return "file"
    return "unknown"


def _access(pid: str, fd: int) -> str:
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as info:
            for line in info:
                if line.startswith("flags:"):
                    flags = int(line.split()[1], 8)
                    return _ACCESS.get(flags & os.O_ACCMODE, "?")
    except OSError:
        pass
    return "?"


def describe(fd: int, pid: int | str = "self") -> FdInfo:
    """Describe descriptor ``fd`` of process ``pid`` (default: this one).

    :raises OSError: if the descriptor is not open (``FileNotFoundError``)
        or the process's ``/proc`` entries are not readable.
    """
    link = f"/proc/{pid}/fd/{fd}"
    target = os.readlink(link)
    try:
        # The magic link leads to the open file itself (pipes and sockets too).
        mode: int | None = os.stat(link).st_mode
    except OSError:
        mode = None
    return FdInfo(fd, _kind(target, mode), target, _access(str(pid), fd))


def list_fds(pid: int | str = "self") -> list[FdInfo]:
    """Describe every open descriptor of process ``pid``, by number.

    :raises OSError: ``ESRCH``/``FileNotFoundError`` if there is no such
        process, ``PermissionError`` if its descriptors are not ours to see.
    """
    numbers = sorted(int(name) for name in os.listdir(f"/proc/{pid}/fd"))
    infos = []
    for fd in numbers:
        try:
            infos.append(describe(fd, pid))
        except FileNotFoundError:
            continue  # closed meanwhile (our own listing's descriptor, too)
    return infos
