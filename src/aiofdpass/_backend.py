"""The one seam below anyio: each event loop's own primitives, per socket.

Everything in aiofdpass that reaches into asyncio or trio directly lives
here. A :class:`Driver` serves one socket on one running event loop: its
readiness waits (which :meth:`Driver.notify_closing` wakes with
:class:`anyio.ClosedResourceError`), a plain callback on the loop's next
iteration, a task that the library starts itself (the background writer),
a checkpoint and a sleep. :func:`current_driver` finds the running loop and
keeps a socket on one loop at a time.

Why not anyio for these: a callback scheduled with ``call_soon`` runs
outside any task, where anyio cannot tell which library is running (under a
plain ``asyncio.run`` its ``current_token()`` fails there); and on asyncio a
wait on a future with ``add_reader`` costs about half of anyio's generic
wait, which ping-pong traffic pays once per message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from anyio import ClosedResourceError

if TYPE_CHECKING:
    import trio

__all__ = ["Driver", "current_driver"]

logger = logging.getLogger("aiofdpass")

_get_running_loop = asyncio._get_running_loop
# The trio module, once a trio driver exists (trio stays an optional import).
_trio: Any = None
_get_ident = threading.get_ident


def _closed_while_waiting() -> ClosedResourceError:
    return ClosedResourceError("this channel was closed with aclose() while waiting")


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _noop() -> None:
    pass


class Driver:
    """One socket's waits, callbacks and tasks on one running event loop."""

    __slots__ = ("native", "sock", "thread")

    #: The loop's identity: the asyncio loop, or the trio run's token.
    native: object

    def __init__(self, native: object, sock: socket.socket) -> None:
        self.native = native
        self.sock = sock
        #: The thread the loop runs in.
        self.thread = threading.get_ident()

    def running(self) -> bool:
        """Whether the loop is still running (from any thread)."""
        raise NotImplementedError

    def is_current(self) -> bool:
        """Whether this is the loop running in this thread (the fast path)."""
        raise NotImplementedError

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Run ``fn()`` soon, when the loop next runs its callbacks or tasks."""
        raise NotImplementedError

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Start ``fn()`` as a task of the library's own; it must not raise."""
        raise NotImplementedError

    def call_threadsafe(self, fn: Callable[[], object]) -> bool:
        """Run ``fn()`` on the loop soon, from any thread (a finaliser's).

        Returns ``False`` if the loop no longer runs: nothing was scheduled.
        """
        raise NotImplementedError

    async def checkpoint(self) -> None:
        """Yield to the event loop once (a cancellation point)."""
        raise NotImplementedError

    async def sleep(self, seconds: float) -> None:
        """Sleep (a cancellation point)."""
        raise NotImplementedError

    async def wait_readable(self) -> None:
        """Wait until the socket is readable."""
        raise NotImplementedError

    async def wait_writable(self) -> None:
        """Wait until the socket can take more bytes."""
        raise NotImplementedError

    def notify_closing(self) -> None:
        """Wake every wait on the socket with ClosedResourceError; it closes next."""
        raise NotImplementedError

    @property
    def busy(self) -> bool:
        """Whether a task of the driver's own still runs."""
        return False


class _AsyncioDriver(Driver):
    """asyncio and uvloop: futures woken by ``add_reader``/``add_writer``.

    (Keeping the reader registered between waits was measured: no gain on
    asyncio's own loop, 10% fewer round trips on uvloop, whose libuv defers
    the ``epoll_ctl`` calls anyway.)
    """

    __slots__ = ("_read_waiter", "_task", "_write_waiter")

    native: asyncio.AbstractEventLoop

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
        super().__init__(loop, sock)
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        # The library's own task, referenced here (asyncio keeps only weak
        # references); dropped with the driver when the loop is left.
        self._task: asyncio.Task[None] | None = None

    def running(self) -> bool:
        return self.native.is_running()

    def is_current(self) -> bool:
        # Not asyncio._get_running_loop(): on Python 3.11 it calls getpid(),
        # a syscall, every time. One thread runs one loop at a time, so the
        # loop that made this driver is the current one while it runs here.
        return self.thread == _get_ident() and self.native.is_running()

    def call_soon(self, fn: Callable[[], object]) -> None:
        self.native.call_soon(fn)

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        async def run() -> None:
            await fn()

        self._task = self.native.create_task(run())

    def call_threadsafe(self, fn: Callable[[], object]) -> bool:
        loop = self.native
        if not loop.is_running():
            return False
        try:
            loop.call_soon_threadsafe(fn)
        except RuntimeError:  # closed meanwhile
            return False
        return True

    async def checkpoint(self) -> None:
        await asyncio.sleep(0)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait_readable(self) -> None:
        loop = self.native
        fd = self.sock.fileno()
        if fd < 0:
            raise _closed_while_waiting()
        fut = self._read_waiter = loop.create_future()
        loop.add_reader(fd, _wake, fut)
        try:
            await fut
        finally:
            if self._read_waiter is fut:  # notify_closing did not run
                self._read_waiter = None
                loop.remove_reader(fd)

    async def wait_writable(self) -> None:
        loop = self.native
        fd = self.sock.fileno()
        if fd < 0:
            raise _closed_while_waiting()
        fut = self._write_waiter = loop.create_future()
        loop.add_writer(fd, _wake, fut)
        try:
            await fut
        finally:
            if self._write_waiter is fut:  # notify_closing did not run
                self._write_waiter = None
                loop.remove_writer(fd)

    def notify_closing(self) -> None:
        # Unregister the descriptor before it is closed (uvloop aborts on a
        # closed one), then wake the waiters.
        loop = self.native
        fd = self.sock.fileno()
        read, write = self._read_waiter, self._write_waiter
        self._read_waiter = self._write_waiter = None
        if not loop.is_closed():
            if read is not None:
                loop.remove_reader(fd)
            if write is not None:
                loop.remove_writer(fd)
        for fut in (read, write):
            if fut is not None and not fut.done():
                fut.set_exception(_closed_while_waiting())


class _TrioDriver(Driver):
    """trio: its own readiness waits, and system tasks.

    ``call_soon`` hands callbacks to a system task of the socket's own that
    sleeps between them and is woken with ``reschedule``: unlike
    ``run_sync_soon`` this costs no wake-up syscall, and it runs in the
    scheduler's own order. ``notify_closing`` ends that task.
    """

    __slots__ = ("_closing", "_parked", "_pending", "_runner")

    native: trio.lowlevel.TrioToken

    def __init__(self, native: object, sock: socket.socket) -> None:
        global _trio
        import trio  # a trio run is going on: it is imported already

        _trio = trio  # methods use the module global (a local import per call costs)
        super().__init__(native, sock)
        self._pending: deque[Callable[[], object]] = deque()
        self._runner = False
        self._parked: trio.lowlevel.Task | None = None
        self._closing = False

    def running(self) -> bool:
        trio = _trio
        try:
            self.native.run_sync_soon(_noop)
        except trio.RunFinishedError:
            return False
        return True

    def is_current(self) -> bool:
        trio = _trio
        try:
            return trio.lowlevel.current_trio_token() is self.native
        except RuntimeError:
            return False

    def call_threadsafe(self, fn: Callable[[], object]) -> bool:
        trio = _trio
        try:
            self.native.run_sync_soon(fn)
        except trio.RunFinishedError:
            return False
        return True

    def call_soon(self, fn: Callable[[], object]) -> None:
        trio = _trio
        self._pending.append(fn)
        if not self._runner:
            self._runner = True
            trio.lowlevel.spawn_system_task(self._run_callbacks)
        elif self._parked is not None:
            task, self._parked = self._parked, None
            trio.lowlevel.reschedule(task)

    async def _run_callbacks(self) -> None:
        trio = _trio
        try:
            while True:
                while self._pending:
                    try:
                        self._pending.popleft()()
                    except Exception:  # a bug: never let it end the trio run
                        logger.exception("aiofdpass callback failed")
                if self._closing:
                    return
                self._parked = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort)
        finally:
            self._runner = False
            self._parked = None

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        self._parked = None
        abort: trio.lowlevel.Abort = _trio.lowlevel.Abort.SUCCEEDED
        return abort

    @property
    def busy(self) -> bool:
        return self._runner

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        trio = _trio
        trio.lowlevel.spawn_system_task(fn)

    async def checkpoint(self) -> None:
        trio = _trio
        await trio.lowlevel.checkpoint()

    async def sleep(self, seconds: float) -> None:
        trio = _trio
        await trio.sleep(seconds)

    async def wait_readable(self) -> None:
        trio = _trio
        try:
            await trio.lowlevel.wait_readable(self.sock)
        except trio.ClosedResourceError:
            raise _closed_while_waiting() from None

    async def wait_writable(self) -> None:
        trio = _trio
        try:
            await trio.lowlevel.wait_writable(self.sock)
        except trio.ClosedResourceError:
            raise _closed_while_waiting() from None

    def notify_closing(self) -> None:
        trio = _trio
        self._closing = True
        # Outside this trio run (RuntimeError) nobody can be waiting.
        with contextlib.suppress(RuntimeError):
            trio.lowlevel.notify_closing(self.sock)
            if self._parked is not None:
                task, self._parked = self._parked, None
                trio.lowlevel.reschedule(task)


def _running_trio_token() -> object | None:
    if "trio" not in sys.modules:
        return None
    import trio

    try:
        return trio.lowlevel.current_trio_token()
    except RuntimeError:
        return None


def current_driver(sock: socket.socket, owner: Driver | None) -> Driver:
    """Return the driver for ``sock`` on the event loop running in this thread.

    ``owner`` is the driver the socket used last: it is returned as it is
    when that loop is the running one. A socket moves to the running loop
    only once ``owner``'s loop has stopped.

    :raises RuntimeError: with no running event loop, or while ``owner``'s
        loop still runs (in another thread).
    """
    loop = _get_running_loop()
    if loop is not None:
        if owner is not None and owner.native is loop:
            return owner
        native: object = loop
    else:
        token = _running_trio_token()
        if token is None:
            raise RuntimeError(
                "no running event loop: await aiofdpass calls from code run "
                "by asyncio, uvloop or trio"
            )
        if owner is not None and owner.native is token:
            return owner
        native = token
    if owner is not None and owner.running():
        raise RuntimeError(
            "this channel is in use by another event loop that is still "
            "running (in another thread): a channel belongs to one event loop "
            "at a time. Use it from that loop (e.g. with "
            "anyio.from_thread.run), or give each loop its own channel"
        )
    if isinstance(native, asyncio.AbstractEventLoop):
        return _AsyncioDriver(native, sock)
    return _TrioDriver(native, sock)
