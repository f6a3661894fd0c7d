"""The code the documentation shows runs and prints what the pages say.

Every script under docs/code is included in a page with ``literalinclude``,
so what readers copy is what runs here.
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import aiofdpass

DOCS = Path(__file__).parent.parent / "docs"
CODE = DOCS / "code"


def run(script: str, *args: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, str(CODE / script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def test_tutorial_asyncio() -> None:
    out = run("tutorial_asyncio.py").splitlines()
    assert re.fullmatch(r"b'here is a file' \(<Fd \d+>,\)", out[0])
    assert out[1:] == ["b'hello from a file\\n'"]


def test_tutorial_trio() -> None:
    assert run("tutorial_trio.py").splitlines() == [
        f"b'record {n}' b'file number {n}\\n'" for n in range(3)
    ]


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_tutorial_processes(backend: str) -> None:
    out = run("tutorial_processes.py", backend).splitlines()
    assert re.fullmatch(r"Hello, tutorial! \(pid \d+\)", out[0])
    assert out[1:] == ["answered by the worker: True", "worker exit status: 0"]


def test_api_page_documents_every_public_name() -> None:
    page = (DOCS / "api.md").read_text()
    documented = set(
        re.findall(r"^\.\. auto\w+:: aiofdpass\.(\w+)$", page, flags=re.M)
    ) | set(re.findall(r"^\.\. data:: aiofdpass\.(\w+)$", page, flags=re.M))
    assert documented == set(aiofdpass.__all__)


# Made by channel_pair/connect/listen/from_socket/from_fd, which document
# what they raise; their __init__ is not the documented way in.
MADE_BY_FACTORIES = {"FdChannel", "FdStream", "FdListener"}


def public_callables() -> list[tuple[str, object]]:
    """Every public function, constructor and method the package defines."""
    found: list[tuple[str, object]] = []
    for name in aiofdpass.__all__:
        obj = getattr(aiofdpass, name)
        if inspect.isclass(obj):
            if issubclass(obj, Exception):
                continue
            if name not in MADE_BY_FACTORIES:
                found.append((name, obj))  # the class docstring covers __init__
            for attr in dir(obj):
                member = inspect.getattr_static(obj, attr)
                if attr.startswith("_") or isinstance(member, property):
                    continue
                func = getattr(obj, attr)
                module = getattr(func, "__module__", "") or ""
                if callable(func) and module.startswith("aiofdpass"):
                    found.append((f"{name}.{attr}", func))
        elif callable(obj):
            found.append((name, obj))
    return found


def test_public_callables_document_what_they_raise() -> None:
    undocumented = [
        name
        for name, obj in public_callables()
        if ":raises " not in (inspect.getdoc(obj) or "")
        and "never raises" not in (inspect.getdoc(obj) or "")
    ]
    assert undocumented == []
    assert len(public_callables()) > 30  # the walk found the methods
