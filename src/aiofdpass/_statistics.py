"""What a channel or stream has carried, for ``statistics()``."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChannelStatistics", "StreamStatistics"]


@dataclass(frozen=True)
class ChannelStatistics:
    """What an :class:`FdChannel` has sent and received, and holds queued now.

    Returned by :meth:`FdChannel.statistics`, a snapshot (it does not change
    afterwards). Sent means accepted by ``send()``: written to the socket,
    or queued to be written (the ``*_queued`` counts say how much of it
    still waits). Received means returned by ``receive()``. Bytes are the
    records' data, without the record headers.
    """

    #: Records ``send()`` accepted.
    records_sent: int
    #: Their data, in bytes.
    bytes_sent: int
    #: Their descriptors.
    fds_sent: int
    #: Records ``receive()`` returned.
    records_received: int
    #: Their data, in bytes.
    bytes_received: int
    #: Their descriptors.
    fds_received: int
    #: Records queued now, not yet written completely.
    records_queued: int
    #: Bytes queued now, headers included.
    bytes_queued: int
    #: Descriptors queued now (the channel's own duplicates).
    fds_queued: int


@dataclass(frozen=True)
class StreamStatistics:
    """What an :class:`FdStream` has sent and received (no framing, no queue).

    Returned by :meth:`FdStream.statistics`, a snapshot.
    """

    #: Bytes ``send()`` wrote.
    bytes_sent: int
    #: Descriptors ``send()`` passed.
    fds_sent: int
    #: Bytes the receiving methods returned.
    bytes_received: int
    #: Descriptors the receiving methods returned.
    fds_received: int
