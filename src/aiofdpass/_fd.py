"""`Fd`: an owned descriptor that closes exactly once; closing owned numbers."""

from __future__ import annotations

import os
import socket
import warnings
from types import TracebackType
from typing import IO, Any

__all__ = ["FD_MAX", "Fd", "close_numbers"]

#: The largest descriptor number: descriptors are C ints.
FD_MAX = 2**31 - 1


def close_numbers(numbers: list[int]) -> None:
    """Close every descriptor in ``numbers``, which the caller owns.

    Exactly these numbers are closed, each once: with one ``close_range``
    when they are a contiguous run with no number twice (the kernel installs
    a ``recvmsg``'s descriptors at the lowest free numbers, in order, so a
    received record's usually are), otherwise one by one. Every one is
    closed even if some fail; then the first failure is raised.

    :raises OSError: if closing one failed (``EBADF`` when something else
        closed the number behind the owner's back).
    """
    n = len(numbers)
    if n > 2:
        low = numbers[0]
        run = numbers
        if numbers[-1] - low != n - 1:
            run = sorted(numbers)
            low = run[0]
        # Equal to the list low, low+1, ...: contiguous, each number once.
        if low >= 0 and run[-1] - low == n - 1 and run == list(range(low, low + n)):
            os.closerange(low, low + n)
            return
    error: OSError | None = None
    for fd in numbers:
        try:
            os.close(fd)
        except OSError as exc:
            if error is None:
                error = exc
    if error is not None:
        raise error


class Fd:
    """An open file descriptor that this object owns.

    Every descriptor that aiofdpass receives is handed over as an ``Fd``. It
    closes its descriptor exactly once: on :meth:`close`, at the end of a
    ``with`` block, or (with a :class:`ResourceWarning`) when it is garbage
    collected while still open. After :meth:`take` or :meth:`close` the
    object forgets the number, so a stale number can never reach a file that
    the process opened later under the same number.

    :param fd: a descriptor number; the new object owns it from now on.
    :raises TypeError: if ``fd`` is not an ``int``.
    :raises ValueError: if ``fd`` is negative or over ``2**31 - 1`` (not a
        descriptor number).
    """

    __slots__ = ("__weakref__", "_fd")

    def __init__(self, fd: int) -> None:
        self._fd = -1  # so __del__ finds it even if validation fails
        if isinstance(fd, bool) or not isinstance(fd, int):
            raise TypeError(f"Fd() takes a descriptor number, not {type(fd).__name__}")
        if not 0 <= fd <= FD_MAX:
            raise ValueError(f"a descriptor number is between 0 and {FD_MAX}, got {fd}")
        self._fd = fd

    @property
    def closed(self) -> bool:
        """``True`` once the descriptor was closed or taken."""
        return self._fd < 0

    def fileno(self) -> int:
        """Return the descriptor number; the object keeps owning it.

        :raises ValueError: if the descriptor was already closed or taken.
        """
        if self._fd < 0:
            raise ValueError(
                "I/O operation on a closed or taken Fd: after take() use the "
                "number it returned; after close() the descriptor is gone"
            )
        return self._fd

    def take(self) -> int:
        """Hand the descriptor number to the caller, who must close it.

        The object forgets the number and counts as closed afterwards.

        :raises ValueError: if the descriptor was already closed or taken.
        """
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        """Close the descriptor. Calling it again does nothing.

        :raises OSError: if ``close(2)`` fails (``EBADF`` when something
            else closed the number behind this object's back); the object
            counts as closed all the same.
        """
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def to_file(
        self,
        mode: str = "rb",
        buffering: int = -1,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> IO[Any]:
        """Wrap the descriptor in a file object that now owns it.

        The arguments are those of :func:`open`. If they are invalid the
        ``Fd`` still owns the descriptor, so nothing leaks.

        :raises ValueError: if the ``Fd`` is closed or an argument is invalid.
        """
        fd = self.fileno()
        # Try the arguments with closefd=False first: a failure then leaves
        # the descriptor open and owned by us. The second open cannot fail
        # for a reason the first did not.
        trial = open(  # noqa: SIM115
            fd, mode, buffering, encoding, errors, newline, closefd=False
        )
        trial.close()
        file = open(fd, mode, buffering, encoding, errors, newline)  # noqa: SIM115
        self._fd = -1
        return file

    def to_socket(self) -> socket.socket:
        """Wrap the descriptor in a :class:`socket.socket` that now owns it.

        The family, type and protocol are read from the descriptor.

        :raises OSError: ``ENOTSOCK`` if it is not a socket; the ``Fd`` then
            still owns the descriptor.
        :raises ValueError: if the ``Fd`` is closed.
        """
        sock = socket.socket(fileno=self.fileno())
        self._fd = -1
        return sock

    @classmethod
    def _adopt(cls, fd: int) -> Fd:
        # Fast constructor for descriptors the kernel just gave us.
        obj = cls.__new__(cls)
        obj._fd = fd
        return obj

    def __copy__(self) -> Fd:
        # An owned descriptor has one owner: a copy is the same object (two
        # objects would close the number twice). Duplicate with os.dup.
        return self

    def __deepcopy__(self, memo: object) -> Fd:
        return self

    def __enter__(self) -> Fd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        fd = self._fd
        if fd >= 0:
            self._fd = -1
            try:
                os.close(fd)
            finally:
                warnings.warn(
                    f"unclosed Fd({fd}): close received descriptors, or use "
                    "`with`, `Message.close()` or `Fd.take()`",
                    ResourceWarning,
                    stacklevel=1,
                    source=self,
                )

    def __repr__(self) -> str:
        return f"<Fd {self._fd}>" if self._fd >= 0 else "<Fd closed>"
