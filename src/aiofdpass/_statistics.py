"""What a channel or stream has carried, for ``statistics()``."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChannelStatistics", "StreamStatistics"]


@dataclass(frozen=True)
class ChannelStatistics:
    """What an :class:`FdChannel` has sent and received, and holds queued now.

    Returned by :meth:`FdChannel.statistics`, a snapshot (it does not change
    afterwards); it never raises. Sent means handed to ``send()``: written
    to the socket, or queued to be written (the ``*_queued`` counts say how
    much of it still waits). Bytes count as they go over the socket, each
    record's 12-byte header included. The receiving side counts records
    ``receive()`` returned, and the bytes and descriptors read from the
    socket (which include those of a record still arriving).

    :ivar records_sent: Records ``send()`` accepted.
    :ivar bytes_sent: Their bytes, headers included.
    :ivar fds_sent: Their descriptors.
    :ivar records_received: Records ``receive()`` returned.
    :ivar bytes_received: Bytes read from the socket, headers included.
    :ivar fds_received: Descriptors received with them.
    :ivar records_queued: Records queued now, not yet written completely.
    :ivar bytes_queued: Bytes queued now, headers included.
    :ivar fds_queued: Descriptors queued now (the channel's own duplicates).
    """

    records_sent: int
    bytes_sent: int
    fds_sent: int
    records_received: int
    bytes_received: int
    fds_received: int
    records_queued: int
    bytes_queued: int
    fds_queued: int


@dataclass(frozen=True)
class StreamStatistics:
    """What an :class:`FdStream` has sent and received (no framing, no queue).

    Returned by :meth:`FdStream.statistics`, a snapshot; it never raises.

    :ivar bytes_sent: Bytes ``send()`` wrote.
    :ivar fds_sent: Descriptors ``send()`` passed.
    :ivar bytes_received: Bytes read from the socket (including any still
        buffered, not yet returned by a receiving method).
    :ivar fds_received: Descriptors that arrived with them (including any
        still queued).
    """

    bytes_sent: int
    fds_sent: int
    bytes_received: int
    fds_received: int
