"""Who is on the other end: `PeerCredentials` (``SO_PEERCRED``), `listen` policies."""

from __future__ import annotations

import errno
import functools
import inspect
import logging
import os
import socket
import struct
from collections.abc import Callable, Collection
from typing import NamedTuple

from anyio import TypedAttributeSet, typed_attribute

__all__ = [
    "AllowPolicy",
    "FdPassAttribute",
    "PeerCredentials",
    "check_peer",
    "make_policy",
    "peer_credentials_of",
    "peer_pidfd_of",
    "same_user",
]

logger = logging.getLogger("aiofdpass")

_UCRED = struct.Struct("3i")  # struct ucred: pid_t pid; uid_t uid; gid_t gid


class PeerCredentials(NamedTuple):
    """The process at the other end of a connected AF_UNIX socket.

    Read with ``SO_PEERCRED``: the kernel records them when the connection is
    made (``connect``, or ``socketpair``), so they describe the peer as it
    was then, and the peer cannot forge them. ``uid`` and ``gid`` are the
    peer's effective ids. ``pid`` is 0 when the peer lives in a PID namespace
    this process cannot see; a pid can be reused after the peer exits, so
    authorize by ``uid``/``gid``, not by ``pid``, or identify the process
    through ``channel.peer_pidfd()`` (Linux 6.5+), which has no such race.
    Constructing one never raises.
    """

    pid: int
    """The peer's process id at connect time (0 if not visible here)."""
    uid: int
    """The peer's effective user id at connect time."""
    gid: int
    """The peer's effective group id at connect time."""


class FdPassAttribute(TypedAttributeSet):
    """Anyio typed attributes that aiofdpass adds to its channels and streams.

    ``channel.extra(FdPassAttribute.peer_credentials)`` works on every
    :class:`FdChannel` and :class:`FdStream`, and through anyio wrappers that
    forward ``extra``. It is a namespace of attribute keys and never raises.
    """

    #: The peer's :class:`PeerCredentials` (``SO_PEERCRED``).
    peer_credentials: PeerCredentials = typed_attribute()


def peer_credentials_of(sock: socket.socket) -> PeerCredentials:
    """Return the ``SO_PEERCRED`` credentials of a connected AF_UNIX socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCredentials(*_UCRED.unpack(raw))


# SO_PEERPIDFD (Linux 6.5+): a pidfd for the peer process. Python 3.11 lacks
# the name.
_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)


def peer_pidfd_of(sock: socket.socket) -> int:
    """Return a new pidfd (``SO_PEERPIDFD``) for the peer of an AF_UNIX socket.

    The caller owns the number (close-on-exec).

    :raises OSError: ``ENOPROTOOPT`` on kernels before Linux 6.5, with a
        message that says what to use instead; ``ENODATA`` if the kernel
        recorded no peer. A peer that has exited still gives a pidfd
        (``/proc/self/fdinfo`` then says ``Pid: -1``).
    """
    try:
        fd: int = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError as exc:  # pragma: no cover - Linux 6.5+ answers (6.18 here)
        if exc.errno == errno.ENOPROTOOPT:
            raise OSError(
                errno.ENOPROTOOPT,
                "this kernel has no SO_PEERPIDFD (it came in Linux 6.5): "
                "identify the peer by peer_credentials (uid and gid; its pid "
                "may be reused once the peer exits)",
            ) from None
        raise OSError(
            exc.errno, f"cannot get a pidfd for the peer: {exc.strerror}"
        ) from None
    return fd


#: What ``listen(allow=...)`` takes: a collection of uids, or a function of
#: the peer's credentials that returns ``True`` to let it in.
AllowPolicy = Collection[int] | Callable[[PeerCredentials], bool]


class _SameUser:
    """A policy that admits peers whose effective uid is ``uid``."""

    __slots__ = ("uid",)

    def __init__(self, uid: int) -> None:
        self.uid = uid

    def __call__(self, creds: PeerCredentials) -> bool:
        return creds.uid == self.uid

    def __repr__(self) -> str:
        return f"same_user(uid={self.uid})"


def same_user() -> Callable[[PeerCredentials], bool]:
    """Return a policy for ``listen(allow=...)`` that admits only this user.

    A peer gets in when its effective uid (at connect time) equals this
    process's effective uid when ``same_user()`` was called. Use it with an
    abstract socket name (no file permissions protect those) or with a socket
    file in a directory that other users can reach. It never raises.
    """
    return _SameUser(os.geteuid())


class _UidSet:
    __slots__ = ("uids",)

    def __init__(self, uids: frozenset[int]) -> None:
        self.uids = uids

    def __call__(self, creds: PeerCredentials) -> bool:
        return creds.uid in self.uids

    def __repr__(self) -> str:
        return f"uids {sorted(self.uids)}"


def make_policy(
    allow: AllowPolicy | None,
) -> Callable[[PeerCredentials], bool] | None:
    """Turn what ``listen(allow=...)`` got into a predicate, checking it now."""
    if allow is None:
        return None
    if callable(allow):
        # An object whose __call__ is async is one too, also inside a
        # functools.partial (inspect sees through partials of functions only).
        target: object = allow
        while isinstance(target, functools.partial):
            target = target.func
        call = getattr(type(target), "__call__", None)  # noqa: B004
        if inspect.iscoroutinefunction(allow) or inspect.iscoroutinefunction(call):
            raise TypeError(
                f"allow={allow!r} is an async function: its result (a coroutine) "
                "would admit everyone. Pass a plain function PeerCredentials -> "
                "bool (the credentials are all there when it is called), or a "
                "collection of uids"
            )
        return allow
    if isinstance(allow, str | bytes) or not isinstance(allow, Collection):
        raise TypeError(
            "allow must be a collection of uids (ints) or a function "
            f"PeerCredentials -> bool, not {type(allow).__name__}"
        )
    uids = frozenset(allow)
    for uid in uids:
        if isinstance(uid, bool) or not isinstance(uid, int):
            raise TypeError(
                f"allow holds {uid!r}: uids are ints (os.getuid(), "
                "pwd.getpwnam(name).pw_uid)"
            )
    return _UidSet(uids)


def check_peer(sock: socket.socket, policy: Callable[[PeerCredentials], bool]) -> bool:
    """Return whether ``policy`` admits the peer of a freshly accepted ``sock``.

    Nothing is read from the socket. Only ``True`` admits: a policy that
    raises, or returns anything but a ``bool`` (a coroutine, ``None``),
    refuses the peer and the error is logged: a bug in a policy must not let
    anyone in.
    """
    try:
        creds = peer_credentials_of(sock)
    except OSError as exc:  # pragma: no cover - works on every accepted socket
        logger.warning("refused a connection: cannot read its credentials: %s", exc)
        return False
    try:
        admitted = policy(creds)
    except Exception:
        logger.exception(
            "the listener's allow policy %r raised for %s; the peer was refused",
            policy,
            creds,
        )
        return False
    if not isinstance(admitted, bool):
        if inspect.iscoroutine(admitted):
            admitted.close()  # never awaited, and no warning about it
        logger.error(
            "the listener's allow policy %r returned %r for %s, not True or "
            "False; the peer was refused. A policy is a plain function that "
            "returns a bool",
            policy,
            admitted,
            creds,
        )
        return False
    if not admitted:
        logger.warning(
            "refused a connection from pid %d (uid %d, gid %d): not allowed by "
            "the listener's policy %r; it was closed before anything was read",
            creds.pid,
            creds.uid,
            creds.gid,
            policy,
        )
    return admitted
