"""What `FdStream` received and has not returned yet, with no socket in sight.

The rule that says which descriptors go with which bytes lives here, and only
here. On a stream socket the descriptors of one ``sendmsg`` arrive with the
``recvmsg`` that returns the first byte of that ``sendmsg``, however its bytes
are split across reads; that read may also return plain bytes sent before
them (the kernel glues them in front), and it never returns the descriptors
of two ``sendmsg`` calls. The kernel does not say which byte of the read
they rode on. So each received descriptor is marked with the stream offset
of the first byte of the read that brought it: its ``sendmsg`` began there or
later within that read.

Rule: a call that returns bytes together with descriptors returns every
queued descriptor marked no later than the last byte it returns (for
``receive_until``, the last byte of the delimiter). A descriptor is therefore
returned by the first call that returns any byte of its ``sendmsg``, never
later; earlier only when the read that brought it also brought bytes this
call returns, i.e. when the kernel glued them. A read never asks the kernel
for more than the call needs when the call knows how much that is
(``receive_exactly``), so there the attribution is exact, except for bytes
an earlier call read ahead (``receive_until``, or a cancelled or incomplete
read for more): they come with the marks of the reads that brought them.
"""

from __future__ import annotations

from collections import deque

from ._fd import Fd

__all__ = ["Inbox"]

# A buffer grown past this for a large read is dropped once it is empty.
_KEEP = 64 * 1024


class Inbox:
    """Received bytes not returned yet, and the queue of received descriptors.

    Read into :meth:`get_buffer`, then :meth:`commit` the count and the
    descriptor numbers that came with it (the inbox owns them from then on).
    """

    __slots__ = ("_buf", "_end", "_fds", "_offset", "_start", "eof")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._start = 0  # first byte not returned yet
        self._end = 0  # one past the last byte received
        # Stream offset of _buf[_start]: how many bytes were returned so far.
        self._offset = 0
        # (offset of the first byte of the read that brought it, descriptor)
        self._fds: deque[tuple[int, Fd]] = deque()
        #: ``True`` once a read found end of stream.
        self.eof = False

    @property
    def pending(self) -> int:
        """How many received bytes wait to be returned."""
        return self._end - self._start

    @property
    def queued_fds(self) -> int:
        """How many received descriptors wait in the queue."""
        return len(self._fds)

    def get_buffer(self, size: int) -> memoryview:
        """Return room for exactly ``size`` bytes after the pending ones.

        Release the view before calling anything else of the inbox.
        """
        if len(self._buf) - self._end < size:
            pending = self._end - self._start
            if self._start:
                self._buf[:pending] = self._buf[self._start : self._end]
                self._start, self._end = 0, pending
            missing = size - (len(self._buf) - self._end)
            if missing > 0:
                self._buf.extend(bytes(missing))
        return memoryview(self._buf)[self._end : self._end + size]

    def commit(self, nbytes: int, numbers: list[int]) -> None:
        """Record that ``nbytes`` were read into :meth:`get_buffer`'s room.

        ``numbers`` are the descriptors that came with them; the inbox owns
        them now (there is nothing here that can fail before they are
        wrapped).
        """
        if numbers:
            mark = self._offset + self._end - self._start
            self._fds.extend((mark, Fd._adopt(n)) for n in numbers)
        self._end += nbytes

    def find(self, delimiter: bytes, start: int, stop: int) -> int:
        """Index of ``delimiter`` within pending bytes ``[start, stop)``, or -1."""
        base = self._start
        index = self._buf.find(delimiter, base + start, min(base + stop, self._end))
        return index - base if index >= 0 else -1

    def take(self, nbytes: int) -> bytes:
        """Return the next ``nbytes`` pending bytes; the descriptors stay queued."""
        start = self._start
        with memoryview(self._buf) as view:
            data = bytes(view[start : start + nbytes])
        self._skip(nbytes)
        return data

    def take_with_fds(self, nbytes: int, then_skip: int = 0) -> tuple[bytes, list[Fd]]:
        """Return the next ``nbytes`` and the descriptors that go with them.

        ``then_skip`` more bytes (a delimiter) are consumed too, and their
        descriptors returned with these.
        """
        data = self.take(nbytes)
        self._skip(then_skip)
        end = self._offset
        queue = self._fds
        fds = []
        while queue and queue[0][0] < end:
            fds.append(queue.popleft()[1])
        return data, fds

    def take_fds(self, n: int | None) -> list[Fd]:
        """Take the oldest ``n`` queued descriptors (all for ``None``)."""
        queue = self._fds
        count = len(queue) if n is None else min(n, len(queue))
        return [queue.popleft()[1] for _ in range(count)]

    def close(self) -> None:
        """Close every queued descriptor and drop the pending bytes.

        :raises OSError: if closing one failed (all are closed).
        """
        # Rebind, never resize: a receiver blocked in a read holds a view.
        self._buf = bytearray()
        self._start = self._end = 0
        fds, self._fds = self._fds, deque()
        error: OSError | None = None
        for _, fd in fds:
            try:
                fd.close()
            except OSError as exc:
                error = error or exc
        if error is not None:
            raise error

    def _skip(self, nbytes: int) -> None:
        self._start += nbytes
        self._offset += nbytes
        if self._start == self._end:
            self._start = self._end = 0
            if len(self._buf) > _KEEP:
                self._buf = bytearray()
