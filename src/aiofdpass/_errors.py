"""The library's own exceptions.

Transport states reuse anyio's exceptions (``EndOfStream``,
``ClosedResourceError``, ``BrokenResourceError``, ``BusyResourceError``); the
classes here cover what anyio has no name for: a peer that broke the framing,
descriptors the kernel dropped, and a local send over a limit.
"""

from __future__ import annotations

__all__ = ["DescriptorsLostError", "FdPassError", "LimitError", "ProtocolError"]


class FdPassError(Exception):
    """Base class of every error that aiofdpass defines itself."""


class ProtocolError(FdPassError):
    """The peer broke the record framing.

    Raised on receive for a bad magic or version, a record over a limit,
    fewer descriptors than a record's header announced, descriptors that no
    record claims (seen at end of stream, or when more than 253 pile up),
    end of stream in the middle of a record, or a record this process has
    no memory for (lower ``Limits.max_payload``). Every descriptor the channel
    held has been closed and the channel is broken: later calls raise
    :class:`anyio.BrokenResourceError`. Close the channel; a new connection
    starts from a clean state.

    On a ``SOCK_SEQPACKET`` channel or a datagram socket there is no header:
    it is raised for one packet over the limits, whose descriptors are
    closed, and the channel or socket goes on with the next packet.
    """


class DescriptorsLostError(FdPassError):
    """The kernel dropped descriptors that the peer sent (``MSG_CTRUNC``).

    This happens when the receiving process is at its ``RLIMIT_NOFILE`` limit
    (``EMFILE``) or its control buffer was too small. The bytes arrived but
    some descriptors did not, so the stream cannot be trusted any more: the
    descriptors that did arrive, and every descriptor the channel still
    buffered, have been closed, and the channel is broken.
    Close descriptors you no longer need (or raise the limit) and reconnect.
    On a ``SOCK_SEQPACKET`` channel or a datagram socket only that packet
    is lost (the descriptors that did arrive are closed); the next one is
    intact and the channel or socket goes on.
    """


class LimitError(FdPassError):
    """A limit was reached before anything happened.

    On send: the record is over a limit and nothing was written. The channel
    is still usable and the caller still owns every descriptor it passed.
    Send a smaller record, fewer descriptors, or raise the channel's
    :class:`~aiofdpass.Limits`.

    On an :class:`~aiofdpass.FdStream` read: :attr:`~aiofdpass.FdStream.max_queued_fds`
    received descriptors wait untaken, and nothing was read. Take them
    (:meth:`~aiofdpass.FdStream.take_fds`) or raise the limit, then read again.
    """
