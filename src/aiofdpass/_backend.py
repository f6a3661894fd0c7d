"""The two things anyio does not offer and the write path needs, per event loop.

``call_soon`` runs a plain callback on the next loop iteration (the deferred
flush); ``spawn`` starts a detached task that outlives the caller (the
flusher that waits for a full socket to drain). The rest of the library uses
anyio only.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import anyio.lowlevel

__all__ = ["LoopHooks", "current_hooks"]

_background: set[asyncio.Task[None]] = set()


class LoopHooks:
    """``call_soon`` and ``spawn`` for the running event loop."""

    __slots__ = ("call_soon", "spawn")

    def __init__(
        self,
        call_soon: Callable[[Callable[[], object]], object],
        spawn: Callable[[Callable[[], Awaitable[None]]], None],
    ) -> None:
        self.call_soon = call_soon
        self.spawn = spawn


def current_hooks() -> LoopHooks:
    """Return the hooks for the event loop running in this thread."""
    native = anyio.lowlevel.current_token().native_token
    if isinstance(native, asyncio.AbstractEventLoop):
        loop = native

        def spawn_asyncio(fn: Callable[[], Awaitable[None]]) -> None:
            async def run() -> None:
                await fn()

            task = loop.create_task(run())
            _background.add(task)  # keep it alive until it is done
            task.add_done_callback(_background.discard)

        return LoopHooks(loop.call_soon, spawn_asyncio)

    import trio

    assert isinstance(native, trio.lowlevel.TrioToken)

    def spawn_trio(fn: Callable[[], Awaitable[None]]) -> None:
        trio.lowlevel.spawn_system_task(fn)

    return LoopHooks(native.run_sync_soon, spawn_trio)
