"""The outbox: small records queued for writing, coalesced into few ``sendmsg`` calls.

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
import socket
from collections import deque

from ._message import SCM_MAX_FD
from ._transport import scm_rights

__all__ = ["Outbox"]

#: A segment stops growing past this many bytes (bounds one sendmsg).
SEGMENT_BYTES = 256 * 1024

_SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)


class _Segment:
    __slots__ = ("buf", "fds", "fds_sent", "pos")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fds: list[int] = []
        self.fds_sent = False
        self.pos = 0


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

    def add(self, header: bytes, payload: memoryview | bytes, fds: list[int]) -> None:
        """Queue one record; the outbox now owns the descriptor numbers ``fds``."""
        segments = self._segments
        seg = segments[-1] if segments else None
        if (
            seg is None
            or len(seg.buf) >= SEGMENT_BYTES
            or (fds and (seg.fds_sent or len(seg.fds) + len(fds) > SCM_MAX_FD))
        ):
            seg = _Segment()
            segments.append(seg)
        seg.buf += header
        seg.buf += payload
        if fds:
            seg.fds += fds
            self.nfds += len(fds)
        self.nbytes += len(header) + len(payload)

    def add_tail(self, rest: bytes) -> None:
        """Queue the unwritten rest of a record whose descriptors already went.

        It gets a segment of its own that no descriptor may join: the peer
        already holds the record's descriptors, and a later record's must
        not ride on these bytes (the peer could then hold more than 253
        unclaimed ones).
        """
        seg = _Segment()
        seg.buf += rest
        seg.fds_sent = True
        self._segments.append(seg)
        self.nbytes += len(rest)

    def write_some(self, sock: socket.socket) -> bool:
        """Write as much as the socket takes now; return ``True`` once empty.

        :raises OSError: anything but ``EAGAIN``; the caller breaks the
            connection (the outbox is left as it was before the failed call).
        """
        segments = self._segments
        while segments:
            seg = segments[0]
            ancdata = scm_rights(seg.fds) if not seg.fds_sent else []
            try:
                with memoryview(seg.buf) as view:
                    sent = sock.sendmsg([view[seg.pos :]], ancdata, _SEND_FLAGS)
            except BlockingIOError:
                return False
            if ancdata:
                seg.fds_sent = True
                fds, seg.fds = seg.fds, []
                self.nfds -= len(fds)
                for fd in fds:
                    os.close(fd)
            seg.pos += sent
            self.nbytes -= sent
            if seg.pos < len(seg.buf):
                return False
            segments.popleft()
        return True

    def discard(self) -> None:
        """Drop everything queued and close the descriptors it owned."""
        while self._segments:
            for fd in self._segments.popleft().fds:
                os.close(fd)
        self.nbytes = self.nfds = 0

    def __del__(self) -> None:
        # A channel dropped without aclose() (or an event loop that ended
        # with records queued): the socket warns; the duplicates must not
        # stay open for the life of the process.
        self.discard()
