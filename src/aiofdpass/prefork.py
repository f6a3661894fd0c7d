"""The prefork pattern: a master accepts connections and hands each one to a worker.

A :class:`WorkerPool` starts worker processes (each joined to the master by
an :class:`~aiofdpass.FdChannel`, through :func:`~aiofdpass.open_child_process`)
and sends each connection it is given to one of them, as one record: JSON
metadata plus the connected socket. :func:`serve_tcp` is the master's accept
loop and the pool in one call. ``docs/prefork.md`` tells when this beats a
shared listening socket and what it costs.

The wire between master and worker, one JSON record each (the master's
records carry the socket):

- master to worker: ``{"id": 7, "meta": {...}}`` plus the socket;
  ``{"stop": 30.0}`` (finish your connections within 30 s, then exit).
- worker to master: ``{"ready": pid}`` once the target is imported;
  ``{"taken": 7}`` once the worker owns connection 7 (the master closes its
  copy then); ``{"done": 7, "error": null}`` when the handler returned
  (``error`` is the exception's repr if it raised).
"""

from __future__ import annotations

import asyncio
import bisect
import errno
import hashlib
import importlib
import json
import logging
import os
import socket
import stat
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import anyio
from anyio import TASK_STATUS_IGNORED, BrokenResourceError, ClosedResourceError
from anyio.abc import Process, SocketStream, TaskGroup, TaskStatus

from ._channel import FdChannel
from ._errors import FdPassError, LimitError
from ._fd import Fd
from ._process import channel_from_env, open_child_process
from ._writer import DIRECT_BYTES

__all__ = [
    "PoolStatistics",
    "WorkerPool",
    "WorkerStartError",
    "WorkerStatistics",
    "serve_tcp",
]

logger = logging.getLogger("aiofdpass.prefork")

#: What a worker runs per connection: ``await handler(stream, meta)``.
Handler = Callable[[SocketStream, dict[str, Any]], Awaitable[None]]
#: A routing function: given the workers that can take a connection now,
#: the dispatch key and the metadata, return the ``index`` of one of them.
Route = Callable[[Sequence["WorkerStatistics"], object, dict[str, Any]], int]
Backend = Literal["asyncio", "uvloop", "trio"]

# The worker's sys.path, as the master has it (multiprocessing's spawn does
# the same), so that a target importable in the master is in the worker.
_PATH_ENV = "AIOFDPASS_PREFORK_PATH"
_WORKER_CODE = "from aiofdpass.prefork import _worker_main; _worker_main()"
_CHANNEL_ERRORS = (BrokenResourceError, ClosedResourceError, FdPassError)
# What a send to a worker raises when that worker's channel is gone: try
# another worker. Anything else (LimitError, EMFILE) is about the record.
_WORKER_GONE = (BrokenResourceError, ClosedResourceError)
_RING_POINTS = 64  # points per worker on the consistent-hash ring
# The worker's two reports on every connection, in a fixed form (still
# JSON) that the master reads without a JSON parser: it reads two of them
# per connection. Any other report is parsed as JSON.
_TAKEN = b'{"taken": %d}'
_DONE = b'{"done": %d, "error": null}'
_TAKEN_HEAD, _TAKEN_TAIL = _TAKEN.split(b"%d")
_DONE_HEAD, _DONE_TAIL = _DONE.split(b"%d")
_MAX_DELAYS_KEPT = 32


@dataclass(frozen=True)
class WorkerStatistics:
    """One worker as the master sees it (:meth:`WorkerPool.statistics`).

    :param index: the worker's slot, ``0`` to ``workers - 1``; a restarted
        worker keeps its slot (and its keys).
    :param pid: the process id, ``None`` while the slot has no process.
    :param available: ``True`` while it takes new connections (started,
        ready, not stopping).
    :param pending: connections sent to it and not yet acknowledged (the
        master still holds its copy of each).
    :param active: connections it took and is serving now.
    :param served: connections its handlers finished, over all its lives.
    :param errors: of those, how many ended with the handler raising.
    :param restarts: how many times the slot's process was restarted.
    :param failures: deaths in a row with no connection finished in
        between (what the restart backoff grows with).
    :param restart_delays: the delays chosen before its latest restarts
        (the last 32), in seconds.

    A snapshot: made by the pool, it never raises.
    """

    index: int
    pid: int | None
    available: bool
    pending: int
    active: int
    served: int
    errors: int
    restarts: int
    failures: int
    restart_delays: tuple[float, ...]

    @property
    def in_flight(self) -> int:
        """Connections it has now: ``pending + active`` (its "load")."""
        return self.pending + self.active


@dataclass(frozen=True)
class PoolStatistics:
    """The whole pool (:meth:`WorkerPool.statistics`).

    :param workers: one :class:`WorkerStatistics` per slot.
    :param dispatched: connections given to :meth:`WorkerPool.dispatch`.
    :param redispatched: connections sent again because the worker they
        were sent to died before taking them.
    :param waiting: connections held by the master until a worker is
        ready (every worker was down when they came).
    :param closed: connections the pool closed unserved (each one logged
        with the reason).

    A snapshot: made by the pool, it never raises.
    """

    workers: tuple[WorkerStatistics, ...]
    dispatched: int
    redispatched: int
    waiting: int
    closed: int

    @property
    def served(self) -> int:
        """Connections finished by all the workers."""
        return sum(w.served for w in self.workers)

    @property
    def in_flight(self) -> int:
        """Connections the workers have now (pending or active)."""
        return sum(w.in_flight for w in self.workers)


@dataclass
class _Connection:
    """A connection the master holds its own copy of until a worker takes it."""

    id: int
    fd: Fd
    meta: dict[str, Any]
    record: bytes
    key: object
    #: Set by :meth:`WorkerPool._send` when it raises (a cancellation)
    #: after a dead worker's supervisor took the connection out of
    #: ``pending``: the pool owns it then, and sends it on.
    adopted: bool = False


class _Worker:
    """The master's state for one slot."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: Process | None = None
        self.channel: FdChannel | None = None
        self.ready = False
        self.pending: dict[int, _Connection] = {}
        self.active = 0
        self.served = 0
        self.errors = 0
        self.restarts = 0
        self.failures = 0
        self.delays: deque[float] = deque(maxlen=_MAX_DELAYS_KEPT)
        self.finished = anyio.Event()  # its supervisor returned
        self.scope = anyio.CancelScope(shield=True)  # its supervisor's
        self.told_to_stop: FdChannel | None = None  # the channel stop() used

    @property
    def load(self) -> int:
        return len(self.pending) + self.active

    def statistics(self, stopping: bool) -> WorkerStatistics:
        return WorkerStatistics(
            index=self.index,
            pid=None if self.process is None else self.process.pid,
            available=self.ready and not stopping,
            pending=len(self.pending),
            active=self.active,
            served=self.served,
            errors=self.errors,
            restarts=self.restarts,
            failures=self.failures,
            restart_delays=tuple(self.delays),
        )


class WorkerStartError(RuntimeError):
    """A worker exited before it was ready the first time (raised on entry)."""


def _key_hash(key: object) -> int:
    data = key if isinstance(key, bytes) else str(key).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class _Ring:
    """Consistent hashing over worker slots: a slot that is down loses only its keys."""

    def __init__(self, slots: int) -> None:
        points = sorted(
            (_key_hash(f"worker {i} point {p}"), i)
            for i in range(slots)
            for p in range(_RING_POINTS)
        )
        self.hashes = [h for h, _ in points]
        self.slots = [i for _, i in points]

    def lookup(self, key: object, usable: Callable[[int], bool]) -> int | None:
        """Return the first usable slot at or after the key's point on the ring."""
        start = bisect.bisect_left(self.hashes, _key_hash(key))
        count = len(self.slots)
        seen: set[int] = set()
        for step in range(count):
            slot = self.slots[(start + step) % count]
            if slot not in seen:
                if usable(slot):
                    return slot
                seen.add(slot)
        return None


def _current_backend() -> Backend:
    """Name the event loop this code runs on, as a worker's command line does."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "trio"
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def _check_target(target: object) -> str:
    if not isinstance(target, str):
        raise TypeError(
            f'target must be a string "package.module:function", '
            f"not {type(target).__name__}"
        )
    module, sep, name = target.partition(":")
    if not sep or not module or not name.isidentifier():
        raise ValueError(
            f'target must be "package.module:function" (the worker imports it), '
            f"got {target!r}"
        )
    return target


class WorkerPool:
    """Worker processes that serve the connections the master hands them.

    ``async with WorkerPool("myapp.server:handle", workers=4) as pool:``
    starts four Python processes, each joined to this one by an
    :class:`~aiofdpass.FdChannel`, and returns once every one has imported
    the target. Each runs ``await handler(stream, meta)`` in a task of its
    own for every connection it is sent, where ``handler`` is the async
    function named by ``target`` and ``stream`` an
    :class:`anyio.abc.SocketStream` the handler's task owns (it is closed
    when the handler returns). A handler that raises is logged in the
    worker, reported to the master (logged there too) and the worker goes
    on.

    Ownership: :meth:`dispatch` makes the pool's own copy of the socket
    and keeps it until the worker acknowledges the connection. If the
    worker dies first, the connection goes to another worker (or to the
    restarted one when it was the last); it is never lost silently: one the
    pool cannot place is closed and logged with the reason. Connections a
    worker had taken die with it (the kernel closes them); the pool logs
    how many.

    A worker that dies is restarted in its slot (``restart=True``), at once
    the first time, then after ``backoff``, doubling up to
    ``max_backoff`` while it keeps dying with no connection finished in
    between (a crash loop). Leaving the ``async with`` block stops the pool
    as :meth:`stop` does.

    :param target: ``"package.module:function"``, importable in the worker
        (which gets this process's ``sys.path``).
    :param workers: how many worker processes.
    :param route: ``"least-loaded"`` (fewest connections pending or active,
        ties in turn), or a function ``route(workers, key, meta) -> index``
        that is given the :class:`WorkerStatistics` of the workers that can
        take a connection now. A ``key`` given to :meth:`dispatch` is routed
        by consistent hashing unless ``route`` is a function.
    :param restart: restart workers that die.
    :param backoff: seconds before the second restart in a row.
    :param max_backoff: the longest wait before a restart.
    :param backend: the workers' event loop, ``"asyncio"``, ``"uvloop"``
        or ``"trio"``; by default the one this process runs.
    :param env: the workers' environment; by default this process's own.
    :param drain_timeout: how long leaving the ``async with`` block lets
        workers finish their connections (:meth:`stop`).
    :raises TypeError: if ``target`` is not a string or ``route`` is
        neither a known name nor callable.
    :raises ValueError: for a malformed ``target``, ``workers < 1``, or a
        negative ``backoff``.
    """

    def __init__(
        self,
        target: str,
        *,
        workers: int,
        route: Literal["least-loaded"] | Route = "least-loaded",
        restart: bool = True,
        backoff: float = 0.1,
        max_backoff: float = 30.0,
        backend: Backend | None = None,
        env: dict[str, str] | None = None,
        drain_timeout: float = 30.0,
    ) -> None:
        self._target = _check_target(target)
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a positive int, got {workers!r}")
        if route != "least-loaded" and not callable(route):
            raise TypeError(
                f'route must be "least-loaded" or a function '
                f"route(workers, key, meta) -> index, got {route!r}"
            )
        if backoff < 0 or max_backoff < backoff:
            raise ValueError(
                f"need 0 <= backoff <= max_backoff, got {backoff}, {max_backoff}"
            )
        if backend not in (None, "asyncio", "uvloop", "trio"):
            raise ValueError(
                f'backend must be "asyncio", "uvloop" or "trio", got {backend!r}'
            )
        self._route = route
        self._restart = restart
        self._backoff = backoff
        self._max_backoff = max_backoff
        self._backend = backend
        self._env = env
        self._drain_timeout = drain_timeout
        self._workers = [_Worker(i) for i in range(workers)]
        self._ring = _Ring(workers)
        self._waiting: deque[_Connection] = deque()
        # The scope of the task that sends the waiting ones on, while it runs.
        self._drain_scope: anyio.CancelScope | None = None
        self._tg: TaskGroup | None = None
        self._started = anyio.Event()
        self._stop_event = anyio.Event()
        self._stop_record = b""
        self._stop_drain = 0.0
        self._stop_deadline = 0.0
        self._stop_done = False
        self._ready_workers = 0
        self._start_error: WorkerStartError | None = None
        self._running = False  # entered: __aenter__ returned
        self._stopping = False
        self._stopped = False
        self._next_id = 0
        self._turn = 0
        self._dispatched = 0
        self._redispatched = 0
        self._closed = 0

    # -- life cycle ------------------------------------------------------------

    async def __aenter__(self) -> WorkerPool:
        """Start the workers; return once every one is ready.

        :raises WorkerStartError: if a worker exited before it was ready
            (usually: the target cannot be imported; its stderr says why);
            the other workers are stopped then.
        :raises RuntimeError: if the pool was entered before.
        """
        if self._tg is not None or self._stopped:
            raise RuntimeError("a WorkerPool can be entered once")
        backend = self._backend or _current_backend()
        env = dict(os.environ if self._env is None else self._env)
        env[_PATH_ENV] = json.dumps(sys.path)
        command = [sys.executable, "-c", _WORKER_CODE, self._target, backend]
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        try:
            for worker in self._workers:
                self._tg.start_soon(self._supervise, worker, command, env)
            await self._started.wait()
        except BaseException as exc:
            self._cancel_supervisors()
            await self._tg.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        if self._start_error is not None:
            self._cancel_supervisors()
            await self._tg.__aexit__(None, None, None)
            raise self._start_error
        self._running = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        """Stop the pool (:meth:`stop` with the pool's ``drain_timeout``)."""
        with anyio.CancelScope(shield=True):
            await self.stop(self._drain_timeout)
        assert self._tg is not None
        return await self._tg.__aexit__(exc_type, exc, tb)

    async def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop taking connections, let the workers finish theirs, then stop them.

        Connections already sent to a worker are still served by it. Each
        worker gets ``drain_timeout`` seconds to finish its connections;
        then it cancels their handlers and exits, and a worker still
        running a few seconds after that is killed. Connections waiting
        for a worker are closed (and logged). Calling it again, also after
        a call that was cancelled (leaving the ``async with`` block does),
        goes on with what the first call started, with its
        ``drain_timeout``; once the pool has stopped it does nothing.
        It never raises: what goes wrong with a worker is logged.
        """
        if self._stop_done or self._tg is None:
            return
        if not self._stopped:
            self._stopping = self._stopped = True
            while self._waiting:
                self._close_unserved(self._waiting.popleft(), "the pool is stopping")
            self._stop_record = json.dumps({"stop": drain_timeout}).encode()
            self._stop_drain = drain_timeout
            self._stop_deadline = anyio.current_time() + drain_timeout + 5
            self._stop_event.set()
        with anyio.CancelScope(deadline=self._stop_deadline):
            # Side by side and under the deadline: the channel of a worker
            # that takes nothing (stopped, its loop blocked) may be full.
            async with anyio.create_task_group() as tg:
                for worker in self._workers:
                    tg.start_soon(self._tell_to_stop, worker)
            for worker in self._workers:
                await worker.finished.wait()
        for worker in self._workers:
            if worker.process is not None:
                logger.warning(
                    "worker %d (pid %d) did not exit %.1f s after stop: killing it",
                    worker.index,
                    worker.process.pid,
                    self._stop_drain,
                )
                with suppress(ProcessLookupError):
                    worker.process.kill()
        for worker in self._workers:
            await worker.finished.wait()
        self._cancel_supervisors()
        self._stop_done = True

    async def _tell_to_stop(self, worker: _Worker) -> None:
        """Send ``worker`` the stop record, unless its process has it already."""
        channel = worker.channel
        if channel is not None and worker.told_to_stop is not channel:
            with suppress(*_CHANNEL_ERRORS):
                await channel.send(self._stop_record)
            worker.told_to_stop = channel

    def _cancel_supervisors(self) -> None:
        """End every slot's supervisor now (each closes its channel and reaps)."""
        self._stopping = self._stopped = True
        for worker in self._workers:
            worker.scope.cancel()
        if self._drain_scope is not None:
            self._drain_scope.cancel()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()

    # -- supervision -----------------------------------------------------------

    async def _supervise(
        self,
        worker: _Worker,
        command: list[str],
        env: dict[str, str],
    ) -> None:
        """Run one slot: start its process, follow its reports, restart it.

        Shielded: cancelling the code around the pool must not cut the
        workers' channels before :meth:`stop` has let them finish.
        """
        try:
            with worker.scope:
                await self._run_slot(worker, command, env)
        finally:
            worker.finished.set()

    async def _run_slot(
        self, worker: _Worker, command: list[str], env: dict[str, str]
    ) -> None:
        first = True
        while not self._stopping:
            # A session of its own: Ctrl-C in a terminal reaches the master
            # only, which stops the workers gracefully.
            process, channel = await open_child_process(
                command, env=env, start_new_session=True
            )
            worker.process, worker.channel = process, channel
            try:
                if self._stopping:  # stop() came while we were starting it
                    await self._tell_to_stop(worker)
                with suppress(*_CHANNEL_ERRORS):
                    async for message in channel:
                        if message.nfds:  # a worker sends none: keep none
                            message.close()
                        if self._on_report(worker, message.data) and first:
                            first = False
                            self._ready_workers += 1
                            if self._ready_workers == len(self._workers):
                                self._started.set()
                # The channel ended: the worker is exiting (or was killed).
                worker.ready = False
                with anyio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                status = await process.wait()
            finally:
                worker.ready = False
                worker.process = worker.channel = None
                if process.returncode is None:
                    # Cancelled (the pool failed to start, or was cancelled
                    # while starting) with the worker alive: one stuck in
                    # its import would never exit, and we wait shielded.
                    with suppress(ProcessLookupError):
                        process.kill()
                with anyio.CancelScope(shield=True):
                    await channel.aclose()
                    await process.aclose()
            if first:
                self._start_error = WorkerStartError(
                    f"worker {worker.index} (pid {process.pid}) exited with status "
                    f"{status} before it was ready: check that {self._target!r} "
                    "imports in a fresh Python process (its stderr says why)"
                )
                self._started.set()
                return
            self._on_death(worker, process.pid, status)
            if not self._restart or self._stopping:
                return
            worker.restarts += 1
            worker.failures += 1
            delay = (
                0.0
                if worker.failures == 1
                else min(self._max_backoff, self._backoff * 2 ** (worker.failures - 2))
            )
            worker.delays.append(delay)
            if delay:
                logger.warning(
                    "worker %d died %d times in a row: restarting it in %.2f s",
                    worker.index,
                    worker.failures,
                    delay,
                )
                with anyio.move_on_after(delay):
                    await self._stop_event.wait()  # stop() ends the wait

    def _on_report(self, worker: _Worker, data: bytes) -> bool:
        """Apply one report from a worker; return whether it was "ready".

        Never waits: the slot's supervisor calls it between reads, and a
        supervisor that waited to send its worker something while that
        worker waited for room to report would wait for ever.
        """
        if data.startswith(_TAKEN_HEAD) and data.endswith(_TAKEN_TAIL):
            self._on_taken(worker, int(data[len(_TAKEN_HEAD) : -len(_TAKEN_TAIL)]))
            return False
        if data.startswith(_DONE_HEAD) and data.endswith(_DONE_TAIL):
            self._on_done(worker, int(data[len(_DONE_HEAD) : -len(_DONE_TAIL)]), None)
            return False
        report = json.loads(data)
        if "taken" in report:
            self._on_taken(worker, report["taken"])
        elif "done" in report:
            self._on_done(worker, report["done"], report.get("error"))
        elif "ready" in report:
            worker.ready = True
            self._send_waiting()
            return True
        return False

    def _on_taken(self, worker: _Worker, number: int) -> None:
        connection = worker.pending.pop(number)
        connection.fd.close()  # the worker has its own copy now
        worker.active += 1

    def _on_done(self, worker: _Worker, number: int, error: str | None) -> None:
        worker.active -= 1
        worker.served += 1
        worker.failures = 0
        if error is not None:
            worker.errors += 1
            logger.warning(
                "worker %d: the handler failed on connection %s: %s",
                worker.index,
                number,
                error,
            )

    def _on_death(self, worker: _Worker, pid: int, status: int) -> None:
        """Re-dispatch what a dead worker had not taken; log what it lost.

        Taking a connection out of ``pending`` makes it the pool's (see
        :meth:`_send`); the orphans go to the front of the waiting queue,
        which a task of the pool sends on, so no await comes between
        taking them and handing them on.
        """
        # Emptied, so that a send still waiting on the dead worker's channel
        # finds its connection gone; and replaced, so that it never finds
        # it again in the next process's (the queue may send it there).
        taken, worker.pending = worker.pending, {}
        orphans = list(taken.values())
        taken.clear()
        lost, worker.active = worker.active, 0
        if self._stopping and status == 0 and not lost and not orphans:
            logger.info("worker %d (pid %d) stopped", worker.index, pid)
        else:
            logger.warning(
                "worker %d (pid %d) exited with status %s: %d connection(s) it had "
                "taken and not finished died with it; %d it had not taken are %s",
                worker.index,
                pid,
                status,
                lost,
                len(orphans),
                "closed" if self._stopping else "re-dispatched",
            )
        if self._stopping:
            for connection in orphans:
                self._close_unserved(connection, "its worker died while stopping")
            return
        self._redispatched += len(orphans)
        self._waiting.extendleft(reversed(orphans))  # before those that came later
        self._send_waiting()

    def _usable(self, worker: _Worker) -> bool:
        """Whether ``worker`` takes connections now."""
        return worker.ready and worker.channel is not None

    def _send_waiting(self) -> None:
        """Start sending the waiting connections on, if a worker can take them.

        A task of the pool's does it (:meth:`_drain_waiting`), never a
        slot's supervisor: that one must go on reading its worker's
        reports, or a worker that waits for room to report and a master
        that waits for room to send to it would wait for each other.
        """
        if not self._waiting or self._drain_scope is not None or self._stopping:
            return
        if any(self._usable(w) for w in self._workers):
            assert self._tg is not None
            self._drain_scope = anyio.CancelScope(shield=True)
            self._tg.start_soon(self._drain_waiting, self._drain_scope)
        elif not self._restart:
            while self._waiting:
                self._close_unserved(self._waiting.popleft(), "no worker is running")

    async def _drain_waiting(self, scope: anyio.CancelScope) -> None:
        """Send the waiting connections to workers, oldest first.

        Shielded, as the supervisors are: cancelling the code around the
        pool must not stop connections from reaching a worker before
        :meth:`stop` has had its say. It ends when none is left, when no
        worker can take the next one (the next "ready" starts it again), or
        when the pool stops (:meth:`stop` closes those still waiting).
        """
        try:
            with scope:
                while self._waiting and not self._stopping:
                    connection = self._waiting.popleft()
                    try:
                        sent = await self._send(connection)
                    except BaseException:
                        # Cancelled: the pool is ending (stop() is done).
                        if not connection.adopted:
                            self._close_unserved(connection, "the pool is stopping")
                        raise
                    if not sent:  # no worker can take it now: it stays first
                        self._waiting.appendleft(connection)
                        break
        finally:
            self._drain_scope = None
            self._send_waiting()  # restart=False and no worker left: close them

    # -- dispatch --------------------------------------------------------------

    async def dispatch(
        self,
        sock: socket.socket | int,
        meta: dict[str, Any] | None = None,
        *,
        key: object = None,
        close: bool = False,
    ) -> None:
        """Hand the connected socket ``sock`` to a worker, with ``meta``.

        The pool makes its own copy of the socket and keeps it until the
        worker acknowledges; ``sock`` is the caller's to close once this
        returns (``close=True`` closes it then: a socket object, or the
        number). The worker is the least
        loaded one, the one ``key`` hashes to (the same worker for the same
        key while it lives; while it is down its keys go to the next one on
        the ring), or the one ``route`` picks. If every worker is down, the
        connection waits in the pool for the first one to be ready
        (``restart=True``) or is closed and logged.

        Returns once the record is committed to the worker's channel (or
        the connection waits in the pool), not when the worker took it; it
        waits only while that channel's queue is full. If the worker dies
        while it waits, the connection goes to another worker and
        ``dispatch`` returns as if it had gone there first.

        If it raises or is cancelled, nothing was sent and ``sock`` is
        still the caller's, also with ``close=True``. One exception: a
        dispatch cancelled while it waits on a worker that dies at that
        moment may find that the pool has already taken the connection
        over to send it on; it then raises the cancellation and the
        connection is served all the same (and counted as dispatched).
        Either way ``sock`` itself stays the caller's to close; never
        dispatch a socket again after a cancelled dispatch of it.

        :param meta: JSON-able metadata; the handler gets it as a ``dict``.
        :param key: route by consistent hashing of ``str(key)`` (or the
            bytes themselves).
        :raises TypeError: if ``meta`` is not a JSON-able ``dict``, or
            ``sock`` is not a stream socket.
        :raises ValueError: if ``route`` returned an index that is not one
            of the workers it was given (and whatever ``route`` raises).
        :raises aiofdpass.LimitError: if ``meta`` as JSON is over 64 KiB.
        :raises anyio.ClosedResourceError: if the pool is not running (not
            entered yet, still starting, or stopping), or every worker has
            exited and ``restart=False``; the caller keeps ``sock``.
        :raises OSError: if ``sock`` is closed (``EBADF``).
        """
        self._check_running()
        meta = {} if meta is None else meta
        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, not {type(meta).__name__}")
        connection_id, record = self._record(meta)
        if isinstance(sock, socket.socket):
            number = sock.fileno()
            if number < 0:
                raise OSError(errno.EBADF, "sock is closed")
            is_stream = sock.type == socket.SOCK_STREAM
        else:
            number = sock
            is_stream = stat.S_ISSOCK(os.fstat(number).st_mode)
        # A descriptor the worker cannot make a socket of would crash every
        # worker it is re-dispatched to, in turn.
        if not is_stream:
            raise TypeError(
                f"sock must be a connected stream socket; descriptor {number} "
                "is not one (it is still yours)"
            )
        await self._hand_over(Fd(os.dup(number)), connection_id, meta, record, key)
        if close:
            if isinstance(sock, int):
                os.close(sock)
            else:
                sock.close()

    async def _dispatch_accepted(self, number: int, host: str, port: int) -> None:
        """Dispatch the connection :func:`serve_tcp` accepted as ``number``.

        The pool owns ``number`` from the call on, as its own copy (no
        duplicate to make; it is closed if this raises). What ``accept``
        gave needs no checks: a TCP stream socket, and a peer whose address
        is an IP literal (digits, hex digits, dots and colons), which goes
        into the record's JSON as it is.
        """
        fd = Fd._adopt(number)
        try:
            self._check_running()
        except BaseException:
            fd.close()
            raise
        self._next_id += 1
        record = b'{"id": %d, "meta": {"peer": ["%s", %d]}}' % (
            self._next_id,
            host.encode(),
            port,
        )
        meta = {"peer": [host, port]}
        await self._hand_over(fd, self._next_id, meta, record, None)

    def _check_running(self) -> None:
        if not self._running or self._stopping:
            raise ClosedResourceError(
                "the WorkerPool is not running (enter it with `async with`, "
                "and dispatch before stop()); the socket is still yours"
            )
        if not self._restart and all(w.process is None for w in self._workers):
            raise ClosedResourceError(
                "every worker of this WorkerPool has exited and restart=False: "
                "nothing can serve the connection; the socket is still yours"
            )

    def _record(self, meta: dict[str, Any]) -> tuple[int, bytes]:
        """Give the next connection its number; return it and its record."""
        try:
            encoded = json.dumps(meta).encode()
        except (TypeError, ValueError) as exc:
            raise TypeError(f"meta must be JSON-able: {exc}") from None
        self._next_id += 1
        record = b'{"id": %d, "meta": %b}' % (self._next_id, encoded)
        if len(record) > DIRECT_BYTES:
            # A record this large is written from the caller's buffer, and a
            # cancelled dispatch could leave it half written: the worker
            # would take the broken channel for a dead master and drop
            # every connection it serves. Small records are all or nothing.
            raise LimitError(
                f"meta is {len(record)} bytes as JSON, over the pool's limit of "
                f"{DIRECT_BYTES}: pass a reference to it; the socket is still yours"
            )
        return self._next_id, record

    async def _hand_over(
        self,
        fd: Fd,
        connection_id: int,
        meta: dict[str, Any],
        record: bytes,
        key: object,
    ) -> None:
        """Send the pool's copy ``fd`` of a connection on, or hold it.

        ``fd`` is the pool's from the call on: if this raises it is closed,
        unless the pool took the connection over meanwhile (see
        :meth:`dispatch`).
        """
        connection = _Connection(connection_id, fd, meta, record, key)
        try:
            sent = await self._send(connection, strict=True)
        except BaseException:
            if connection.adopted:  # the pool sends it on (see dispatch)
                self._dispatched += 1
            else:
                fd.close()
            raise
        if not sent:
            self._hold(connection)
        self._dispatched += 1

    def _choose(
        self, connection: _Connection, tried: set[int], strict: bool
    ) -> _Worker | None:
        """Pick the worker for ``connection`` among those available, not tried."""

        def usable(index: int) -> bool:
            return index not in tried and self._usable(self._workers[index])

        if callable(self._route):
            candidates = [w for w in self._workers if usable(w.index)]
            if not candidates:
                return None
            stats = [w.statistics(self._stopping) for w in candidates]
            try:
                index = self._route(stats, connection.key, connection.meta)
            except Exception as exc:
                if strict:
                    raise  # dispatch() raises it; the caller keeps its socket
                # Re-dispatching for a dead worker, in its slot's supervisor:
                # the connection still needs a worker, and the pool its
                # supervisor.
                index, message = -1, f"route raised {exc!r}"
            else:
                message = (
                    f"route returned {index!r}, not the index of one of the "
                    f"workers it was given ({[w.index for w in candidates]})"
                )
            chosen = [w for w in candidates if w.index == index]
            if chosen:
                return chosen[0]
            if strict:
                raise ValueError(message)
            logger.error(
                "%s: sending connection %d to the least loaded", message, connection.id
            )
        elif connection.key is not None:
            slot = self._ring.lookup(connection.key, usable)
            return None if slot is None else self._workers[slot]
        count = len(self._workers)
        best: _Worker | None = None
        self._turn = (self._turn + 1) % count
        for step in range(count):
            worker = self._workers[(self._turn + step) % count]
            if usable(worker.index) and (best is None or worker.load < best.load):
                best = worker
        return best

    async def _send(self, connection: _Connection, *, strict: bool = False) -> bool:
        """Send ``connection`` to a worker: ``False`` if none can take it now.

        ``True`` once it is sent (or, not ``strict``, closed and logged:
        see below); ``False`` leaves it with the caller.

        While the send waits, the connection is in the chosen worker's
        ``pending``, and whoever takes it out of there owns it. If the
        worker dies meanwhile, its supervisor may take it first
        (:meth:`_on_death`): the pool sends it on, and this returns
        ``True``, or, cancelled, raises with ``adopted`` set. Otherwise a
        send that raised sent nothing and the connection is the caller's
        again: another worker is tried if that one's channel is gone. An
        error about the record itself (over the channel's limits, EMFILE
        for its copy) is raised with ``strict``, or closes the connection
        and is logged.
        """
        connection.adopted = False
        tried: set[int] = set()
        while True:
            worker = self._choose(connection, tried, strict)
            if worker is None:
                return False
            channel = worker.channel
            assert channel is not None
            pending = worker.pending  # _on_death empties and replaces a dead one's
            pending[connection.id] = connection
            try:
                await channel.send(connection.record, [connection.fd])
            except BaseException as exc:
                if pending.pop(connection.id, None) is None:
                    # Its worker died and the pool took it: sent, as far as
                    # the caller is concerned (it is served elsewhere).
                    if isinstance(exc, Exception):
                        return True
                    connection.adopted = True
                    raise
                if isinstance(exc, _WORKER_GONE):
                    tried.add(worker.index)  # nothing was sent: try another
                    continue
                if strict or not isinstance(exc, Exception):
                    raise  # the caller still owns it
                # About the record: no other worker would take it either.
                self._close_unserved(connection, f"sending it failed: {exc!r}")
            return True

    def _hold(self, connection: _Connection) -> None:
        """Keep ``connection`` until a worker is ready, or close it if none will be."""
        if self._restart and not self._stopping:
            self._waiting.append(connection)  # the next worker ready takes it
        else:
            self._close_unserved(connection, "no worker is running")

    def _close_unserved(self, connection: _Connection, reason: str) -> None:
        self._closed += 1
        logger.warning(
            "closing connection %d (meta %s) unserved: %s",
            connection.id,
            connection.meta,
            reason,
        )
        connection.fd.close()

    def statistics(self) -> PoolStatistics:
        """Return the pool's counters now: per worker and in total; never raises."""
        return PoolStatistics(
            workers=tuple(w.statistics(self._stopping) for w in self._workers),
            dispatched=self._dispatched,
            redispatched=self._redispatched,
            waiting=len(self._waiting),
            closed=self._closed,
        )


# -- the one-call server -------------------------------------------------------

# socket.accept() wraps the new descriptor in a socket object (a
# getsockname() call and two enum conversions) that serve_tcp would only
# take the number out of again: the number and the address, as accept()
# itself gets them.
_accept: Callable[[socket.socket], tuple[int, Any]] = socket.socket._accept  # type: ignore[attr-defined]


async def serve_tcp(
    host: str,
    port: int,
    target: str,
    *,
    workers: int,
    route: Literal["least-loaded"] | Route = "least-loaded",
    restart: bool = True,
    backend: Backend | None = None,
    backlog: int = socket.SOMAXCONN,
    drain_timeout: float = 30.0,
    task_status: TaskStatus[tuple[str, int]] = TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` and hand every connection to a :class:`WorkerPool`.

    The master accepts and dispatches each connection with the metadata
    ``{"peer": [host, port]}``; the workers run ``target`` on it. Runs
    until cancelled, then stops the pool (finishing connections for up to
    ``drain_timeout`` seconds). A connection whose dispatch raises (out of
    descriptors, a ``route`` that raised) is closed and logged, and the
    loop goes on. The accepted descriptor itself is the pool's copy of the
    connection: the master makes no duplicate. With ``await
    task_group.start(serve_tcp, ...)`` the start value is the bound
    ``(host, port)`` (useful with port 0).

    :param host: the address to listen on (``"::"`` for IPv6).
    :param port: the TCP port; ``0`` lets the kernel pick one.
    :param target: ``"package.module:function"``: see :class:`WorkerPool`.
    :param workers: how many worker processes.
    :param backlog: the listening socket's accept queue.
    :raises OSError: if the address cannot be bound.

    The other parameters are :class:`WorkerPool`'s.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, port), family=family, backlog=backlog) as listener:
        listener.setblocking(False)
        pool = WorkerPool(
            target,
            workers=workers,
            route=route,
            restart=restart,
            backend=backend,
            drain_timeout=drain_timeout,
        )
        async with pool:
            bound = listener.getsockname()
            task_status.started((bound[0], bound[1]))
            while True:
                await anyio.wait_readable(listener)
                for _ in range(64):  # then let the loop run other tasks
                    try:
                        number, peer = _accept(listener)
                    except BlockingIOError:
                        break
                    except (ConnectionAbortedError, ConnectionResetError):
                        continue  # the client gave up while it was queued
                    except OSError as exc:  # EMFILE, ENFILE, ENOBUFS...
                        logger.error("accept failed: %s; retrying in 0.1 s", exc)
                        await anyio.sleep(0.1)
                        break
                    try:
                        await pool._dispatch_accepted(number, peer[0], peer[1])
                    except ClosedResourceError:
                        raise  # every worker exited and restart=False
                    except Exception as exc:
                        # One connection's failure (a route that raised) is
                        # not the server's: it was closed; go on accepting.
                        logger.error(
                            "closing the connection from %s unserved: %r",
                            peer,
                            exc,
                        )


# -- the worker ----------------------------------------------------------------


def _load_target(target: str) -> Handler:
    module_name, _, name = target.partition(":")
    handler: Handler = getattr(importlib.import_module(module_name), name)
    if not callable(handler):
        raise TypeError(f"{target} is not callable")
    return handler


def _worker_main() -> None:
    """Run a worker process (``python -c``; argv: target, backend)."""
    target, backend = sys.argv[1], sys.argv[2]
    for entry in reversed(json.loads(os.environ.pop(_PATH_ENV, "[]"))):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    handler = _load_target(target)
    options = {"use_uvloop": True} if backend == "uvloop" else {}
    anyio.run(
        _run_worker,
        handler,
        backend="trio" if backend == "trio" else "asyncio",
        backend_options=options,
    )


async def _run_worker(handler: Handler, channel: FdChannel | None = None) -> None:
    """Serve the connections the master sends over ``channel`` until it stops us.

    This is what a worker process runs (``channel`` defaults to
    :func:`~aiofdpass.channel_from_env`). After ``{"stop": seconds}`` it
    finishes its connections within that time and returns; if the master
    goes away without a stop it cancels them at once and returns, so no
    worker outlives its master.
    """
    channel = channel_from_env() if channel is None else channel
    async with channel, anyio.create_task_group() as tg:
        drain: float | None = None
        with suppress(*_CHANNEL_ERRORS):
            await channel.send(json.dumps({"ready": os.getpid()}).encode())
            async for message in channel:
                with message:
                    order = json.loads(message.data)
                    if "stop" in order:
                        drain = float(order["stop"])
                        break
                    sock = message.fds[0].to_socket()  # ours now
                tg.start_soon(_serve_one, handler, channel, sock, order)
        if drain is None:
            tg.cancel_scope.cancel()  # the master is gone: so are we
        else:
            tg.cancel_scope.deadline = anyio.current_time() + drain


async def _serve_one(
    handler: Handler, channel: FdChannel, sock: socket.socket, order: dict[str, Any]
) -> None:
    """Take one connection, run the handler on it, report when it ends.

    The task acknowledges the connection ("taken"), not the loop that
    receives them: that loop reads all the records that one read brought
    before any of these tasks runs, so their acknowledgements are sent
    together (the channel writes what is sent between two reads in one
    ``sendmsg``), not one system call and one wake-up of the master each.
    """
    try:
        await channel.send(_TAKEN % order["id"])
    except _CHANNEL_ERRORS:
        sock.close()  # the master is gone: so are we, soon
        return
    except BaseException:
        sock.close()
        raise
    error: str | None = None
    try:
        # anyio refuses a socket that is no longer connected: a client that
        # reset the connection before we got here (getpeername: ENOTCONN).
        # That ends this connection only, not the worker and its others.
        stream = await SocketStream.from_socket(sock)
    except Exception as exc:
        sock.close()
        logger.warning("connection %d ended before it was served: %s", order["id"], exc)
        error = repr(exc)
    except BaseException:
        sock.close()
        raise
    else:
        try:
            async with stream:
                await handler(stream, order["meta"])
        except Exception as exc:
            logger.exception("the handler failed on connection %d", order["id"])
            error = repr(exc)
    with suppress(*_CHANNEL_ERRORS):
        if error is None:
            await channel.send(_DONE % order["id"])
        else:
            report = {"done": order["id"], "error": error}
            await channel.send(json.dumps(report).encode())
