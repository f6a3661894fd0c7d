from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator

import anyio
import pytest

# Every async test runs on each of these (anyio's own pytest plugin).
BACKENDS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="asyncio+uvloop"),
    pytest.param("trio", id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


def _open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        # The directory's own descriptor is gone by the time we read it.
        with contextlib.suppress(OSError):
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return fds


@pytest.fixture(scope="session", autouse=True)
def warm_up_backends() -> None:
    """Run each event loop once before any leak check.

    uvloop keeps a pipe pair for the whole process from its first loop on;
    opening it here keeps it out of every test's before/after comparison.
    """
    for backend, options in (("asyncio", {"use_uvloop": True}), ("trio", {})):
        anyio.run(anyio.sleep, 0, backend=backend, backend_options=options)


@pytest.fixture(autouse=True)
def no_fd_leaks() -> Iterator[None]:
    """Fail any test that leaves more descriptors open than it found."""
    gc.collect()
    before = _open_fds()
    yield
    gc.collect()
    after = _open_fds()
    leaked = {fd: target for fd, target in after.items() if before.get(fd) != target}
    if len(after) > len(before):
        pytest.fail(f"test leaked descriptors: {leaked}")
