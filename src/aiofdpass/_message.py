"""`Message` (a record of bytes plus descriptors) and `Limits`."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from ._fd import Fd

if TYPE_CHECKING:
    from typing_extensions import Buffer

__all__ = ["SCM_MAX_FD", "Limits", "Message"]

#: The most descriptors Linux accepts in one ``sendmsg`` (``SCM_MAX_FD``);
#: one more gives ``EINVAL``.
SCM_MAX_FD = 253

_MAX_PAYLOAD_WIRE = 2**32 - 1


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-record limits, checked on send and on receive.

    A record over a limit is refused on send with :class:`LimitError` before
    anything is written, and on receive with :class:`ProtocolError` as soon
    as its header arrives: the buffer never grows for it (at most the one
    read that brought the header, 64 KiB, is held).

    :param max_payload: the largest payload in bytes (default 16 MiB, at
        most 2**32 - 1, the largest length the header can carry).
    :param max_fds: the most descriptors in one record (default and maximum
        253: Linux's ``SCM_MAX_FD``, the most one ``sendmsg`` can carry).
    :raises TypeError: if a limit is not an ``int``.
    :raises ValueError: if a limit is out of its range.
    """

    max_payload: int = 16 * 1024 * 1024
    max_fds: int = SCM_MAX_FD

    def __post_init__(self) -> None:
        for name, value, top in (
            ("max_payload", self.max_payload, _MAX_PAYLOAD_WIRE),
            ("max_fds", self.max_fds, SCM_MAX_FD),
        ):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Limits.{name} must be an int, not {value!r}")
            if not 0 <= value <= top:
                raise ValueError(
                    f"Limits.{name} must be between 0 and {top}, got {value}"
                )


class Message:
    """One record: a payload of bytes and the descriptors that came with it.

    A received message owns its descriptors as :class:`Fd` objects. Take the
    ones you keep (``fd.take()``, ``fd.to_file()``, ``fd.to_socket()``) and
    close the message, or use it as a context manager, to close the rest.

    :param data: the payload; any bytes-like object (it is copied).
    :param fds: the descriptors; the message owns them.
    :raises TypeError: if an item of ``fds`` is not an :class:`Fd` (plain
        numbers go to :meth:`FdChannel.send` instead).
    """

    __slots__ = ("_data", "_fds")

    _data: bytes
    _fds: tuple[Fd, ...]

    def __init__(self, data: Buffer = b"", fds: Iterable[Fd] = ()) -> None:
        fds = tuple(fds)
        for fd in fds:
            if not isinstance(fd, Fd):
                raise TypeError(
                    f"Message fds must be Fd objects, not {type(fd).__name__}; "
                    "pass plain descriptors to FdChannel.send(data, fds) instead"
                )
        self._data = bytes(data)
        self._fds = fds

    @property
    def data(self) -> bytes:
        """The payload."""
        return self._data

    @property
    def fds(self) -> tuple[Fd, ...]:
        """The descriptors, in the order they were sent."""
        return self._fds

    def close(self) -> None:
        """Close every descriptor not yet taken or closed.

        :raises OSError: if closing one fails (see :meth:`Fd.close`).
        """
        fds = self._fds
        if len(fds) > 2:
            numbers = sorted(fd._fd for fd in fds)
            low = numbers[0]
            if low >= 0 and numbers[-1] - low == len(numbers) - 1:
                # One contiguous run (the kernel hands out the lowest free
                # numbers, so received ones usually are): one syscall.
                for fd in fds:
                    fd._fd = -1
                os.closerange(low, low + len(numbers))
                return
        for fd in fds:
            fd.close()

    def __enter__(self) -> Message:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self._data == other._data and self._fds == other._fds

    def __hash__(self) -> int:
        return hash((self._data, self._fds))

    def __repr__(self) -> str:
        data = self._data if len(self._data) <= 32 else self._data[:32] + b"..."
        return f"Message(data={data!r} ({len(self._data)} bytes), fds={self._fds!r})"

    @classmethod
    def _unchecked(cls, data: bytes, fds: tuple[Fd, ...]) -> Message:
        # Fast constructor for the decoder, which already has bytes and Fds.
        msg = cls.__new__(cls)
        msg._data = data
        msg._fds = fds
        return msg
