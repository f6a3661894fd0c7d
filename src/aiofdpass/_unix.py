"""Socket paths: `connect`, `connect_stream`, `listen` and `FdListener`."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import tempfile
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack
from typing import Any, NoReturn, Union

import anyio
from anyio import ClosedResourceError
from anyio.abc import Listener, SocketAttribute, TaskGroup
from anyio.lowlevel import checkpoint

from ._channel import FdChannel, socket_type
from ._credentials import AllowPolicy, PeerCredentials, check_peer, make_policy
from ._message import Limits
from ._stream import FdStream
from ._writer import DEFAULT_CLOSE_TIMEOUT

__all__ = ["FdListener", "connect", "connect_stream", "listen"]

logger = logging.getLogger("aiofdpass")

#: A socket path: ``str``, ``bytes`` or ``os.PathLike``. A name that starts
#: with a NUL byte is in Linux's abstract namespace (no file is created).
SocketPath = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

# How long serve() waits before accepting again when out of descriptors.
_EMFILE_BACKOFF = 0.1


# sizeof(sockaddr_un.sun_path) on Linux, including the terminating NUL.
_SUN_PATH_MAX = 108


@contextlib.contextmanager
def _sun_path(path: str | bytes) -> Iterator[str | bytes]:
    """Yield a name for ``path`` that fits in ``sun_path``.

    A file path too long for ``sun_path`` is reached through
    ``/proc/self/fd/N/<name>``, where N is its directory opened with
    ``O_PATH``: the kernel resolves it to the same place.
    """
    if isinstance(path, bytes) or len(os.fsencode(path)) < _SUN_PATH_MAX:
        yield path
        return
    directory, name = os.path.split(path)
    dirfd = os.open(directory or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{dirfd}/{name}"
    finally:
        os.close(dirfd)


def _normalize(path: SocketPath) -> str | bytes:
    p = os.fspath(path)
    if not p:
        raise ValueError("the socket path is empty")
    if p[:1] in ("\0", b"\0"):
        return p  # abstract namespace: keep it exactly as given
    return os.fsdecode(p)


# Shared with _datagram.py.
SUN_PATH_MAX = _SUN_PATH_MAX
normalize_path = _normalize
sun_path = _sun_path


def unlink_if_same(path: str, identity: os.stat_result) -> None:
    """Remove ``path`` if it is still the file ``identity`` describes."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if (st.st_dev, st.st_ino) == (identity.st_dev, identity.st_ino):
        os.unlink(path)


def _describe(path: str | bytes) -> str:
    return repr(path)


async def _connect_socket(
    path: SocketPath, sock_type: int = socket.SOCK_STREAM
) -> socket.socket:
    p = _normalize(path)
    sock = socket.socket(socket.AF_UNIX, sock_type)
    try:
        sock.setblocking(False)
        await checkpoint()
        delay = 0.001
        while True:
            try:
                with _sun_path(p) as name:
                    sock.connect(name)
                return sock
            except BlockingIOError:
                # Linux: the listener's backlog is full. There is no
                # readiness event for that, so back off and retry.
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.05)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"cannot connect to {_describe(p)}: {exc.strerror}"
                ) from None
    except BaseException:
        sock.close()
        raise


async def connect(
    path: SocketPath,
    *,
    kind: str = "stream",
    limits: Limits | None = None,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
) -> FdChannel:
    """Connect to a listening socket and return an :class:`FdChannel`.

    :param path: the socket path (``str``, ``bytes``, ``os.PathLike``); a
        leading NUL byte means Linux's abstract namespace.
    :param kind: ``"stream"`` (the default) or ``"seqpacket"``: the
        listener's socket type (a record per packet, no header).
    :param limits: record limits for the channel.
    :param close_timeout: how long the channel's ``aclose()`` waits for
        queued records (:attr:`FdChannel.close_timeout`).
    :raises FileNotFoundError: if nothing exists at ``path``.
    :raises ConnectionRefusedError: if nobody listens there.
    :raises OSError: ``EPROTOTYPE`` if the listener is of another ``kind``.
    """
    sock = await _connect_socket(path, socket_type(kind))
    try:
        return FdChannel(sock, limits=limits, close_timeout=close_timeout)
    except BaseException:
        sock.close()
        raise


async def connect_stream(path: SocketPath) -> FdStream:
    """Connect to a listening socket and return an unframed :class:`FdStream`.

    :param path: as for :func:`connect`.
    :raises FileNotFoundError: if nothing exists at ``path``.
    :raises ConnectionRefusedError: if nobody listens there.
    """
    return FdStream(await _connect_socket(path))


def _is_live_socket(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        with _sun_path(path) as name:
            probe.connect(name)
    except BlockingIOError:
        return True  # alive, backlog full
    except OSError as exc:
        return exc.errno == errno.EPROTOTYPE  # alive, another socket type
    else:
        return True
    finally:
        probe.close()


def _bind_file(sock: socket.socket, path: str, mode: int) -> os.stat_result:
    """Bind ``sock`` at ``path`` with ``mode``, never more open than that.

    The socket is bound inside a fresh private directory (0700), given its
    mode there, then hard-linked into place: the path never exists with
    looser permissions, and ``link`` fails rather than replace anything that
    appeared at ``path`` in the meantime. Works with threads (no umask).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(
                errno.EEXIST,
                f"{path!r} exists and is not a socket; refusing to replace it. "
                "Remove it yourself or choose another path",
            )
        if _is_live_socket(path):
            raise OSError(
                errno.EADDRINUSE,
                f"another process is listening on {path!r}; stop it or choose "
                "another path",
            )
        os.unlink(path)  # a stale socket left by a process that died
    tmpdir = tempfile.mkdtemp(prefix=".afd", dir=os.path.dirname(path) or ".")
    tmp = os.path.join(tmpdir, "s")
    try:
        with _sun_path(tmp) as name:
            sock.bind(name)
        os.chmod(tmp, mode)
        os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.rmdir(tmpdir)
    return os.stat(path)


async def listen(
    path: SocketPath,
    *,
    kind: str = "stream",
    mode: int = 0o600,
    backlog: int = socket.SOMAXCONN,
    limits: Limits | None = None,
    allow: AllowPolicy | None = None,
    close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
) -> FdListener:
    """Listen on a UNIX socket path and return an :class:`FdListener`.

    A stale socket file (nobody listening) is replaced; a live one, or a
    path that is not a socket (a symlink included), is never touched.

    The socket file never exists with a mode looser than ``mode``: the
    socket is bound inside a fresh private (0700) directory next to
    ``path``, given ``mode`` there, then hard-linked to ``path``. This is
    safe with threads, unlike changing the process-wide umask around
    ``bind``, and ``link`` refuses to replace a file that appeared at
    ``path`` meanwhile.

    :param path: where to listen; a leading NUL byte means the abstract
        namespace (no file, ``mode`` does not apply).
    :param kind: ``"stream"`` (the default) or ``"seqpacket"``: accepted
        channels then carry one record per packet, with no header.
    :param mode: permissions of the socket file (default ``0o600``: only
        this user may connect).
    :param backlog: the ``listen`` backlog (the kernel caps it at
        ``net.core.somaxconn``).
    :param limits: record limits for every accepted channel.
    :param allow: who may connect: a collection of uids, or a function
        that takes the peer's :class:`PeerCredentials` and returns ``True``
        to admit it (see :func:`same_user`). A refused peer is closed before
        a single byte or descriptor is read from it, the refusal is logged
        (logger ``"aiofdpass"``, level WARNING), and :meth:`FdListener.accept`
        waits for the next connection. A policy that raises refuses. By
        default everyone who can reach the socket may connect: the file mode
        limits that for a path, but nothing does for an abstract name.
    :param close_timeout: how long each accepted channel's ``aclose()``
        waits for queued records (:attr:`FdChannel.close_timeout`); this
        also bounds how long :meth:`FdListener.serve` lets a finished
        handler's records drain.
    :raises TypeError: if ``allow`` is neither a collection of ints nor
        callable.
    :raises FileExistsError: if ``path`` exists and is not a socket.
    :raises OSError: ``EADDRINUSE`` if a server is listening there.
    """
    p = _normalize(path)
    policy = make_policy(allow)
    type_ = socket_type(kind)
    await checkpoint()
    sock = socket.socket(socket.AF_UNIX, type_)
    try:
        if isinstance(p, str) and not p.startswith("\0"):
            identity = _bind_file(sock, p, mode)
        else:
            sock.bind(p)
            identity = None
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return FdListener(
        sock,
        path=p,
        identity=identity,
        limits=limits,
        allow=policy,
        close_timeout=close_timeout,
    )


class FdListener(Listener[FdChannel]):
    """A listening UNIX socket that accepts :class:`FdChannel` connections.

    An :class:`anyio.abc.Listener`, made by :func:`listen`. Use it as an
    async context manager, or call :meth:`aclose`, which also removes the
    socket file it created.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        path: str | bytes,
        identity: os.stat_result | None,
        limits: Limits | None,
        allow: Callable[[PeerCredentials], bool] | None = None,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        self._sock = sock
        self._close_timeout = close_timeout
        self._allow = allow
        self._path = path
        self._identity = identity
        self._limits = limits
        self._closed = False
        self._accept_guard = anyio.ResourceGuard("accepting connections from")

    @property
    def path(self) -> str | bytes:
        """The path this listener is bound to."""
        return self._path

    async def accept(self) -> FdChannel:
        """Wait for a connection and return it as an :class:`FdChannel`.

        Connections that the listener's ``allow`` policy refuses are closed
        unread and skipped.

        :raises anyio.ClosedResourceError: if the listener was closed.
        :raises anyio.BusyResourceError: if another task is accepting.
        :raises OSError: ``EMFILE`` if this process is out of descriptors.
        """
        with self._accept_guard:
            await checkpoint()
            while True:
                if self._closed:
                    raise ClosedResourceError("this listener was closed")
                try:
                    conn, _ = self._sock.accept()
                except BlockingIOError:
                    try:
                        await anyio.wait_readable(self._sock)
                    except ClosedResourceError:
                        raise ClosedResourceError("this listener was closed") from None
                    continue
                except (ConnectionAbortedError, InterruptedError):
                    continue  # the client gave up before we accepted it
                except OSError:
                    if self._closed:
                        raise ClosedResourceError("this listener was closed") from None
                    raise
                if self._allow is not None and not check_peer(conn, self._allow):
                    conn.close()  # nothing was read: no byte, no descriptor
                    await checkpoint()  # a flood of refusals must not starve others
                    continue
                try:
                    return FdChannel(
                        conn, limits=self._limits, close_timeout=self._close_timeout
                    )
                except BaseException:
                    conn.close()
                    raise

    async def serve(
        self,
        handler: Callable[[FdChannel], Awaitable[Any]],
        task_group: TaskGroup | None = None,
    ) -> NoReturn:
        """Accept connections forever, running ``handler(channel)`` in a task each.

        Each channel is closed when its handler returns or raises (records
        it still queues get the channel's ``close_timeout``, by default 10
        seconds, to be written; a peer that does not read them by then loses
        them, and the loss is logged); an
        exception from a handler is logged (logger ``"aiofdpass"``) and does
        not stop the server. Running out of descriptors (``EMFILE``) is
        logged and retried. Stop it by cancelling, or by closing the
        listener (``serve`` then raises :class:`anyio.ClosedResourceError`).

        :param task_group: where to run the handlers; by default a task group
            of its own, which waits for running handlers on the way out.
        :raises anyio.ClosedResourceError: once the listener is closed.
        :raises anyio.BusyResourceError: if another task is accepting.
        :raises OSError: if ``accept`` fails for a reason other than running
            out of descriptors.
        """

        async def run(channel: FdChannel) -> None:
            try:
                await handler(channel)
            except Exception:
                logger.exception(
                    "connection handler %r raised; its channel was closed "
                    "and the server goes on",
                    handler,
                )
            finally:
                # Bounded by the channel's close_timeout: a client that never
                # reads must not pin the channel (and the descriptors queued
                # on it) forever.
                await channel.aclose()

        async with AsyncExitStack() as stack:
            if task_group is None:
                task_group = await stack.enter_async_context(anyio.create_task_group())
            while True:
                try:
                    channel = await self.accept()
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE):
                        raise
                    logger.warning(
                        "accept failed: %s; retrying in %ss", exc, _EMFILE_BACKOFF
                    )
                    await anyio.sleep(_EMFILE_BACKOFF)
                    continue
                task_group.start_soon(run, channel)

    async def aclose(self) -> None:
        """Stop listening and remove the socket file this listener created.

        The file is removed only if it is still the one this listener
        created (a successor may have replaced it). Calling it again does
        nothing; it never raises.
        """
        if not self._closed:
            self._closed = True
            anyio.notify_closing(self._sock)
            self._sock.close()
            self._unlink_own_file()
        await checkpoint()

    def _unlink_own_file(self) -> None:
        if self._identity is None or not isinstance(self._path, str):
            return
        unlink_if_same(self._path, self._identity)

    @property
    def extra_attributes(self) -> Mapping[Any, Callable[[], Any]]:
        """Anyio typed attributes: family, local address (the path), raw socket."""
        return {
            SocketAttribute.family: lambda: socket.AF_UNIX,
            SocketAttribute.local_address: lambda: self._path,
            SocketAttribute.raw_socket: lambda: self._sock,
        }
