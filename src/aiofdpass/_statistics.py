"""What a channel or stream has carried, for ``statistics()``."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ChannelStatistics", "StreamStatistics"]


@dataclass(frozen=True)
class ChannelStatistics:
    """What an :class:`FdChannel` has sent and received, and holds queued now.

    Returned by :meth:`FdChannel.statistics`, a snapshot (it does not change
    afterwards); it never raises. Sent means accepted by a ``send()`` that
    returned: each such record is written to the socket, still queued (the
    ``*_queued`` counts), or was dropped unwritten (the ``*_dropped`` counts:
    at close, or when sending failed). So what reached the socket is
    ``*_sent - *_queued - *_dropped`` (a record dropped after part of it was
    written counts as dropped, its written bytes as sent). Bytes count as
    they go over the socket, each record's 12-byte header included, so the
    peer's ``bytes_received`` ends up equal to what reached the socket.
    The receiving side counts records ``receive()`` returned, and the bytes
    and descriptors read from the socket: those include records read but not
    (yet) returned, and a record still arriving.

    :ivar records_sent: Records ``send()`` accepted.
    :ivar bytes_sent: Their bytes, headers included.
    :ivar fds_sent: Their descriptors.
    :ivar records_received: Records ``receive()`` returned.
    :ivar bytes_received: Bytes read from the socket, headers included.
    :ivar fds_received: Descriptors received with them.
    :ivar records_queued: Records queued now, not yet written completely.
    :ivar bytes_queued: Bytes queued now, headers included.
    :ivar fds_queued: Descriptors queued now (the channel's own duplicates).
    :ivar records_dropped: Records dropped from the queue before they were
        written completely (each also logged at WARNING).
    :ivar bytes_dropped: Their bytes that were never written.
    :ivar fds_dropped: Their descriptors that were never sent (closed).
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
    records_dropped: int
    bytes_dropped: int
    fds_dropped: int


@dataclass(frozen=True)
class StreamStatistics:
    """What an :class:`FdStream` has sent and received (no framing, no queue).

    Returned by :meth:`FdStream.statistics`, a snapshot; it never raises.

    :ivar bytes_sent: Bytes written by ``send()`` calls that returned (a send
        cancelled after part of its data was written breaks the stream, and
        that part is not counted).
    :ivar fds_sent: Descriptors passed by ``send()`` calls that returned.
    :ivar bytes_received: Bytes read from the socket (including any still
        buffered, not yet returned by a receiving method).
    :ivar fds_received: Descriptors that arrived with them (including any
        still queued).
    """

    bytes_sent: int
    fds_sent: int
    bytes_received: int
    fds_received: int
