"""A pytest plugin with the ``no_fd_leaks`` fixture (entry point ``pytest11``).

Installed with aiofdpass, pytest loads it by itself. Use the fixture in a
test, or in every test of a suite through pytest's ``usefixtures`` option::

    [tool.pytest.ini_options]
    usefixtures = ["no_fd_leaks"]

A test that leaves more descriptors open than it found errors at teardown,
naming each descriptor it left behind by its ``/proc/self/fd`` target.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import pytest

from ._describe import describe

__all__ = ["no_fd_leaks"]


def _open_fds() -> dict[int, str]:
    targets = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            targets[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
    return targets


def _name(fd: int) -> str:
    try:
        return str(describe(fd))
    except OSError:
        return f"fd {fd}: closed meanwhile"


@pytest.fixture
def no_fd_leaks() -> Iterator[None]:
    """Fail the test if it leaves more descriptors open than it found.

    Garbage is collected before and after the test, so an object that
    closes its descriptor when collected does not count as a leak (its
    ``ResourceWarning`` is still reported). A descriptor opened once per
    process by a library, e.g. uvloop's first event loop, counts: open it
    before the first test (a session fixture that runs the loop once).
    Needs ``/proc/self/fd`` (Linux); elsewhere the test is skipped.
    """
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("no_fd_leaks needs /proc/self/fd (Linux)")
    gc.collect()
    before = _open_fds()
    yield
    gc.collect()
    after = _open_fds()
    if len(after) > len(before):
        new = [fd for fd, target in sorted(after.items()) if before.get(fd) != target]
        names = "\n  ".join(_name(fd) for fd in new)
        pytest.fail(
            f"the test left {len(after) - len(before)} more descriptor(s) open "
            f"than it found; close them in the test or its fixtures:\n  {names}",
            pytrace=False,
        )
