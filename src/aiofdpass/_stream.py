"""`FdStream`: the unframed layer, bytes and descriptors as the kernel delivers them."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING

import anyio
from anyio import EndOfStream
from anyio.abc import AsyncResource

from ._connection import Connection, adopt_fd
from ._convert import as_fd_list, close_sent, filenos_of
from ._errors import LimitError
from ._fd import Fd
from ._message import SCM_MAX_FD

if TYPE_CHECKING:
    from typing_extensions import Buffer, Self

__all__ = ["FdStream", "stream_pair"]


class FdStream(Connection, AsyncResource):
    """A byte stream over an AF_UNIX socket that carries descriptors too.

    No framing: use it to talk to programs with a format of their own (for a
    Wayland, D-Bus or custom peer). Descriptors arrive with the read that
    returns the first byte of the ``sendmsg`` they were attached to, so a
    protocol on top must say which bytes they belong to. Received
    descriptors are returned as :class:`Fd` objects, never dropped.
    """

    def __init__(self, sock: socket.socket) -> None:
        """Adopt ``sock``; prefer :meth:`from_socket`, which documents this."""
        super().__init__(sock)
        self._receive_guard = anyio.ResourceGuard("receiving from")

    @classmethod
    def from_socket(cls, sock: socket.socket) -> Self:
        """Adopt a connected AF_UNIX stream socket; the stream owns it now.

        :raises ValueError: if it is not an AF_UNIX ``SOCK_STREAM`` socket.
        """
        return cls(sock)

    @classmethod
    def from_fd(cls, fd: int) -> Self:
        """Adopt a connected AF_UNIX stream socket given by descriptor number.

        :raises TypeError: if ``fd`` is not an ``int``.
        :raises OSError: ``EBADF`` or ``ENOTSOCK`` if ``fd`` is not an open
            socket.
        :raises ValueError: if it is not an AF_UNIX ``SOCK_STREAM`` socket;
            the caller still owns ``fd``.
        """
        return adopt_fd(fd, cls)

    async def send(
        self, data: Buffer, fds: Iterable[object] = (), *, close_fds: bool = False
    ) -> None:
        """Write all of ``data``; ``fds`` travel with its first byte.

        Concurrent sends are serialised. See :meth:`FdChannel.send` for what
        ``fds`` may contain, ``close_fds``, and cancellation (a send
        cancelled after part of ``data`` was written breaks the stream).

        :raises ValueError: if ``fds`` is given with empty ``data`` (the
            kernel silently drops descriptors sent with no bytes).
        :raises anyio.ClosedResourceError: after :meth:`aclose` or
            :meth:`send_eof`.
        :raises anyio.BrokenResourceError: if the connection failed.
        """
        payload = memoryview(data).cast("B")
        objs = as_fd_list(fds)
        numbers = filenos_of(objs)
        if numbers and not payload:
            raise ValueError(
                "descriptors need at least one byte of data to travel with: "
                "the kernel silently drops descriptors sent with no bytes"
            )
        if len(numbers) > SCM_MAX_FD:
            raise LimitError(
                f"{len(numbers)} descriptors in one send, over the kernel's "
                f"{SCM_MAX_FD} per sendmsg; split them. Nothing was sent"
            )
        await self._writer.send_bytes([payload] if payload else [], numbers)
        if close_fds:
            await close_sent(objs)

    async def receive_with_fds(self, max_bytes: int = 65536) -> tuple[bytes, list[Fd]]:
        """Read once: return up to ``max_bytes`` and the descriptors that came too.

        :raises anyio.EndOfStream: when the peer closed its sending side.
        :raises DescriptorsLostError: on ``MSG_CTRUNC``; the stream is broken.
        :raises anyio.BusyResourceError: if another task is receiving.
        :raises anyio.ClosedResourceError: after :meth:`aclose`.
        :raises anyio.BrokenResourceError: after the stream broke.
        """
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        with self._receive_guard:
            await self._transport.enter().checkpoint()
            self._transport.check_recv()
            buf = bytearray(max_bytes)
            with memoryview(buf) as view:
                nbytes, numbers = await self._transport.recv_into(view)
                fds = list(map(Fd._adopt, numbers))
            if nbytes == 0:
                raise EndOfStream
            del buf[nbytes:]
            return bytes(buf), fds


def stream_pair() -> tuple[FdStream, FdStream]:
    """Return two connected :class:`FdStream` objects (a ``socketpair``).

    :raises OSError: ``EMFILE`` if the process is out of descriptors.
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return FdStream(a), FdStream(b)
