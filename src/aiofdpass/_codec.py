"""The record codec: framing rules, and nothing that touches a socket.

Wire format (see ``docs/protocol.md``): each record is a 12-byte header
followed by the payload. The header, all integers big-endian::

    offset 0  2 bytes  magic  b"FD"
    offset 2  1 byte   version (1)
    offset 3  1 byte   flags (0; anything else is a violation in version 1)
    offset 4  u16      number of descriptors in the record (0..253)
    offset 6  u16      reserved (0)
    offset 8  u32      payload length in bytes

Descriptors travel out of band, as ``SCM_RIGHTS`` ancillary data, and on a
stream socket the kernel hands them over with the read that returns the first
byte of the ``sendmsg`` they were attached to. The receiver therefore keeps
them in a FIFO, and each complete record takes the first ``nfds`` of them.

Rule 1: a record's descriptors may arrive before the record's bytes (a
sender that coalesces records attaches all their descriptors to the first
``sendmsg``), never after the record's last byte. Fewer descriptors than the
header announced once the record is complete is a violation.

Rule 2: a conforming sender never has more than 253 descriptors in flight
ahead of the records that claim them (one ``sendmsg`` carries at most 253),
so more unclaimed descriptors than that is a violation (it also bounds what a
hostile peer can make us hold).

Rule 3: end of stream is clean only at a record boundary with no unclaimed
descriptors.

On any violation the decoder closes every descriptor it holds, raises
:class:`ProtocolError`, and refuses further input.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import NoReturn

from ._errors import ProtocolError
from ._fd import close_numbers
from ._message import SCM_MAX_FD, Limits, Message

__all__ = ["HEADER_SIZE", "MAGIC", "VERSION", "RecordDecoder", "encode_header"]

MAGIC = b"FD"
VERSION = 1
_HEADER = struct.Struct("!2sBBHHI")
# The same 12 bytes read as (magic+version+flags, nfds, reserved, length).
_FAST = struct.Struct("!4sHHI")
_LEAD = b"FD\x01\x00"
HEADER_SIZE = _HEADER.size  # 12

# Said by every error that means "this peer speaks another protocol".
_FOREIGN = (
    " If the peer speaks a protocol of its own, talk to it with FdStream "
    "(connect_stream(), listen_stream(), FdStream.from_socket()), not FdChannel"
)

_new_message = Message.__new__

#: How much a single read may bring in at least, when no record needs more.
READ_SIZE = 64 * 1024


#: ``pack_header(MAGIC, VERSION, flags, nfds, reserved, payload_length)``: the
#: bound ``struct`` method, for the send path (one call less per record).
pack_header = _HEADER.pack


def encode_header(payload_length: int, nfds: int) -> bytes:
    """Return the header for a record of ``payload_length`` bytes and ``nfds`` fds.

    The caller has already checked both against the limits.
    """
    return _HEADER.pack(MAGIC, VERSION, 0, nfds, 0, payload_length)


class RecordDecoder:
    """Turn bytes and descriptors, in arrival order, into `Message` objects.

    Use :meth:`get_buffer` and :meth:`commit` to read straight into the
    decoder's buffer (or :meth:`feed` to copy bytes in), then call
    :meth:`next_message` until it returns ``None``; call :meth:`end_of_stream`
    when the peer closed. Descriptors are plain numbers; the decoder owns
    every one given to it until a message carrying it is returned.
    """

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._buf = bytearray(READ_SIZE)
        self._start = 0  # first byte not yet decoded
        self._end = 0  # one past the last byte received
        # Unclaimed descriptor numbers, in arrival order (a list: records
        # take them in slices).
        self._fds: list[int] = []
        # (payload_length, nfds) of the record at _start, once its header is
        # in and valid.
        self._header: tuple[int, int] | None = None
        self._failed: ProtocolError | None = None
        self._small_reads = 0
        self._max_payload = limits.max_payload
        self._max_fds = limits.max_fds

    # -- input ------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Return free space to read into; pass the count read to :meth:`commit`.

        The space grows with the record being received, never with what its
        header announces: at most as much again as the record has brought
        so far (at least a 64 KiB read), so a large payload is read in few
        calls, and a peer that sends a header and stalls makes this side
        commit no memory for the payload it announced. A header over the
        limits is refused before any of that.

        :raises ProtocolError: if the memory for a record cannot be had
            (``MemoryError``); the decoder has then closed its descriptors.
        """
        if self._failed is not None:
            self._check_usable()
        wanted = READ_SIZE
        if self._header is not None:
            # The rest of this record, but no more than arrived of it so
            # far: doubling, so copies stay linear in the record's size.
            pending = self._end - self._start
            rest = HEADER_SIZE + self._header[0] - pending
            wanted = max(wanted, rest if rest < pending else pending)
        elif self._start == self._end:
            # Everything read was decoded: the next read starts at the front.
            self._start = self._end = 0
        size = len(self._buf)
        if size - self._end < wanted or size > 4 * READ_SIZE:
            self._reserve(wanted)
        return memoryview(self._buf)[self._end :]

    def commit(self, nbytes: int, fds: Iterable[int] = ()) -> None:
        """Record that ``nbytes`` were read into :meth:`get_buffer`'s space.

        ``fds`` are the descriptors that arrived with those bytes; the
        decoder owns them from now on (and closes them if it is unusable).
        """
        self._fds.extend(fds)
        if self._failed is not None:
            self.close()
            self._check_usable()
        if not 0 <= nbytes <= len(self._buf) - self._end:
            self.close()
            raise ValueError(f"commit({nbytes}) is more than get_buffer() offered")
        self._end += nbytes

    def feed(
        self, data: bytes | bytearray | memoryview, fds: Iterable[int] = ()
    ) -> None:
        """Copy ``data`` in, with the descriptors that arrived with it."""
        fds = list(fds)
        if self._failed is not None:
            self.commit(0, fds)  # closes them and raises
        self._reserve(len(data))
        self._buf[self._end : self._end + len(data)] = data
        self.commit(len(data), fds)

    # -- output -----------------------------------------------------------

    def next_message(self) -> Message | None:
        """Return the next complete record, or ``None`` if more input is needed.

        :raises ProtocolError: if the peer broke the framing, or the copy of
            a complete record does not fit in memory (``MemoryError``); the
            decoder has then closed every descriptor it held.
        """
        if self._failed is not None:
            self._check_usable()
        start = self._start
        header = self._header
        if header is None:
            if self._end - start < HEADER_SIZE:
                if self._end > start and not _LEAD.startswith(
                    self._buf[start : min(self._end, start + len(_LEAD))]
                ):
                    self._check_lead()  # raises: no valid header begins so
                if len(self._fds) > SCM_MAX_FD:
                    self._check_unclaimed()
                return None
            # Fast path: one compare covers magic, version and flags.
            lead, nfds, reserved, payload_length = _FAST.unpack_from(self._buf, start)
            if (
                lead != _LEAD
                or reserved
                or payload_length > self._max_payload
                or nfds > self._max_fds
            ):
                self._parse_header()  # raises with the precise reason
        else:
            payload_length, nfds = header
        body = start + HEADER_SIZE
        if self._end - body < payload_length:
            self._header = (payload_length, nfds)
            if len(self._fds) > SCM_MAX_FD:
                self._check_unclaimed()
            return None
        queue = self._fds
        if len(queue) < nfds:
            self._fail(
                f"a record announced {nfds} descriptor(s) but only "
                f"{len(queue)} arrived with it: the peer attached fewer "
                "descriptors than its header says"
            )
        if payload_length <= 4096:
            # Small: a slice copy is cheaper than making a memoryview.
            data = bytes(self._buf[body : body + payload_length])
        else:
            try:
                with memoryview(self._buf) as view:
                    data = bytes(view[body : body + payload_length])
            except MemoryError:
                # The record is all here, but its copy does not fit.
                self._fail(
                    f"out of memory for a record of {payload_length} bytes: "
                    "lower Limits.max_payload to what this process can hold "
                    "twice; the record and its descriptors were discarded"
                )
        if not nfds:
            numbers = None
        elif len(queue) == nfds:
            # All of them (one record per sendmsg): hand the list over.
            numbers = queue
            self._fds = []
        else:
            numbers = queue[:nfds]
            del queue[:nfds]
        self._start = body + payload_length
        self._header = None
        # Message._unchecked, inlined (one call less per record): the
        # message owns ``numbers``, still plain ints.
        message = _new_message(Message)
        message._data = data
        message._fds = ()
        message._numbers = numbers
        return message

    def end_of_stream(self) -> None:
        """Check that the peer closed at a clean point.

        :raises ProtocolError: if the stream ended inside a record, or with
            descriptors no record claimed.
        """
        self._check_usable()
        if self._end > self._start:
            self._fail(
                f"the peer closed the connection in the middle of a record "
                f"({self._end - self._start} byte(s) of it arrived); the record "
                "and its descriptors were discarded"
            )
        if self._fds:
            self._fail(
                f"the peer closed the connection with {len(self._fds)} "
                "descriptor(s) that no record claimed: it attached more "
                "descriptors than its headers announced"
            )

    # -- state ------------------------------------------------------------

    @property
    def at_boundary(self) -> bool:
        """``True`` when no partial record and no unclaimed descriptor is held."""
        return self._end == self._start and not self._fds

    @property
    def buffered_fds(self) -> int:
        """How many received descriptors wait for their record."""
        return len(self._fds)

    def close(self) -> None:
        """Close every descriptor held and drop buffered bytes.

        :raises OSError: if closing a descriptor failed (all are closed).
        """
        fds, self._fds = self._fds, []
        self._start = self._end = 0
        self._header = None
        close_numbers(fds)

    # -- internals --------------------------------------------------------

    def _pending(self) -> int:
        return self._end - self._start

    def _reserve(self, n: int) -> None:
        """Make sure at least ``n`` bytes are free after ``_end``."""
        pending = self._end - self._start
        if len(self._buf) > 4 * READ_SIZE:
            # Big records went through. Give the memory back once reads have
            # been small for a while (not after each big record: growing
            # again would cost a zero-filled copy of its size every time).
            if pending + n > READ_SIZE:
                self._small_reads = 0
            else:
                self._small_reads += 1
                if self._small_reads >= 16:
                    self._small_reads = 0
                    self._buf[:pending] = self._buf[self._start : self._end]
                    self._start, self._end = 0, pending
                    del self._buf[READ_SIZE:]
                    return
        if len(self._buf) - self._end >= n:
            return
        if self._start:
            # Move the undecoded tail to the front (once per read, not once
            # per record, so many small records cost linear time).
            self._buf[:pending] = self._buf[self._start : self._end]
            self._start, self._end = 0, pending
        if len(self._buf) - self._end < n:
            try:
                self._buf.extend(bytes(n - (len(self._buf) - self._end)))
            except MemoryError:
                self._fail(
                    f"out of memory for a record of {pending + n} bytes or "
                    "more: lower Limits.max_payload to what this process can "
                    "hold; the record and its descriptors were discarded"
                )

    def _check_lead(self) -> None:
        """Fail if the bytes of a header that arrived so far cannot begin one.

        Called as soon as the first bytes differ from magic, version and
        flags, so a peer that speaks another protocol (and may wait for an
        answer after a few bytes) fails at once instead of hanging.
        """
        lead = bytes(self._buf[self._start : min(self._end, self._start + 4)])
        if not MAGIC.startswith(lead[:2]):
            self._fail(
                f"bad magic {lead[:2]!r} (expected {MAGIC!r}): the peer "
                "does not speak the aiofdpass record protocol, or the stream "
                f"lost its framing.{_FOREIGN}"
            )
        if len(lead) > 2 and lead[2] != VERSION:
            self._fail(
                f"unsupported protocol version {lead[2]} (this side speaks "
                f"version {VERSION}); upgrade the older side.{_FOREIGN}"
            )
        if len(lead) > 3 and lead[3]:
            self._fail(
                f"header flags {lead[3]:#x} are not zero; the peer uses a "
                "protocol extension this side does not know"
            )

    def _parse_header(self) -> tuple[int, int]:
        self._check_lead()
        _, _, flags, nfds, reserved, length = _HEADER.unpack_from(
            self._buf, self._start
        )
        if flags or reserved:
            self._fail(
                f"header flags {flags:#x} / reserved {reserved:#x} are not zero; "
                "the peer uses a protocol extension this side does not know"
            )
        if length > self._limits.max_payload:
            self._fail(
                f"the peer announced a {length}-byte payload, over this "
                f"channel's max_payload of {self._limits.max_payload}; raise "
                "Limits.max_payload on the receiving side if that is intended"
            )
        if nfds > self._limits.max_fds:
            self._fail(
                f"the peer announced {nfds} descriptors in one record, over "
                f"this channel's max_fds of {self._limits.max_fds}"
            )
        return length, nfds

    def _check_unclaimed(self) -> None:
        if len(self._fds) > SCM_MAX_FD:
            self._fail(
                f"{len(self._fds)} descriptors arrived that no complete record "
                f"claims (a conforming peer has at most {SCM_MAX_FD} in flight "
                "ahead of its records)"
            )

    def _fail(self, reason: str) -> NoReturn:
        self._failed = ProtocolError(reason)
        self.close()
        raise self._failed

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise ProtocolError(
                f"the decoder already failed: {self._failed}"
            ) from self._failed
