"""What `FdChannel` and `FdStream` share: adopting a socket, state, closing."""

from __future__ import annotations

import socket
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import anyio
from anyio import ClosedResourceError, TypedAttributeProvider
from anyio.abc import SocketAttribute
from anyio.lowlevel import checkpoint

from ._credentials import FdPassAttribute, PeerCredentials, peer_credentials_of
from ._transport import Transport

__all__ = ["Connection", "adopt_fd"]

T = TypeVar("T")


def adopt_fd(fd: int, make: Callable[[socket.socket], T]) -> T:
    """Return ``make(sock)`` for a socket wrapping descriptor number ``fd``.

    If ``make`` refuses the socket, the caller still owns ``fd``.
    """
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(f"from_fd() takes a descriptor number, not {type(fd).__name__}")
    sock = socket.socket(fileno=fd)
    try:
        return make(sock)
    except BaseException:
        sock.detach()  # the caller still owns the number
        raise


class Connection(TypedAttributeProvider):
    """A connected AF_UNIX stream socket owned by a channel or stream."""

    def __init__(self, sock: socket.socket) -> None:
        self._transport = Transport(sock)
        self._send_lock = anyio.Lock(fast_acquire=True)
        self._peer_credentials: PeerCredentials | None = None

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`aclose` was called."""
        return self._transport.closed

    def fileno(self) -> int:
        """Return the underlying socket's descriptor (``-1`` once closed).

        This lets the connection itself be passed as a descriptor, e.g. to
        hand a channel to another process. It never raises.
        """
        return self._transport.sock.fileno()

    @property
    def peer_credentials(self) -> PeerCredentials:
        """The peer's :class:`PeerCredentials` (pid, uid, gid), from ``SO_PEERCRED``.

        The kernel recorded them when the connection was made, so they stay
        the same for the connection's life (and stay readable after
        :meth:`aclose` once read). Also available as the typed attribute
        ``FdPassAttribute.peer_credentials``.

        :raises anyio.ClosedResourceError: if the connection was closed
            before they were first read.
        """
        if self._peer_credentials is None:
            if self._transport.closed:
                raise ClosedResourceError("this connection was closed with aclose()")
            self._peer_credentials = peer_credentials_of(self._transport.sock)
        return self._peer_credentials

    async def send_eof(self) -> None:
        """Shut down the sending side; the peer receives end of stream.

        Receiving still works. Later sends raise
        :class:`anyio.ClosedResourceError`.

        :raises anyio.ClosedResourceError: after :meth:`aclose`, or if the
            sending side was already shut down.
        :raises anyio.BrokenResourceError: if the connection failed.
        """
        await checkpoint()
        async with self._send_lock:
            self._transport.shutdown_write()

    async def aclose(self) -> None:
        """Close the connection and every descriptor it still holds.

        Tasks blocked in send or receive raise
        :class:`anyio.ClosedResourceError`. Calling it again does nothing;
        it never raises.
        """
        self._close_now()
        await checkpoint()

    def _close_now(self) -> None:
        self._transport.close()

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """Anyio typed attributes: ``SocketAttribute`` family, addresses, raw socket.

        Also ``FdPassAttribute.peer_credentials``.
        """
        sock = self._transport.sock
        return {
            SocketAttribute.family: lambda: socket.AF_UNIX,
            SocketAttribute.local_address: sock.getsockname,
            SocketAttribute.remote_address: sock.getpeername,
            SocketAttribute.raw_socket: lambda: sock,
            FdPassAttribute.peer_credentials: lambda: self.peer_credentials,
        }
