"""Socket paths: `connect`, `connect_stream`, `listen` and `FdListener`."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, Union

import anyio
from anyio import ClosedResourceError
from anyio.abc import Listener, SocketAttribute, TaskGroup
from anyio.lowlevel import checkpoint

from ._channel import FdChannel, socket_type
from ._connection import Connection
from ._credentials import AllowPolicy, PeerCredentials, check_peer, make_policy
from ._message import Limits
from ._stream import FdStream
from ._writer import DEFAULT_CLOSE_TIMEOUT

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "FdListener",
    "FdStreamListener",
    "bind_socket_path",
    "clear_socket_path",
    "connect",
    "connect_stream",
    "listen",
    "listen_stream",
]

logger = logging.getLogger("aiofdpass")

#: A socket path: ``str``, ``bytes`` or ``os.PathLike``. A name that starts
#: with a NUL byte is in Linux's abstract namespace (no file is created).
SocketPath = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

# What a listener's accept() returns.
ConnectionT = TypeVar("ConnectionT", bound=Connection)

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


def _file_name(path: SocketPath) -> str | None:
    """Return the path naming a socket file, ``None`` for an abstract name."""
    p = _normalize(path)
    return p if isinstance(p, str) and not p.startswith("\0") else None


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


def _connect_error(path: str | bytes, exc: OSError) -> OSError:
    """Return the error for a failed ``connect``, saying what is at ``path``."""
    if exc.errno is None:  # "AF_UNIX path too long", from Python itself
        return OSError(
            errno.ENAMETOOLONG,
            f"cannot connect to {_describe(path)}: {exc}; use a shorter file "
            "name or path",
        )
    if exc.errno == errno.ECONNREFUSED:
        if path[:1] in ("\0", b"\0"):
            what = "an abstract name nobody listens on"
        else:
            what = "a socket file nobody listens on"
            try:
                st = os.stat(path)
            except OSError:
                pass
            else:
                if not stat.S_ISSOCK(st.st_mode):
                    kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a file"
                    return OSError(
                        errno.ENOTSOCK,
                        f"cannot connect to {_describe(path)}: it is {kind}, "
                        "not a socket; pass the path of the server's socket",
                    )
        return ConnectionRefusedError(
            errno.ECONNREFUSED,
            f"cannot connect to {_describe(path)}: {exc.strerror} ({what}: is "
            "the server running?)",
        )
    return OSError(exc.errno, f"cannot connect to {_describe(path)}: {exc.strerror}")


def _bind_error(name: str | bytes, exc: OSError) -> OSError:
    """Return the error for a failed ``bind`` to an abstract ``name``."""
    if exc.errno is None:  # "AF_UNIX path too long", from Python itself
        return OSError(
            errno.ENAMETOOLONG,
            f"cannot listen on {_describe(name)}: {exc}; abstract names are "
            f"at most {_SUN_PATH_MAX - 1} bytes after the NUL",
        )
    if exc.errno == errno.EADDRINUSE:
        return OSError(
            errno.EADDRINUSE,
            f"cannot listen on {_describe(name)}: another socket has this "
            "abstract name; stop it or choose another name",
        )
    return OSError(exc.errno, f"cannot listen on {_describe(name)}: {exc.strerror}")


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
                raise _connect_error(p, exc) from None
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
        channel = FdChannel(sock, limits=limits, close_timeout=close_timeout)
    except BaseException:
        sock.close()
        raise
    channel._remote_name = _file_name(path)
    return channel


async def connect_stream(path: SocketPath) -> FdStream:
    """Connect to a listening socket and return an unframed :class:`FdStream`.

    :param path: as for :func:`connect`.
    :raises FileNotFoundError: if nothing exists at ``path``.
    :raises ConnectionRefusedError: if nobody listens there.
    """
    stream = FdStream(await _connect_socket(path))
    stream._remote_name = _file_name(path)
    return stream


# sock_diag (NETLINK_SOCK_DIAG) for AF_UNIX: which sockets are bound to which
# file. Python names none of these constants.
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST_DUMP = 0x1 | 0x300  # NLM_F_REQUEST | NLM_F_DUMP
_NLMSG_ERROR = 2
_NLMSG_DONE = 3
_UDIAG_SHOW_VFS = 0x2
_UNIX_DIAG_VFS = 1
_NLMSG = struct.Struct("=IHHII")  # struct nlmsghdr
# struct unix_diag_req: family, protocol, pad, states, ino, show, cookie[2]
_UNIX_DIAG_REQ = struct.Struct("=BBHIII2I")
_UNIX_DIAG_MSG_SIZE = 16  # struct unix_diag_msg
_RTATTR = struct.Struct("=HH")
_UNIX_DIAG_VFS_DATA = struct.Struct("=II")  # vfs inode, vfs dev (kernel dev_t)

# The longest final name component that connect() can always reach in a
# path too long for sun_path: "/proc/self/fd/" + up to 10 digits + "/" +
# name + NUL must fit in 108 bytes.
_MAX_LONG_PATH_NAME = _SUN_PATH_MAX - len("/proc/self/fd/") - 10 - 1 - 1


def _bound_files() -> set[tuple[int, int]] | None:
    """Return ``(st_dev, st_ino)`` of every file an AF_UNIX socket is bound to.

    Asks the kernel (sock_diag, ``UNIX_DIAG_VFS``) about the sockets of this
    network namespace, whatever their type or state and whoever owns them;
    nobody is connected to. ``None`` if the kernel cannot tell (no
    ``unix_diag``).
    """
    request = _UNIX_DIAG_REQ.pack(
        socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, _UDIAG_SHOW_VFS, 0xFFFFFFFF, 0xFFFFFFFF
    )
    header = _NLMSG.pack(
        _NLMSG.size + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0
    )
    found: set[tuple[int, int]] = set()
    try:
        with socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG
        ) as nl:
            nl.sendall(header + request)
            while True:
                data = nl.recv(65536)
                off = 0
                while off + _NLMSG.size <= len(data):
                    length, kind = _NLMSG.unpack_from(data, off)[:2]
                    if kind == _NLMSG_DONE:
                        return found
                    if kind == _NLMSG_ERROR or length < _NLMSG.size:
                        return None
                    attr = off + _NLMSG.size + _UNIX_DIAG_MSG_SIZE
                    while attr + _RTATTR.size <= off + length:
                        attr_len, attr_kind = _RTATTR.unpack_from(data, attr)
                        if attr_len < _RTATTR.size:
                            break
                        if attr_kind == _UNIX_DIAG_VFS:
                            ino, dev = _UNIX_DIAG_VFS_DATA.unpack_from(data, attr + 4)
                            found.add((os.makedev(dev >> 20, dev & 0xFFFFF), ino))
                        attr += (attr_len + 3) & ~3
                    off += (length + 3) & ~3
    except OSError:  # pragma: no cover - a kernel without unix_diag
        return None


def _in_use(path: str, st: os.stat_result) -> bool:
    """Whether a socket still owns the socket file ``path`` (``st``).

    First asks the kernel which sockets are bound to which files, connecting
    to nobody. Only if no socket of this network namespace holds the file
    (or the kernel cannot tell) does it try to connect: a server in another
    namespace then sees one connection that closes at once. Connection
    refused, or a file that vanished, means stale; a live socket of another
    type (``EPROTOTYPE``) or a full backlog means alive; any other error is
    raised, since the file might be someone's live socket.

    sock_diag names the file by its superblock's device, which ``stat``
    does not always report (btrfs; overlayfs over two filesystems): a socket
    bound to the same inode number on another device counts as live too,
    and is refused with an error that says so, never probed (the probe
    would take a server between ``bind`` and ``listen`` for stale).
    """
    held = _bound_files()
    if held is not None:
        if (st.st_dev, st.st_ino) in held:
            return True
        if any(ino == st.st_ino for _, ino in held):
            raise OSError(
                errno.EADDRINUSE,
                f"a socket is bound to {path!r}, or to a file with the same "
                "inode number on another filesystem (the kernel does not say "
                "which, on btrfs or overlayfs); it was left alone. If no "
                "server owns it, remove it yourself; or choose another path",
            )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        with _sun_path(path) as name:
            probe.connect(name)
    except BlockingIOError:
        return True  # alive, backlog full
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        if exc.errno == errno.EPROTOTYPE:
            return True  # a live socket of another type
        raise OSError(
            exc.errno,
            f"cannot tell whether the socket {path!r} is in use: connecting to "
            f"it failed ({exc.strerror or exc}), so it was left alone. If no "
            "server owns it, remove it yourself; or choose another path",
        ) from None
    else:
        return True
    finally:
        probe.close()


def clear_socket_path(path: str) -> None:
    """Make ``path`` free to bind: remove a stale socket file, refuse all else.

    Nothing at ``path``: nothing to do. A socket file that no socket owns
    any more (its server died) is removed. Anything else is left alone and
    refused: a live socket of any type (``EADDRINUSE``), a file that is not
    a socket (a symlink included, never followed), or a socket whose state
    cannot be told (``EACCES`` from another user's socket, for one).

    :raises FileExistsError: if ``path`` is not a socket.
    :raises OSError: ``EADDRINUSE`` if a socket is bound there, or the error
        that kept the check from telling.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(
            errno.EEXIST,
            f"{path!r} exists and is not a socket; refusing to replace it. "
            "Remove it yourself or choose another path",
        )
    if _in_use(path, st):
        raise OSError(
            errno.EADDRINUSE,
            f"another process is listening on {path!r} (a socket is bound to "
            "it); stop it or choose another path",
        )
    try:
        again = os.lstat(path)
    except FileNotFoundError:
        return
    if (again.st_dev, again.st_ino) == (st.st_dev, st.st_ino):
        os.unlink(path)  # a stale socket left by a process that died
    else:
        raise OSError(
            errno.EADDRINUSE,
            f"{path!r} was replaced while it was checked; try again",
        )


def _bind_file_error(path: str, directory: str, exc: OSError) -> OSError:
    """Return the error for a failed ``bind`` to the file ``path``."""
    if exc.errno == errno.EADDRINUSE:
        return OSError(
            errno.EADDRINUSE,
            f"something appeared at {path!r} while listen() was binding "
            "there; it was left alone. Try again or choose another path",
        )
    if exc.errno == errno.ENOENT and not os.path.isdir(directory or "."):
        return FileNotFoundError(
            errno.ENOENT,
            f"cannot listen on {path!r}: the directory "
            f"{directory or '.'!r} does not exist; create it first",
        )
    # EACCES (the directory is not writable), EROFS, ...: the socket
    # module's error names no path.
    return OSError(exc.errno, f"cannot listen on {path!r}: {exc.strerror}")


@contextlib.contextmanager
def _replacing(directory: str, path: str) -> Iterator[None]:
    """Hold ``directory``'s lock while a file at ``path`` may be replaced.

    Replacing a stale socket is check, unlink, bind: two processes doing it
    at once could each pass the check, and the later unlink would remove
    the socket the other just bound, live. Whoever replaces holds an
    exclusive ``flock`` on the directory meanwhile (advisory: every
    ``listen`` takes it); one that finds it held refuses at once rather
    than wait. Binding where nothing is needs no lock: ``bind`` itself
    fails if a file appears. Where the directory cannot be opened or
    locked (no read permission, a filesystem without ``flock``), the
    replacement goes on unlocked.

    :raises OSError: ``EADDRINUSE`` if another process holds the lock.
    """
    if not os.path.lexists(path):
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(
                errno.EADDRINUSE,
                f"cannot replace {path!r}: another process holds the lock on "
                f"{directory!r} (as listen() does while it replaces a stale "
                "socket there); try again",
            ) from None
        except OSError:
            pass  # no flock here: unlocked, as before
        yield
    finally:
        os.close(fd)  # releases the lock


def bind_socket_path(sock: socket.socket, path: str, mode: int) -> os.stat_result:
    """Bind ``sock`` (any AF_UNIX type) to the file ``path`` with ``mode``.

    A stale socket file there is replaced (see :func:`clear_socket_path`).
    The socket is given ``mode`` before ``bind``, and Linux creates the file
    with the socket's mode minus the umask: so the file never exists with a
    looser mode, and no process-wide umask is changed (threads are safe).
    Bits the umask took away are given back afterwards, through a
    descriptor of that very file (never through a symlink). The kernel's
    name for the socket is ``path`` itself (``getsockname``, the peer's
    ``getpeername``), or ``/proc/self/fd/N/<name>`` for a path too long for
    ``sun_path``. Returns the file's ``stat``.

    :raises OSError: ``ENAMETOOLONG`` if no process could reach ``path``
        with ``connect``.
    :raises FileNotFoundError: if the directory does not exist.
    :raises FileExistsError: if ``path`` is not a socket.
    :raises OSError: ``EADDRINUSE`` if a socket is bound there, or another
        process is replacing the stale socket there; any other error from
        ``bind`` (``EACCES``), naming ``path``.
    """
    directory, name = os.path.split(path)
    if (
        len(os.fsencode(path)) >= _SUN_PATH_MAX
        and len(os.fsencode(name)) > _MAX_LONG_PATH_NAME
    ):
        raise OSError(
            errno.ENAMETOOLONG,
            f"cannot listen on {path!r}: the path is over {_SUN_PATH_MAX - 1} "
            f"bytes and its file name over {_MAX_LONG_PATH_NAME} bytes, so "
            "connect() could not reach it (AF_UNIX path too long). Choose a "
            "shorter file name or a shorter path",
        )
    os.fchmod(sock.fileno(), mode)
    with _replacing(directory or ".", path):
        clear_socket_path(path)
        try:
            with _sun_path(path) as sun_name:
                sock.bind(sun_name)
        except OSError as exc:
            raise _bind_file_error(path, directory, exc) from None
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if stat.S_IMODE(st.st_mode) != mode and stat.S_ISSOCK(st.st_mode):
            # The umask took bits away: widen to exactly ``mode`` through
            # this descriptor (chmod of the path could follow a symlink that
            # replaced it meanwhile).
            os.chmod(f"/proc/self/fd/{fd}", mode)
            st = os.fstat(fd)
    finally:
        os.close(fd)
    return st


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

    A stale socket file (no socket bound to it any more) is replaced; a
    live one, of any socket type, or a path that is not a socket (a symlink
    included), is never touched. Whether a socket file is live is asked of
    the kernel (sock_diag), so a live server sees no connection from the
    check; only a socket of another network namespace (or a kernel without
    ``unix_diag``) is probed with a connection, which such a server sees
    open and close at once. Connection refused means stale; an error that
    cannot tell (``EACCES`` on another user's socket) refuses. A stale
    socket is replaced under an exclusive ``flock`` of its directory, so two
    ``listen`` calls never remove the socket the other just bound; one that
    finds the lock held raises ``EADDRINUSE``.

    The socket file never exists with a mode looser than ``mode``: the
    socket is given ``mode`` before ``bind``, which makes the file with that
    mode minus the umask; bits the umask removed are given back after. This
    is safe with threads, unlike changing the process-wide umask around
    ``bind``, and ``bind`` refuses to replace a file that appeared at
    ``path`` meanwhile. The socket's name (``getsockname``, a client's
    ``remote_address``) is ``path``.

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
        to admit it (see :func:`same_user`); only ``True`` admits, and an
        ``async`` function is refused with ``TypeError`` (it cannot be
        awaited at accept time). A refused peer is closed before
        a single byte or descriptor is read from it, the refusal is logged
        (logger ``"aiofdpass"``, level WARNING), and :meth:`FdListener.accept`
        waits for the next connection. A policy that raises, or returns
        anything but a ``bool``, refuses (logged at ERROR). By
        default everyone who can reach the socket may connect: the file mode
        limits that for a path, but nothing does for an abstract name. A
        policy sees credentials as of connect; to identify the peer process
        without pid reuse, check :meth:`FdChannel.peer_pidfd` on the
        accepted channel before reading from it.
    :param close_timeout: how long each accepted channel's ``aclose()``
        waits for queued records (:attr:`FdChannel.close_timeout`); this
        also bounds how long :meth:`FdListener.serve` lets a finished
        handler's records drain.
    :raises TypeError: if ``allow`` is neither a collection of ints nor
        callable, or is an ``async`` function.
    :raises FileExistsError: if ``path`` exists and is not a socket.
    :raises FileNotFoundError: if the directory of ``path`` does not exist.
    :raises PermissionError: if this process may not make a file there; it
        and every other error from ``bind`` name ``path``.
    :raises OSError: ``EADDRINUSE`` if a socket is bound there; the error
        that kept listen from telling whether the socket there is live (it
        is left alone); ``ENAMETOOLONG`` for a path over 107 bytes whose
        file name is over 82 bytes (nobody could connect to it).
    """
    p = _normalize(path)
    policy = make_policy(allow)
    type_ = socket_type(kind)
    await checkpoint()
    sock = socket.socket(socket.AF_UNIX, type_)
    try:
        if isinstance(p, str) and not p.startswith("\0"):
            identity = bind_socket_path(sock, p, mode)
        else:
            try:
                sock.bind(p)
            except OSError as exc:
                raise _bind_error(p, exc) from None
            identity = None
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    listener = FdListener(
        sock,
        path=p,
        identity=identity,
        limits=limits,
        allow=policy,
        close_timeout=close_timeout,
    )
    logger.debug("listening: %r", listener)
    return listener


async def listen_stream(
    path: SocketPath,
    *,
    mode: int = 0o600,
    backlog: int = socket.SOMAXCONN,
    allow: AllowPolicy | None = None,
) -> FdStreamListener:
    """Listen on a UNIX socket path for peers with a protocol of their own.

    The same as :func:`listen` (the socket file's mode, a stale socket
    replaced and a live one refused, the ``allow`` policy checked before
    anything is read, :meth:`~FdStreamListener.serve`), except that each
    accepted connection is an unframed :class:`FdStream`: for a back-end
    that a foreign front-end connects to (QEMU's vhost-user, for one).

    :param path: as for :func:`listen`.
    :param mode: as for :func:`listen`.
    :param backlog: as for :func:`listen`.
    :param allow: as for :func:`listen`.
    :raises TypeError: if ``allow`` is neither a collection of ints nor
        callable.
    :raises FileExistsError: if ``path`` exists and is not a socket.
    :raises OSError: ``EADDRINUSE`` if a server is listening there.
    """
    # listen() makes and guards the socket; only what accept() wraps differs.
    return FdStreamListener._take_over(
        await listen(path, mode=mode, backlog=backlog, allow=allow)
    )


class _UnixListener(Listener[ConnectionT]):
    """A listening UNIX socket; subclasses say what :meth:`accept` returns.

    An :class:`anyio.abc.Listener`. Use it as an async context manager, or
    call :meth:`aclose`, which also removes the socket file it created.
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
        self._accepted = 0
        self._accept_guard = anyio.ResourceGuard("accepting connections from")

    @classmethod
    def _take_over(cls, other: _UnixListener[Any]) -> Self:
        """Return a listener of this class on ``other``'s socket and file.

        ``other`` is spent: its ``aclose()`` no longer touches them.
        """
        listener = cls(
            other._sock,
            path=other._path,
            identity=other._identity,
            limits=other._limits,
            allow=other._allow,
            close_timeout=other._close_timeout,
        )
        other._closed = True
        return listener

    def _wrap(self, conn: socket.socket) -> ConnectionT:
        """Return the object that :meth:`accept` hands out for ``conn``."""
        raise NotImplementedError

    @property
    def path(self) -> str | bytes:
        """The path this listener is bound to."""
        return self._path

    async def accept(self) -> ConnectionT:
        """Wait for a connection and return it.

        An :class:`FdChannel` from :func:`listen`'s listener, an
        :class:`FdStream` from :func:`listen_stream`'s.

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
                if self._allow is not None:
                    try:
                        admitted = check_peer(conn, self._allow)
                    except BaseException:  # KeyboardInterrupt, SystemExit in it
                        conn.close()
                        raise
                    if not admitted:
                        conn.close()  # nothing was read: no byte, no descriptor
                        await checkpoint()  # a flood of refusals must not starve
                        continue
                try:
                    connection = self._wrap(conn)
                except BaseException:
                    conn.close()
                    raise
                if self._identity is not None:
                    connection._local_name = self._path
                self._accepted += 1
                return connection

    async def serve(
        self,
        handler: Callable[[ConnectionT], Awaitable[Any]],
        task_group: TaskGroup | None = None,
    ) -> NoReturn:
        """Accept connections forever, running ``handler(connection)`` in a task each.

        Each connection (channel or stream) is closed when its handler
        returns or raises (what it still queues gets its ``close_timeout``,
        by default 10 seconds, to be written; a peer that does not read it by
        then loses it, and the loss is logged); an
        exception from a handler is logged (logger ``"aiofdpass"``) and does
        not stop the server. Running out of descriptors (``EMFILE``) is
        logged and retried. Stop it by cancelling, or by closing the
        listener (``serve`` then raises :class:`anyio.ClosedResourceError`
        itself, never wrapped in an ``ExceptionGroup``).

        :param task_group: where to run the handlers; by default a task group
            of its own, which waits for running handlers on the way out
            (before the error that ended the loop is raised).
        :raises anyio.ClosedResourceError: once the listener is closed.
        :raises anyio.BusyResourceError: if another task is accepting.
        :raises OSError: if ``accept`` fails for a reason other than running
            out of descriptors.
        """

        async def run(channel: ConnectionT) -> None:
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

        # What ends the accept loop is raised once the task group is left:
        # raised inside our own group, it would come out wrapped in an
        # ExceptionGroup instead of the documented error.
        error: Exception | None = None
        async with AsyncExitStack() as stack:
            if task_group is None:
                task_group = await stack.enter_async_context(anyio.create_task_group())
            while error is None:
                try:
                    channel = await self.accept()
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE):
                        error = exc
                        continue
                    logger.warning(
                        "accept failed: %s; retrying in %ss", exc, _EMFILE_BACKOFF
                    )
                    await anyio.sleep(_EMFILE_BACKOFF)
                    continue
                except Exception as exc:  # ClosedResourceError, BusyResourceError
                    error = exc
                    continue
                task_group.start_soon(run, channel)
        raise error

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
            logger.debug("stopped listening: %r", self)
        await checkpoint()

    def __repr__(self) -> str:
        try:
            state = "closed" if self._closed else "listening"
            return (
                f"<{type(self).__name__} path={self._path!r} "
                f"fd={self._sock.fileno()} {state} accepted={self._accepted}>"
            )
        except Exception:  # half made: its __init__ raised
            return f"<{type(self).__name__} object at {id(self):#x}>"

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


class FdListener(_UnixListener[FdChannel]):
    """A listening UNIX socket that accepts :class:`FdChannel` connections.

    An :class:`anyio.abc.Listener`, made by :func:`listen`. Use it as an
    async context manager, or call :meth:`aclose`, which also removes the
    socket file it created.
    """

    def _wrap(self, conn: socket.socket) -> FdChannel:
        return FdChannel(conn, limits=self._limits, close_timeout=self._close_timeout)


class FdStreamListener(_UnixListener[FdStream]):
    """A listening UNIX socket that accepts unframed :class:`FdStream` connections.

    An :class:`anyio.abc.Listener` made by :func:`listen_stream`, with
    everything an :class:`FdListener` does: :meth:`accept` skips peers the
    ``allow`` policy refuses, :meth:`serve` runs a handler per stream, and
    :meth:`aclose` removes the socket file it created.
    """

    def _wrap(self, conn: socket.socket) -> FdStream:
        return FdStream(conn)
