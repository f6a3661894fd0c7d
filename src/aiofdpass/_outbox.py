"""The outbox: encoded records waiting to be written, as few ``sendmsg`` calls' worth.

Sans-I/O, like the decoder: :meth:`Outbox.peek` says what to write next and
which descriptors go with it, :meth:`Outbox.advance` records what a
``sendmsg`` took. It never touches a socket.

Records are packed into segments. A segment is one byte buffer plus the
descriptors of its records (at most 253, ``SCM_MAX_FD``), and its
descriptors ride on the first ``sendmsg`` that writes any of its bytes, so
they always reach the peer no later than their records' first byte, and a
receiver never holds more than 253 unclaimed ones (see docs/protocol.md).
After a partial write the rest of a segment goes without a control message.

The outbox owns the descriptors it holds (the sender's duplicates) and
closes each one as soon as the ``sendmsg`` carrying it succeeded: the kernel
holds its own reference from then on.
"""

from __future__ import annotations

import os
from collections import deque

from ._message import SCM_MAX_FD

__all__ = ["Outbox", "PacketOutbox"]

#: A segment stops growing past this many bytes (bounds one sendmsg).
SEGMENT_BYTES = 256 * 1024

_NO_FDS: list[int] = []


class _Segment:
    __slots__ = ("buf", "ends", "fds", "fds_sent", "pos")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fds: list[int] = []
        self.fds_sent = False
        self.pos = 0
        # Where each of its records ends (to count what is left unwritten).
        self.ends: list[int] = []


class Outbox:
    """A FIFO of encoded records and the descriptors that go with them."""

    __slots__ = ("_segments", "nbytes", "nfds")

    def __init__(self) -> None:
        self._segments: deque[_Segment] = deque()
        #: Bytes queued and not yet written.
        self.nbytes = 0
        #: Descriptors queued (our duplicates) and not yet sent.
        self.nfds = 0

    def __bool__(self) -> bool:
        return bool(self._segments)

    @property
    def nrecords(self) -> int:
        """Records not yet written completely (a partly written one counts)."""
        return sum(
            sum(1 for end in seg.ends if end > seg.pos) for seg in self._segments
        )

    def add(self, header: bytes, payload: memoryview | bytes, fds: list[int]) -> None:
        """Queue one record; the outbox now owns the descriptor numbers ``fds``."""
        segments = self._segments
        seg = segments[-1] if segments else None
        nfds = len(fds)
        if (
            seg is None
            or seg.ends[-1] >= SEGMENT_BYTES
            or (nfds and (seg.fds_sent or len(seg.fds) + nfds > SCM_MAX_FD))
        ):
            seg = _Segment()
            segments.append(seg)
        buf = seg.buf
        buf += header
        buf += payload
        end = len(buf)
        self.nbytes += end - (seg.ends[-1] if seg.ends else 0)
        seg.ends.append(end)
        if nfds:
            seg.fds += fds
            self.nfds += nfds

    def add_tail(self, rest: bytes) -> None:
        """Queue the unwritten rest of a record whose descriptors already went.

        It gets a segment of its own that no descriptor may join: the peer
        already holds the record's descriptors, and a later record's must
        not ride on these bytes (the peer could then hold more than 253
        unclaimed ones).
        """
        seg = _Segment()
        seg.buf += rest
        seg.ends.append(len(rest))
        seg.fds_sent = True
        self._segments.append(seg)
        self.nbytes += len(rest)

    def peek(self) -> tuple[bytearray, int, list[int]]:
        """Return what to write next: a buffer, where in it to start, the fds.

        The descriptors (possibly none) must go with the bytes of the next
        ``sendmsg``; call :meth:`advance` with what it wrote. Release any
        view of the buffer before queueing more records.
        """
        seg = self._segments[0]
        return seg.buf, seg.pos, _NO_FDS if seg.fds_sent else seg.fds

    def advance(self, sent: int) -> bool:
        """Record that a ``sendmsg`` of :meth:`peek`'s bytes and fds wrote ``sent``.

        Closes the descriptors it carried (the kernel holds them now).
        Returns ``True`` if the head segment was written completely.
        """
        seg = self._segments[0]
        if not seg.fds_sent:
            seg.fds_sent = True
            fds, seg.fds = seg.fds, _NO_FDS
            self.nfds -= len(fds)
            for fd in fds:
                os.close(fd)
        seg.pos += sent
        self.nbytes -= sent
        if seg.pos < len(seg.buf):
            return False
        self._segments.popleft()
        return True

    def discard(self) -> int:
        """Drop everything queued, close the descriptors it owned.

        Returns how many records were dropped (a partly written one counts).
        """
        dropped = self.nrecords
        while self._segments:
            for fd in self._segments.popleft().fds:
                os.close(fd)
        self.nbytes = self.nfds = 0
        return dropped

    def __del__(self) -> None:
        # Never the only safety net (the channel logs and discards), but the
        # duplicates must not stay open for the life of the process.
        self.discard()


class PacketOutbox:
    """The outbox of a packet socket: one ``sendmsg`` per record, never merged.

    The same interface as :class:`Outbox`. On ``SOCK_SEQPACKET`` a
    ``sendmsg`` is one packet, so merging records would merge packets; and
    the kernel takes a packet whole or not at all (``EAGAIN``), so there is
    no partial write to resume. :attr:`nbytes` counts each packet's bytes
    plus one, so that a queued empty packet counts as something queued.
    """

    __slots__ = ("_packets", "nbytes", "nfds")

    def __init__(self) -> None:
        self._packets: deque[tuple[bytes, list[int]]] = deque()
        #: Bytes queued (plus one per packet) and not yet written.
        self.nbytes = 0
        #: Descriptors queued (our duplicates) and not yet sent.
        self.nfds = 0

    def __bool__(self) -> bool:
        return bool(self._packets)

    @property
    def nrecords(self) -> int:
        """Packets not yet written."""
        return len(self._packets)

    def add(self, header: bytes, payload: memoryview | bytes, fds: list[int]) -> None:
        """Queue one packet; the outbox now owns the descriptor numbers ``fds``."""
        data = header + payload if header else bytes(payload)
        self._packets.append((data, fds))
        self.nbytes += len(data) + 1
        self.nfds += len(fds)

    def add_tail(self, rest: bytes) -> None:  # pragma: no cover - never called
        """Packets are never written in part: there is no tail to queue."""
        raise AssertionError("a packet is written whole or not at all")

    def peek(self) -> tuple[bytes, int, list[int]]:
        """Return the next packet, 0, and its descriptors (see :meth:`Outbox.peek`)."""
        data, fds = self._packets[0]
        return data, 0, fds

    def advance(self, sent: int) -> bool:
        """Record that the next packet was sent; close its descriptors."""
        data, fds = self._packets.popleft()
        self.nbytes -= len(data) + 1
        self.nfds -= len(fds)
        for fd in fds:
            os.close(fd)
        return True

    def discard(self) -> int:
        """Drop every queued packet, close its descriptors; return how many."""
        dropped = len(self._packets)
        while self._packets:
            for fd in self._packets.popleft()[1]:
                os.close(fd)
        self.nbytes = self.nfds = 0
        return dropped

    def __del__(self) -> None:
        self.discard()
