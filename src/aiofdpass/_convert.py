"""Turning what callers pass as descriptors into numbers, and closing them."""

from __future__ import annotations

import errno
import io
import logging
import os
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

import anyio
from anyio import TypedAttributeProvider
from anyio.abc import AsyncResource, SocketAttribute

from ._fd import FD_MAX, Fd
from ._message import Message

__all__ = ["as_fd_list", "close_forwarded", "close_sent", "fileno_of", "filenos_of"]

logger = logging.getLogger("aiofdpass")


@runtime_checkable
class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def _closed(what: str) -> OSError:
    return OSError(errno.EBADF, f"cannot send {what}: it is closed")


def fileno_of(obj: object) -> int:
    """Return the descriptor number of ``obj`` without taking ownership.

    :raises TypeError: if ``obj`` is not a descriptor.
    :raises ValueError: for a number that is not a descriptor's (negative,
        or over ``2**31 - 1``).
    :raises OSError: ``EBADF`` if ``obj`` is closed.
    """
    if isinstance(obj, bool):
        raise TypeError("a bool is not a descriptor")
    if isinstance(obj, int):
        if not 0 <= obj <= FD_MAX:
            raise ValueError(
                f"descriptor numbers are between 0 and {FD_MAX}, got {obj}; "
                "nothing was sent"
            )
        return obj
    if isinstance(obj, Fd):
        if obj.closed:
            raise _closed(repr(obj))
        return obj.fileno()
    if isinstance(obj, io.IOBase) and obj.closed:
        raise _closed(f"file {obj!r}")
    if isinstance(obj, _HasFileno):
        fd = obj.fileno()
        if isinstance(fd, bool) or not isinstance(fd, int):
            raise TypeError(f"{type(obj).__name__}.fileno() returned {fd!r}")
        if fd < 0:  # a closed socket.socket says -1
            raise _closed(repr(obj))
        if fd > FD_MAX:
            raise ValueError(f"{type(obj).__name__}.fileno() returned {fd}")
        return fd
    if isinstance(obj, TypedAttributeProvider):
        raw = obj.extra(SocketAttribute.raw_socket, None)
        if raw is not None:
            return fileno_of(raw)
    raise TypeError(
        f"cannot send {type(obj).__name__} as a descriptor: pass an int, an "
        "object with fileno() (file, socket, Fd) or an anyio socket stream"
    )


_ONLY_INT = {int}


def filenos_of(objs: Iterable[object]) -> list[int]:
    """Return the descriptor numbers of ``objs``, checking every one first."""
    if (
        type(objs) is list
        and len(objs) > 2
        and set(map(type, objs)) == _ONLY_INT
        and min(objs) >= 0
        and max(objs) <= FD_MAX
    ):
        return objs.copy()  # all plain numbers in range: checked in C
    # Plain numbers (the common case, and many per record) skip the checks.
    return [
        obj if type(obj) is int and 0 <= obj <= FD_MAX else fileno_of(obj)
        for obj in objs
    ]


def as_fd_list(fds: object) -> list[Any]:
    """Return ``fds`` (an iterable of descriptors) as a list.

    :raises TypeError: for a single descriptor (a number, or an object with
        ``fileno()``: a file would otherwise be iterated line by line),
        bytes-like data or a string (its bytes would be taken for descriptor
        numbers), or anything not iterable, saying to pass a list.
    """
    if isinstance(fds, int | _HasFileno | TypedAttributeProvider):
        raise TypeError(
            f"fds takes a list of descriptors, not one {type(fds).__name__}: "
            f"pass [{fds!r}]"
        )
    if isinstance(fds, str | bytes | bytearray | memoryview):
        raise TypeError(
            f"fds takes a list of descriptors, not {type(fds).__name__} "
            f"{fds!r:.40}: data goes in the first argument, as one bytes object"
        )
    if not isinstance(fds, Iterable):
        raise TypeError(
            "fds takes a list of descriptors (ints, files, sockets, Fd), not "
            f"{type(fds).__name__}"
        )
    return list(fds)


async def close_sent(objs: Iterable[Any]) -> None:
    """Close the caller's copies after a successful send (``close_fds=True``).

    The record was delivered (or committed), so this never raises: that
    would tell the caller the send failed and invite a second hand-off. A
    number given twice is closed once; a close that fails is logged.
    """
    seen: set[int] = set()
    for obj in objs:
        try:
            if isinstance(obj, int):
                if obj in seen:
                    continue
                seen.add(obj)
                os.close(obj)
            elif hasattr(obj, "close"):
                obj.close()
            elif isinstance(obj, AsyncResource):
                with anyio.CancelScope(shield=True):
                    await obj.aclose()
        except Exception:
            logger.warning(
                "close_fds: closing %r failed after the send; the record "
                "was sent all the same",
                obj,
                exc_info=True,
            )


def close_forwarded(message: Message) -> None:
    """Close a forwarded message's descriptors (``close_fds=True``); never raises.

    As :func:`close_sent`, for a :class:`Message` passed as ``data``: one
    ``close_range`` where its numbers are a contiguous run.
    """
    try:
        message.close()
    except Exception:
        logger.warning(
            "close_fds: closing the descriptors of %r failed after the send; "
            "the record was sent all the same",
            message,
            exc_info=True,
        )
