"""`FdDatagramSocket`: datagrams of bytes plus descriptors over AF_UNIX SOCK_DGRAM."""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import anyio
from anyio import BusyResourceError
from anyio.abc import SocketAttribute, UnreliableObjectReceiveStream

from ._connection import adopt_fd
from ._convert import as_fd_list, close_sent, filenos_of
from ._credentials import PeerCredentials
from ._errors import LimitError
from ._message import Limits, Message
from ._transport import Transport
from ._unix import (
    SUN_PATH_MAX,
    SocketPath,
    bind_socket_path,
    normalize_path,
    sun_path,
    unlink_if_same,
)
from ._writer import SendLock

if TYPE_CHECKING:
    from typing_extensions import Buffer, Self

__all__ = ["Datagram", "FdDatagramSocket", "create_datagram_socket"]

_DEFAULT_LIMITS = Limits()
# A receiver whose queue is full makes sendmsg fail with EAGAIN while our
# socket polls writable: no event says when it has room, so back off.
_FIRST_PAUSE = 0.001
_LONGEST_PAUSE = 0.05


class Datagram(NamedTuple):
    """One datagram received by :meth:`FdDatagramSocket.receive`.

    Unpack it as ``message, address, credentials = await dsock.receive()``.
    Constructing one never raises.
    """

    message: Message
    """The bytes and the descriptors that came with them (the receiver owns them)."""
    address: str | bytes | None
    """The sender's address: a ``str`` path, ``bytes`` for an abstract name
    (leading NUL), or ``None`` if the sender's socket is not bound."""
    credentials: PeerCredentials | None
    """The sender's pid, uid and gid (``SCM_CREDENTIALS``), when the socket was
    made with ``pass_credentials=True``; else ``None``."""


class FdDatagramSocket(UnreliableObjectReceiveStream[Datagram]):
    """An AF_UNIX ``SOCK_DGRAM`` socket that sends and receives descriptors.

    Make one with :func:`create_datagram_socket`, or adopt one with
    :meth:`from_socket`. Each :meth:`send` is one datagram (one
    ``sendmsg``) and each :meth:`receive` returns one :class:`Datagram`:
    the kernel keeps the boundaries, there is no aiofdpass header, so any
    peer that speaks datagrams (systemd's notify socket, a C program)
    interoperates. ``async for datagram in dsock`` works. One bad datagram
    (over the limits, descriptors lost) raises for that :meth:`receive`
    only, with its descriptors closed; the socket stays usable, as an
    unconnected socket that serves many senders must.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        limits: Limits | None = None,
        path: str | None = None,
        identity: os.stat_result | None = None,
    ) -> None:
        """Adopt ``sock``; prefer :meth:`from_socket`, which documents this."""
        self._limits = limits or _DEFAULT_LIMITS
        if not isinstance(self._limits, Limits):
            raise TypeError(f"limits must be a Limits, not {type(limits).__name__}")
        self._transport = Transport(
            sock, (socket.SOCK_DGRAM,), "use FdChannel for connected sockets"
        )
        self._path = path
        self._identity = identity
        self._receiving = False
        self._send_lock = SendLock()

    @classmethod
    def from_socket(cls, sock: socket.socket, *, limits: Limits | None = None) -> Self:
        """Adopt an AF_UNIX ``SOCK_DGRAM`` socket (e.g. one inherited).

        It may be bound or not, connected or not. The object owns the socket
        from now on (switched to non-blocking mode) and closes it in
        :meth:`aclose`; a socket file it did not create is left in place.
        Turn on ``SO_PASSCRED`` on the socket yourself to get credentials.

        :raises ValueError: if it is not an AF_UNIX ``SOCK_DGRAM`` socket.
        """
        return cls(sock, limits=limits)

    @classmethod
    def from_fd(cls, fd: int, *, limits: Limits | None = None) -> Self:
        """Adopt an AF_UNIX ``SOCK_DGRAM`` socket given by descriptor number.

        :raises ValueError: if it is not one; the caller still owns ``fd``.
        """
        return adopt_fd(fd, lambda sock: cls(sock, limits=limits))

    @property
    def limits(self) -> Limits:
        """The limits checked on every datagram, in both directions."""
        return self._limits

    @property
    def local_address(self) -> str | bytes:
        """The socket's own address (``""`` if unbound): where peers reply."""
        name: str | bytes = self._transport.sock.getsockname()
        return name

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`aclose` was called."""
        return self._transport.closed

    def fileno(self) -> int:
        """Return the socket's descriptor (``-1`` once closed); never raises."""
        return self._transport.sock.fileno()

    async def send(
        self,
        data: Buffer = b"",
        fds: Iterable[object] = (),
        *,
        to: SocketPath | None = None,
        close_fds: bool = False,
    ) -> None:
        """Send one datagram of ``data`` with the descriptors ``fds`` to ``to``.

        ``fds`` takes what :meth:`FdChannel.send` takes. ``to`` is a socket
        path, or a name with a leading NUL for the abstract namespace (as
        :attr:`Datagram.address` gives it: reply with ``to=address``);
        ``None`` sends to the connected peer of a connected socket. Empty
        datagrams are datagrams, with or without descriptors.

        When it returns, the datagram is in the receiver's queue: the caller
        may close its descriptors (``close_fds=True`` does). If the
        receiver's queue is full it waits (the kernel gives no readiness
        event for that, so it retries with a pause growing to 50 ms); a
        cancelled ``send`` sent nothing. Concurrent sends are serialised.
        If ``send`` raises, nothing was sent, the caller still owns its
        descriptors and ``close_fds`` closed nothing.

        :raises TypeError: if ``data`` is not bytes-like, or ``fds`` is not
            a list of descriptors (one descriptor, or bytes, says to pass a
            list).
        :raises LimitError: over this socket's limits (nothing sent).
        :raises ConnectionRefusedError: if nobody is bound at ``to``.
        :raises FileNotFoundError: if ``to`` does not exist.
        :raises OSError: ``EMSGSIZE`` if the datagram is over the send
            buffer (``SO_SNDBUF`` less 32 bytes), ``EBADF`` for a closed
            descriptor; nothing was sent and the socket stays usable.
        :raises anyio.ClosedResourceError: after :meth:`aclose`.
        """
        try:
            payload = memoryview(data).cast("B")
        except TypeError:
            raise TypeError(
                f"data must be bytes-like, not {type(data).__name__}"
            ) from None
        objs = as_fd_list(fds)
        numbers = filenos_of(objs)
        limits = self._limits
        if len(payload) > limits.max_payload:
            raise LimitError(
                f"the datagram is {len(payload)} bytes, over this socket's "
                f"max_payload of {limits.max_payload}. Nothing was sent"
            )
        if len(numbers) > limits.max_fds:
            raise LimitError(
                f"{len(numbers)} descriptors in one datagram, over this "
                f"socket's max_fds of {limits.max_fds}. Nothing was sent"
            )
        target = None if to is None else normalize_path(to)
        transport = self._transport
        driver = transport.enter()
        await driver.checkpoint()
        transport.check_send()
        await self._send_lock.acquire()
        try:
            pause = _FIRST_PAUSE
            while True:
                if target is None:
                    if transport.try_send_to([payload], numbers, None):
                        break
                else:
                    with sun_path(target) as name:
                        if transport.try_send_to([payload], numbers, name):
                            break
                # Our own buffer full: wait for room. The receiver's queue
                # full: we poll writable all the same, so pause too.
                await driver.wait_writable()
                await driver.sleep(pause)
                pause = min(pause * 2, _LONGEST_PAUSE)
                transport.check_send()
        finally:
            self._send_lock.release()
        if close_fds:
            await close_sent(objs)

    async def receive(self) -> Datagram:
        """Receive the next datagram.

        Cancellation never loses a datagram: once it is read, it is
        returned. A datagram over :attr:`limits` raises
        :class:`ProtocolError`, one whose descriptors the kernel dropped
        (``MSG_CTRUNC``) raises :class:`DescriptorsLostError`; either way
        its descriptors are closed and the next ``receive`` goes on.

        :raises ProtocolError: for a datagram over the limits.
        :raises DescriptorsLostError: when descriptors were lost.
        :raises anyio.BusyResourceError: if another task is receiving.
        :raises anyio.ClosedResourceError: after :meth:`aclose`.
        """
        if self._receiving:
            raise BusyResourceError("receiving from")
        transport = self._transport
        driver = transport.enter()
        self._receiving = True
        try:
            await driver.checkpoint()
            transport.check_recv()
            limits = self._limits
            packet = transport.try_recv_packet(limits.max_payload, limits.max_fds)
            while packet is None:
                await driver.wait_readable()
                packet = transport.try_recv_packet(limits.max_payload, limits.max_fds)
        finally:
            self._receiving = False
        creds = packet.credentials
        address: Any = packet.address
        return Datagram(
            Message._unchecked(packet.data, packet.fds or None),
            address if address else None,
            None if creds is None else PeerCredentials(*creds),
        )

    async def aclose(self) -> None:
        """Close the socket, and remove the socket file that it created.

        The file is removed only if it is still the one this socket
        created. Tasks waiting in :meth:`send` or :meth:`receive` raise
        :class:`anyio.ClosedResourceError`. Calling it again does nothing;
        it never raises.
        """
        transport = self._transport
        if not transport.closed:
            transport.close()
            if self._path is not None and self._identity is not None:
                unlink_if_same(self._path, self._identity)
        await anyio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        transport = self._transport
        fd = transport.sock.fileno()
        if transport.closed:
            return f"<{type(self).__name__} fd={fd} closed>"
        name = transport.sock.getsockname()
        where = f"address={name!r}" if name else "unbound"
        return f"<{type(self).__name__} fd={fd} {where} open>"

    def __del__(self) -> None:
        transport = getattr(self, "_transport", None)
        if transport is not None and not transport.closed:
            transport.sock.close()
            warnings.warn(
                f"unclosed {type(self).__name__}: close it with aclose() or "
                "`async with`",
                ResourceWarning,
                stacklevel=1,
                source=self,
            )

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """Anyio typed attributes: family, local address, raw socket."""
        sock = self._transport.sock
        return {
            SocketAttribute.family: lambda: socket.AF_UNIX,
            SocketAttribute.local_address: sock.getsockname,
            SocketAttribute.raw_socket: lambda: sock,
        }


def _bind_path(sock: socket.socket, path: str, mode: int) -> os.stat_result:
    """Bind ``sock`` to the file ``path`` as :func:`listen` binds (mode, stale files).

    A path too long for ``sun_path`` is refused: the kernel names the socket
    by what ``bind`` was given, and senders reply to that name, so it must
    be the real path (not ``/proc/self/fd/N/...``).
    """
    if len(os.fsencode(path)) >= SUN_PATH_MAX:
        raise ValueError(
            f"{path!r} is too long for a datagram socket's name (at most "
            f"{SUN_PATH_MAX - 1} bytes): senders reply to the name given to "
            "bind, so it must be the real path. Choose a shorter path"
        )
    return bind_socket_path(sock, path, mode)


async def create_datagram_socket(
    local_path: SocketPath | None = None,
    *,
    mode: int = 0o600,
    limits: Limits | None = None,
    pass_credentials: bool = False,
) -> FdDatagramSocket:
    """Return an unconnected :class:`FdDatagramSocket`, bound to ``local_path``.

    Without ``local_path`` the socket is unbound: it can send, and
    receivers see ``address=None`` (unless ``pass_credentials``: then the
    kernel binds it to an abstract name of its choosing on its first send,
    and that is what receivers see and reply to). A path behaves as for
    :func:`listen` (the same code binds it): the file gets exactly ``mode``
    and is never looser at any moment, a stale socket file is replaced, a
    live one or a non-socket never; :meth:`FdDatagramSocket.aclose`
    removes it. A leading NUL byte means Linux's abstract namespace.

    :param mode: permissions of the socket file (default ``0o600``: only
        this user may send to it).
    :param limits: checked on every datagram sent and received.
    :param pass_credentials: turn on ``SO_PASSCRED``: every received
        :class:`Datagram` then has the sender's :class:`PeerCredentials`.
    :raises FileExistsError: if ``local_path`` exists and is not a socket.
    :raises OSError: ``EADDRINUSE`` if a live socket is there.
    :raises ValueError: for a path of 108 bytes or more.
    """
    path = None if local_path is None else normalize_path(local_path)
    if limits is not None and not isinstance(limits, Limits):
        raise TypeError(f"limits must be a Limits, not {type(limits).__name__}")
    await anyio.lowlevel.checkpoint()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if pass_credentials:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if isinstance(path, str) and not path.startswith("\0"):
            identity = _bind_path(sock, path, mode)
            return FdDatagramSocket(sock, limits=limits, path=path, identity=identity)
        if path is not None:
            sock.bind(path)
        return FdDatagramSocket(sock, limits=limits)
    except BaseException:
        sock.close()
        raise
