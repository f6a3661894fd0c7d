"""A child process joined by a channel: `open_child_process`, `channel_from_env`.

The parent makes a :func:`channel_pair`, starts the child with one end in
``pass_fds`` and the end's number in an environment variable, and closes its
copy of that end; the child adopts the number with :meth:`FdChannel.from_fd`.
These two functions are that pattern, written once.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, Any, Union

import anyio
from anyio.abc import Process
from anyio.lowlevel import checkpoint

from ._channel import FdChannel, channel_pair
from ._fd import FD_MAX
from ._message import Limits

__all__ = ["CHANNEL_FD_ENV", "channel_from_env", "open_child_process"]

#: The environment variable that names the child's channel descriptor.
CHANNEL_FD_ENV = "AIOFDPASS_CHANNEL_FD"

_Command = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
_Redirect = int | IO[Any] | None


async def open_child_process(
    command: Sequence[_Command],
    *,
    env: Mapping[str, str] | None = None,
    env_var: str = CHANNEL_FD_ENV,
    pass_fds: Iterable[int] = (),
    stdin: _Redirect = subprocess.DEVNULL,
    stdout: _Redirect = None,
    stderr: _Redirect = None,
    cwd: str | os.PathLike[str] | None = None,
    start_new_session: bool = False,
    limits: Limits | None = None,
) -> tuple[Process, FdChannel]:
    """Start a child process joined to this one by an :class:`FdChannel`.

    Makes a :func:`channel_pair`, starts ``command`` (e.g.
    ``[sys.executable, "child.py"]``) with one end in ``pass_fds`` and its
    number in the environment variable ``env_var``, then closes this
    process's copy of that end, so the channel reaches end of stream when
    the child exits. The child calls :func:`channel_from_env` to get its end.

    Close both results when done (``async with process, channel:``); the
    process object's ``aclose`` waits for the child to exit.

    :param command: the program and its arguments (no shell).
    :param env: the child's environment; by default this process's own.
        ``env_var`` is added to it.
    :param env_var: the variable that names the descriptor.
    :param pass_fds: more descriptors the child inherits, under the same
        numbers.
    :param stdin: as for :func:`anyio.open_process`, but the default is
        :data:`subprocess.DEVNULL`.
    :param stdout: as for :func:`anyio.open_process`, but the default is
        ``None``: the child writes to this process's stdout, and a pipe
        nobody reads can never block it.
    :param stderr: like ``stdout``.
    :param cwd: the child's working directory.
    :param start_new_session: run the child in a new session (``setsid``).
    :param limits: record limits for this process's end of the channel.
    :return: the :class:`anyio.abc.Process` and this process's channel end.
    :raises OSError: if the child could not be started; both channel ends
        are closed then.

    If it raises (cancellation included), nothing it made outlives it: both
    channel ends are closed, and a child already started is killed and
    waited for. Starting the child is not interrupted half-way (a
    cancellation that arrives meanwhile takes effect once it has started,
    and that child is then killed and reaped).
    """
    await checkpoint()
    ours, theirs = channel_pair(limits=limits)
    process: Process | None = None
    try:
        child_env = dict(os.environ if env is None else env)
        child_env[env_var] = str(theirs.fileno())
        with anyio.CancelScope(shield=True):
            try:
                process = await anyio.open_process(
                    list(command),
                    env=child_env,
                    pass_fds=[theirs.fileno(), *pass_fds],
                    stdin=stdin,
                    stdout=stdout,
                    stderr=stderr,
                    cwd=cwd,
                    start_new_session=start_new_session,
                )
            finally:
                await theirs.aclose()
        await checkpoint()  # a cancellation that came meanwhile lands here
    except BaseException:
        with anyio.CancelScope(shield=True):
            if process is not None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.aclose()  # waits for it: no zombie
            await ours.aclose()
        raise
    assert process is not None
    return process, ours


def channel_from_env(
    env_var: str = CHANNEL_FD_ENV, *, limits: Limits | None = None
) -> FdChannel:
    """Return the channel to the parent that started this process.

    The counterpart of :func:`open_child_process`, called in the child: it
    reads the descriptor number from ``env_var`` and adopts it with
    :meth:`FdChannel.from_fd`. The variable is removed from
    :data:`os.environ`, so a process this one starts cannot mistake it for
    its own channel.

    :param env_var: the variable :func:`open_child_process` set.
    :param limits: record limits for the channel.
    :raises LookupError: if ``env_var`` is not set (this process was not
        started by :func:`open_child_process`).
    :raises ValueError: if its value is not a descriptor number, or the
        descriptor is not a connected AF_UNIX stream socket.
    :raises OSError: ``EBADF`` if the descriptor is not open, ``ENOTSOCK``
        if it is not a socket. Every error names the variable and the
        descriptor.
    """
    value = os.environ.get(env_var)
    if value is None:
        raise LookupError(
            f"the environment variable {env_var} is not set: start this "
            "process with aiofdpass.open_child_process(), which sets it"
        )
    try:
        fd = int(value)
    except ValueError:
        raise ValueError(f"{env_var}={value!r} is not a descriptor number") from None
    if not 0 <= fd <= FD_MAX:
        raise ValueError(f"{env_var}={value!r} is not a descriptor number")
    try:
        channel = FdChannel.from_fd(fd, limits=limits)
    except OSError as exc:
        raise OSError(
            exc.errno,
            f"{env_var}={value!r}: {exc.strerror}. Was this process started by "
            "aiofdpass.open_child_process()? Its descriptor must stay open "
            "until channel_from_env() adopts it",
        ) from None
    except ValueError as exc:
        raise ValueError(f"{env_var}={value!r}: {exc}") from None
    del os.environ[env_var]
    return channel
