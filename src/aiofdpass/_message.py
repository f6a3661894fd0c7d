"""`Message` (a record of bytes plus descriptors) and `Limits`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from ._fd import Fd, close_numbers

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

    A received message owns its descriptors. Take the ones you keep from
    :attr:`fds` (``fd.take()``, ``fd.to_file()``, ``fd.to_socket()``) and
    close the message, or use it as a context manager, to close the rest. A
    message garbage collected with descriptors it never handed out closes
    them and emits :class:`ResourceWarning`.

    :param data: the payload; any bytes-like object (it is copied).
    :param fds: the descriptors; the message owns them.
    :raises TypeError: if ``data`` is not bytes-like (an ``int`` or a
        ``str`` included), or an item of ``fds`` is not an :class:`Fd`
        (plain numbers go to :meth:`FdChannel.send` instead).
    """

    # A received message keeps its descriptors as plain numbers (``_numbers``,
    # owned by the message) until ``fds`` is first read: for a record with
    # many descriptors, making an Fd object for each and finalising it again
    # cost more than everything else the receiver does. ``_numbers`` is None
    # once they are Fd objects in ``_fds`` (or were closed unwrapped).
    __slots__ = ("_data", "_fds", "_numbers")

    _data: bytes
    _fds: tuple[Fd, ...]
    _numbers: list[int] | None

    def __init__(self, data: Buffer = b"", fds: Iterable[Fd] = ()) -> None:
        self._numbers = None  # first, so __del__ finds it if validation fails
        fds = tuple(fds)
        for fd in fds:
            if not isinstance(fd, Fd):
                raise TypeError(
                    f"Message fds must be Fd objects, not {type(fd).__name__}; "
                    "pass plain descriptors to FdChannel.send(data, fds) instead"
                )
        if isinstance(data, int | str):
            # bytes(5) would be five zero bytes; bytes("x") needs an encoding.
            raise TypeError(
                f"Message data must be bytes-like, not {type(data).__name__} "
                f"{data!r:.40}: pass bytes (b'...', str.encode(), "
                "int.to_bytes())"
            )
        self._data = bytes(data)
        self._fds = fds

    @property
    def data(self) -> bytes:
        """The payload."""
        return self._data

    @property
    def fds(self) -> tuple[Fd, ...]:
        """The descriptors, in the order they were sent.

        The message keeps owning them: what is not taken from here is closed
        by :meth:`close`. After :meth:`close` they are all closed ``Fd``
        objects.
        """
        numbers = self._numbers
        if numbers is not None:
            # Forget the numbers before wrapping them: should wrapping fail
            # half-way, a descriptor is leaked rather than closed twice.
            self._numbers = None
            self._fds = tuple(map(Fd._adopt, numbers))
        return self._fds

    @property
    def nfds(self) -> int:
        """How many descriptors came with the message: ``len(msg.fds)``.

        Unlike :attr:`fds` it makes no :class:`Fd` objects, so a receiver
        that only counts and closes (or forwards) descriptors pays for none.
        """
        numbers = self._numbers
        return len(self._fds) if numbers is None else len(numbers)

    def close(self) -> None:
        """Close every descriptor not yet taken or closed.

        Each is closed once, and all of them are, even if closing one fails;
        a contiguous run of numbers is closed with one ``close_range``.

        :raises OSError: the first failure to close one (see
            :meth:`Fd.close`).
        """
        numbers = self._numbers
        if numbers is not None:
            self._numbers = None
            self._fds = (_CLOSED,) * len(numbers)
            if len(numbers) == 1:
                os.close(numbers[0])  # the common case, without a call
            else:
                close_numbers(numbers)
            return
        fds = self._fds
        if len(fds) == 1:
            fds[0].close()
            return
        # Every Fd forgets its number first (one listed twice is closed once).
        numbers = []
        for fd in fds:
            number = fd._fd
            if number >= 0:
                fd._fd = -1
                numbers.append(number)
        close_numbers(numbers)

    def __enter__(self) -> Message:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        numbers = self._numbers
        if numbers:
            self._numbers = None
            try:
                close_numbers(numbers)
            finally:
                warnings.warn(
                    f"unclosed Message with {len(numbers)} descriptor(s) "
                    f"{numbers}: close received messages, or use `with`",
                    ResourceWarning,
                    stacklevel=1,
                    source=self,
                )

    def __copy__(self) -> Message:
        # A copy shares the Fd objects (each closes its descriptor once);
        # two messages owning the same plain numbers would close them twice.
        return Message._shared(self._data, self.fds)

    def __deepcopy__(self, memo: object) -> Message:
        # Descriptors are not copied (that takes os.dup): shared, as above.
        return Message._shared(self._data, self.fds)

    @classmethod
    def _shared(cls, data: bytes, fds: tuple[Fd, ...]) -> Message:
        msg = cls.__new__(cls)
        msg._data = data
        msg._fds = fds
        msg._numbers = None
        return msg

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return self._data == other._data and self.fds == other.fds

    def __hash__(self) -> int:
        return hash((self._data, self.fds))

    def __repr__(self) -> str:
        data = self._data if len(self._data) <= 32 else self._data[:32] + b"..."
        return f"Message(data={data!r} ({len(self._data)} bytes), fds={self.fds!r})"

    @classmethod
    def _unchecked(cls, data: bytes, numbers: list[int] | None) -> Message:
        # Fast constructor for the decoder, which has checked the record: the
        # message owns ``numbers`` (None: no descriptors), still plain ints.
        msg = cls.__new__(cls)
        msg._data = data
        msg._fds = ()
        msg._numbers = numbers
        return msg


#: What ``fds`` holds for a descriptor closed before it was wrapped: one
#: closed ``Fd``, shared (a closed Fd has nothing left to tell apart).
_CLOSED = Fd._adopt(-1)
