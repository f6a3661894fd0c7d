from __future__ import annotations

import anyio
import pytest

# tests/test_pytest_plugin.py runs pytest on small test files.
pytest_plugins = ["pytester"]

# Every async test runs on each of these (anyio's own pytest plugin).
BACKENDS = [
    pytest.param("asyncio", id="asyncio"),
    pytest.param(("asyncio", {"use_uvloop": True}), id="asyncio+uvloop"),
    pytest.param("trio", id="trio"),
]


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> object:
    return request.param


@pytest.fixture(scope="session", autouse=True)
def warm_up_backends() -> None:
    """Run each event loop once before any leak check.

    uvloop keeps a pipe pair for the whole process from its first loop on;
    opening it here keeps it out of every test's before/after comparison
    (the ``no_fd_leaks`` fixture of aiofdpass's pytest plugin, which
    pyproject.toml's ``usefixtures`` applies to every test).
    """
    for backend, options in (("asyncio", {"use_uvloop": True}), ("trio", {})):
        anyio.run(anyio.sleep, 0, backend=backend, backend_options=options)
