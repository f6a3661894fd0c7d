"""systemd's notify socket, fd store and socket activation: pure Python, async.

No libsystemd and no python-systemd: the protocols are small and public.

- :func:`notify` sends state (``READY=1``, ``STATUS=...``) to
  ``$NOTIFY_SOCKET``, a ``SOCK_DGRAM`` socket, with descriptors if any.
- :func:`store_fds` uploads descriptors to the service's fd store
  (``FDSTORE=1``), where systemd keeps them across a restart of the service
  (the unit needs ``FileDescriptorStoreMax=``).
- :func:`listen_fds` takes the descriptors systemd passed at start
  (``LISTEN_FDS``), socket activation's and the fd store's alike.

``docs/systemd.md`` shows a server that restarts without ever closing its
port, and the unit file it runs under.
"""

from __future__ import annotations

import fcntl
import os
import string
from collections.abc import Iterable

from ._datagram import create_datagram_socket
from ._fd import Fd

__all__ = ["LISTEN_FDS_START", "listen_fds", "notify", "store_fds"]

#: The first descriptor number systemd passes (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3

# systemd's fdname_is_valid(): printable ASCII but ':', at most 255 of them.
_FDNAME_CHARS = frozenset(string.printable) - set(":\t\n\r\x0b\x0c")
_FDNAME_MAX = 255


def _notify_address() -> str | None:
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return None
    if value.startswith("@"):
        return "\0" + value[1:]  # the abstract namespace
    if value.startswith("/"):
        return value
    raise ValueError(
        f"NOTIFY_SOCKET={value!r} is neither a path nor an @abstract name "
        "(other address families, such as vsock, are not supported)"
    )


async def notify(*assignments: str, fds: Iterable[object] = ()) -> bool:
    """Send ``assignments`` (``"READY=1"``, ...) to systemd, with ``fds``.

    One datagram of the assignments, one per line, goes to ``$NOTIFY_SOCKET``
    (a path, or ``@name`` for the abstract namespace), from a socket made
    for the call; ``fds`` takes what :meth:`aiofdpass.FdChannel.send` takes, and the
    caller keeps its copies. Returns ``False``, sending nothing, when
    ``NOTIFY_SOCKET`` is not set (not started by systemd, or with
    ``NotifyAccess=none``).

    :raises ValueError: for an assignment without ``=`` or with a newline,
        or a ``NOTIFY_SOCKET`` that is not a path or ``@name``.
    :raises OSError: if systemd's socket refused the datagram (for
        example ``ECONNREFUSED`` when systemd is gone).
    """
    for item in assignments:
        if not isinstance(item, str) or "=" not in item or "\n" in item:
            raise ValueError(f"each assignment is one 'NAME=value' line, not {item!r}")
    address = _notify_address()
    if address is None:
        return False
    async with await create_datagram_socket() as sock:
        await sock.send("\n".join(assignments).encode(), fds, to=address)
    return True


async def store_fds(fds: Iterable[object], *, name: str) -> bool:
    """Upload ``fds`` to the service's fd store under ``name``.

    Sends ``FDSTORE=1`` and ``FDNAME=name`` with the descriptors. systemd
    keeps them (up to the unit's ``FileDescriptorStoreMax=``) and passes
    them to the next start of the service, where :func:`listen_fds` returns
    them with their names. The caller keeps its own copies. Returns
    ``False`` when ``NOTIFY_SOCKET`` is not set.

    :param name: at most 255 printable ASCII characters, no ``:`` (the
        separator of ``LISTEN_FDNAMES``).
    :raises ValueError: for an invalid ``name``, or as :func:`notify`.
    """
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= _FDNAME_MAX
        or not set(name) <= _FDNAME_CHARS
    ):
        raise ValueError(
            f"invalid fd store name {name!r}: use 1 to 255 printable ASCII "
            "characters without ':' or whitespace other than space"
        )
    return await notify("FDSTORE=1", f"FDNAME={name}", fds=fds)


def _is_number(value: str) -> bool:
    return value.isascii() and value.isdigit()


def listen_fds(*, unset_environment: bool = True) -> list[tuple[str, Fd]]:
    """Return the descriptors systemd passed to this process, with their names.

    They are numbers ``3 .. 3 + $LISTEN_FDS - 1``, when ``$LISTEN_PID`` is
    this process; names come from ``$LISTEN_FDNAMES`` (``"unknown"`` where
    absent). Each is returned as an owned :class:`aiofdpass.Fd` with close-on-exec
    set (``systemd-socket-activate`` hands them over without it). Returns
    ``[]`` when systemd passed nothing to this process.

    :param unset_environment: remove ``LISTEN_PID``, ``LISTEN_FDS`` and
        ``LISTEN_FDNAMES`` from the environment (the default), so that
        children do not see them and a second call returns ``[]`` rather
        than a second owner for the same numbers.
    :raises ValueError: if ``LISTEN_FDS`` or ``LISTEN_PID`` is not a
        number (decimal digits: a negative count included, as
        ``sd_listen_fds`` refuses it), or a passed descriptor is not open.
    """
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    names = os.environ.get("LISTEN_FDNAMES")
    if unset_environment:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
    if not pid or not count:
        return []
    # Decimal digits only, as systemd writes them: int() would also take
    # "-1", " 1", "1_0" or other scripts' digits.
    if not (_is_number(pid) and _is_number(count)):
        raise ValueError(f"LISTEN_PID={pid!r} and LISTEN_FDS={count!r} must be numbers")
    if int(pid) != os.getpid():
        return []  # meant for another process (our parent)
    numbers = range(LISTEN_FDS_START, LISTEN_FDS_START + int(count))
    for fd in numbers:
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            raise ValueError(
                f"LISTEN_FDS={count}, but descriptor {fd} is not open"
            ) from None
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
    labels = names.split(":") if names else []
    labels += ["unknown"] * (len(numbers) - len(labels))
    return [
        (label or "unknown", Fd(fd)) for label, fd in zip(labels, numbers, strict=False)
    ]
