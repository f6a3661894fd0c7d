from __future__ import annotations

import gc
import os
from collections.abc import Iterator

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
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the directory's own descriptor, gone by now
    return fds


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
