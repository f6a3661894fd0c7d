"""What `FdChannel` and `FdStream` share: adopting a socket, state, closing."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from anyio import ClosedResourceError, TypedAttributeProvider
from anyio.abc import SocketAttribute

from ._credentials import (
    FdPassAttribute,
    PeerCredentials,
    peer_credentials_of,
    peer_pidfd_of,
)
from ._fd import Fd
from ._transport import OPEN, Transport
from ._writer import DEFAULT_CLOSE_TIMEOUT, Writer

__all__ = ["Connection", "adopt_fd"]

T = TypeVar("T")

logger = logging.getLogger("aiofdpass")


def adopt_fd(fd: int | Fd, make: Callable[[socket.socket], T]) -> T:
    """Return ``make(sock)`` for a socket wrapping ``fd`` (a number or an `Fd`).

    If ``make`` refuses the socket, the caller still owns ``fd``; an ``Fd``
    is taken only once ``make`` succeeded.
    """
    if isinstance(fd, Fd):
        number = fd.fileno()
    elif isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(
            f"from_fd() takes a descriptor number or an Fd, not {type(fd).__name__}"
        )
    else:
        number = fd
    try:
        sock = socket.socket(fileno=number)
    except OSError as exc:
        what = "is not open" if exc.errno == errno.EBADF else "is not a socket"
        raise OSError(
            exc.errno,
            f"from_fd({number}): descriptor {number} {what} ({exc.strerror}); "
            "pass a connected AF_UNIX stream socket",
        ) from None
    except (ValueError, OverflowError):
        raise ValueError(
            f"from_fd({number}): {number} is not a descriptor number"
        ) from None
    try:
        made = make(sock)
    except ValueError as exc:
        sock.detach()  # the caller still owns the number
        raise ValueError(f"from_fd({number}): {exc}") from None
    except BaseException:
        sock.detach()  # the caller still owns the number
        raise
    if isinstance(fd, Fd):
        fd.take()
    return made


def _check_timeout(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"close_timeout must be a number of seconds, not {value!r}")
    if not value >= 0:
        raise ValueError(f"close_timeout must be 0 or more seconds, got {value}")
    return float(value)


class _Finaliser:
    """Close a collected connection's writer and buffers (on its loop)."""

    __slots__ = ("_close_buffers", "_writer")

    def __init__(
        self, writer: Writer, close_buffers: Callable[[], None] | None
    ) -> None:
        self._writer = writer
        self._close_buffers = close_buffers

    def __call__(self) -> None:
        # It may run as a loop callback (trio ends the run if one raises).
        try:
            self._writer.close("the connection was garbage-collected without aclose()")
            if self._close_buffers is not None:
                self._close_buffers()
        except Exception:
            logger.exception("closing a garbage-collected connection failed")


class Connection(TypedAttributeProvider):
    """A connected AF_UNIX stream socket owned by a channel or stream."""

    # The socket types a subclass adopts, and what to say for the others.
    _SOCKET_TYPES: tuple[int, ...] = (socket.SOCK_STREAM,)
    _WRONG_TYPE_ADVICE = (
        "FdStream carries a byte stream; for SOCK_SEQPACKET use FdChannel, "
        "for SOCK_DGRAM FdDatagramSocket"
    )
    # The socket path as the user named it, where the kernel's name differs
    # (a path too long for sun_path is bound as /proc/self/fd/N/<name>):
    # set by connect() (remote) and accept() (local).
    _local_name: str | bytes | None = None
    _remote_name: str | bytes | None = None

    def __init__(
        self, sock: socket.socket, close_timeout: float = DEFAULT_CLOSE_TIMEOUT
    ) -> None:
        timeout = _check_timeout(close_timeout)
        self._transport = Transport(sock, self._SOCKET_TYPES, self._WRONG_TYPE_ADVICE)
        self._writer = Writer(self._transport, timeout)
        self._peer_credentials: PeerCredentials | None = None
        # statistics(): plain counters, bumped where a send or receive ends.
        self._bytes_sent = self._fds_sent = 0
        self._bytes_received = self._fds_received = 0
        logger.debug("opened %r", self)

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`aclose` was called."""
        return self._transport.closed

    @property
    def close_timeout(self) -> float:
        """How long :meth:`aclose` waits for queued records, in seconds (default 10).

        Settable; 0 closes at once, dropping (and logging) what is queued.
        """
        return self._writer.close_timeout

    @close_timeout.setter
    def close_timeout(self, value: float) -> None:
        self._writer.close_timeout = _check_timeout(value)

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

    def peer_pidfd(self) -> Fd:
        """Return a pidfd for the peer process, as an :class:`Fd` the caller owns.

        Linux 6.5+ (``SO_PEERPIDFD``): the process that made the connection
        (for a :func:`channel_pair`, the one that made the pair), pinned:
        unlike ``PeerCredentials.pid``, a pidfd never comes to name
        another process once the peer exits, so checks made through it
        (``/proc/self/fdinfo/<fd>`` gives its pid, ``-1`` once it has exited
        and been reaped; ``pidfd_send_signal``, ``poll`` for its exit) have no
        pid-reuse race. Each call returns a new descriptor; close it.

        On older kernels it raises ``OSError`` ``ENOPROTOOPT``: fall back to
        ``peer_credentials`` (uid and gid are race-free; the pid is not).

        :raises anyio.ClosedResourceError: if the connection was closed.
        :raises OSError: ``ENOPROTOOPT`` before Linux 6.5.
        """
        if self._transport.closed:
            raise ClosedResourceError("this connection was closed with aclose()")
        return Fd._adopt(peer_pidfd_of(self._transport.sock))

    async def send_eof(self) -> None:
        """Write what is queued, then shut down the sending side.

        The peer receives end of stream after the last record or byte.
        Receiving still works. Later sends raise
        :class:`anyio.ClosedResourceError`. Calling it again does nothing.

        :raises anyio.ClosedResourceError: after :meth:`aclose`.
        :raises anyio.BrokenResourceError: if the connection failed.
        :raises RuntimeError: if another event loop still uses the connection.
        """
        await self._writer.send_eof()
        logger.debug("sent end of stream on %r", self)

    async def aclose(self) -> None:
        """Write what is queued, then close the connection and its descriptors.

        Waits at most :attr:`close_timeout` seconds (default 10) for a peer
        that is slow to read the queued records; what is still queued then
        is dropped and logged (logger ``"aiofdpass"``). Cancelling it closes
        at once, likewise. Tasks blocked in send or receive raise
        :class:`anyio.ClosedResourceError`; no task or callback of the
        connection outlives it. Calling it again does nothing. It never
        raises, except the cancellation that interrupts its wait (the
        connection is closed all the same).

        :raises RuntimeError: if another event loop still uses the
            connection (nothing is closed then).
        """
        if not self._transport.closed:
            logger.debug("closing %r", self)
        try:
            await self._writer.aclose()
        finally:
            close_buffers = self._buffers_closer()
            if self._transport.closed and close_buffers is not None:
                close_buffers()

    def __repr__(self) -> str:
        try:
            return self._repr()
        except Exception:  # half made (its __init__ raised), or torn down
            return f"<{type(self).__name__} object at {id(self):#x}>"

    def _repr(self) -> str:
        transport = self._transport
        fd = transport.sock.fileno()
        peer = ""
        if self._peer_credentials is not None or not transport.closed:
            try:
                creds = self.peer_credentials
            except (OSError, ClosedResourceError):
                pass
            else:
                peer = f" peer=pid {creds.pid} uid {creds.uid}"
        send, recv = transport.send_state, transport.recv_state
        state = send if send == recv else f"send {send}"
        if recv is OPEN and self._eof_received():
            state += ", eof received"  # the peer shut down or closed its end
        return f"<{type(self).__name__} fd={fd}{peer} {state}{self._repr_extra()}>"

    def _eof_received(self) -> bool:
        """Return whether a read met the peer's end of stream (subclasses' hook)."""
        return False

    def _repr_extra(self) -> str:
        """Return what a subclass adds at the end of its repr."""
        return ""

    def _buffers_closer(self) -> Callable[[], None] | None:
        """Return what closes the receiving side's buffers (subclasses' hook).

        It must not refer to the connection: a finaliser calls it later.
        """
        return None

    def __del__(self) -> None:
        transport = getattr(self, "_transport", None)
        writer = getattr(self, "_writer", None)
        if transport is None or writer is None or transport.closed:
            return
        # The collector may run this in another thread, or in the middle of
        # the background writer's write: then close on the loop, between
        # callbacks. (The writer and transport never refer back to the
        # connection, and nothing else of the library can be running.)
        close = _Finaliser(writer, self._buffers_closer())
        driver = transport.driver
        if (
            driver is None
            or (driver.thread == threading.get_ident() and not transport.writing)
            or not driver.call_threadsafe(close)
        ):
            close()
        warnings.warn(
            f"unclosed {type(self).__name__}: close it with aclose() or `async with`",
            ResourceWarning,
            stacklevel=1,
            source=self,
        )

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """Anyio typed attributes: ``SocketAttribute`` family, addresses, raw socket.

        Also ``FdPassAttribute.peer_credentials``.
        """
        sock = self._transport.sock
        local, remote = self._local_name, self._remote_name
        return {
            SocketAttribute.family: lambda: socket.AF_UNIX,
            SocketAttribute.local_address: (
                sock.getsockname if local is None else lambda: local
            ),
            SocketAttribute.remote_address: (
                sock.getpeername if remote is None else lambda: remote
            ),
            SocketAttribute.raw_socket: lambda: sock,
            FdPassAttribute.peer_credentials: lambda: self.peer_credentials,
        }
