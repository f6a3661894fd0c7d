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
import aiofdpass.prefork

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


TUTORIAL_OUTPUT = {
    "tutorial_child.py": [  # step 4: open_child_process, a memfd, an eventfd
        "eventfd counter: 1",
        "words counted by the child: 7000",
        "child exit status: 0",
    ],
    "tutorial_server.py": ["hello, ann", "hello, bob", "hello, cy"],  # step 5
}


@pytest.mark.system
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("script", sorted(TUTORIAL_OUTPUT))
def test_tutorial_steps_4_and_5(script: str, backend: str) -> None:
    assert run(script, backend).splitlines() == TUTORIAL_OUTPUT[script]


COMPARE_OUTPUT = "b'a file and a pipe' 2 inheritable: [{0}, {0}]\n" + (
    "b'file contents\\n' b'pipe contents\\n'\n"
)


@pytest.mark.parametrize(
    ("script", "inheritable"),
    [
        ("compare_stdlib.py", True),
        ("compare_anyio.py", True),
        ("compare_aiofdpass.py", False),
    ],
)
def test_comparison_scripts(script: str, inheritable: bool) -> None:
    assert run(script) == COMPARE_OUTPUT.format(inheritable)


def test_comparison_pitfalls() -> None:
    assert run("compare_pitfalls.py").splitlines() == [
        "socket object, anyio:     b'a socket' 0 fds",
        "socket object, aiofdpass: b'a socket' 1 fds",
        "two messages, anyio:      b'hello world' 1 fds",
        "two messages, aiofdpass:  b'hello ' 0 fds",
        "two messages, aiofdpass:  b'world' 1 fds",
        "fd limit, anyio:          b'three' 1 fds",
        "fd limit, aiofdpass:      DescriptorsLostError",
    ]


def page_output(page: str, after: str) -> list[str]:
    """The lines of the first ``text`` block after ``after`` in a page."""
    text = (DOCS / page).read_text()
    start = text.index("```text\n", text.index(after)) + len("```text\n")
    return text[start : text.index("```", start)].splitlines()


def test_kernel_facts_script_prints_what_the_page_says() -> None:
    out = run("kernel_facts.py").splitlines()
    shown = page_output("how-descriptor-passing-works.md", "## The check script")
    # Descriptor numbers differ from run to run; everything else must match.
    assert re.fullmatch(r"numbers: sent \d+, received \d+; same file: True", out[0])
    assert out[1:] == shown[1:]


def test_pages_show_the_output_the_scripts_print() -> None:
    assert (
        page_output("coming-from-send-fds.md", "compare_pitfalls.py")
        == run("compare_pitfalls.py").splitlines()
    )
    for script in ("compare_stdlib.py", "compare_anyio.py", "compare_aiofdpass.py"):
        assert (
            page_output("coming-from-send-fds.md", script) == run(script).splitlines()
        )
    assert (
        page_output("tutorial.md", "code/tutorial_trio.py")
        == run("tutorial_trio.py").splitlines()
    )


def test_api_page_documents_every_public_name() -> None:
    page = (DOCS / "api.md").read_text()
    documented = set(
        re.findall(r"^\.\. auto\w+:: aiofdpass\.(\w+)$", page, flags=re.M)
    ) | set(re.findall(r"^\.\. data:: (?:aiofdpass\.)?(\w+)$", page, flags=re.M))
    assert documented == set(aiofdpass.__all__)
    prefork = set(
        re.findall(r"^\.\. auto\w+:: aiofdpass\.prefork\.(\w+)$", page, flags=re.M)
    )
    assert prefork == set(aiofdpass.prefork.__all__)


# Made by channel_pair/connect/listen/from_socket/from_fd, which document
# what they raise; their __init__ is not the documented way in.
MADE_BY_FACTORIES = {
    "FdChannel",
    "FdStream",
    "FdListener",
    "FdStreamListener",
    "FdDatagramSocket",
}


def public_callables() -> list[tuple[str, object]]:
    """Every public function, constructor and method the package defines."""
    found: list[tuple[str, object]] = []
    modules = [(aiofdpass, name) for name in aiofdpass.__all__]
    modules += [(aiofdpass.prefork, name) for name in aiofdpass.prefork.__all__]
    for module_of_name, name in modules:
        obj = getattr(module_of_name, name)
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


def test_every_table_on_the_pages_has_its_header_row() -> None:
    # A Markdown table without the |---| line under its header renders as
    # plain text (the benchmarks page once had one).
    for page in sorted(DOCS.rglob("*.md")):
        if "_build" in page.parts:
            continue
        lines = page.read_text().splitlines()
        for n, line in enumerate(lines):
            starts_table = line.startswith("|") and (
                n == 0 or not lines[n - 1].startswith("|")
            )
            if starts_table:
                below = lines[n + 1] if n + 1 < len(lines) else ""
                assert re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", below), (
                    f"{page.name}:{n + 1}: a table without its header row"
                )


def test_api_page_lists_every_public_member_of_its_classes() -> None:
    # docs/api.md lists members one by one, in reading order (send and
    # receive first): a method added to a class must be added there too.
    page = (DOCS / "api.md").read_text()
    blocks = re.findall(
        r"^\.\. autoclass:: aiofdpass\.(\w+)\n\n((?:   \.\. auto\w+:: \w+\n)+)",
        page,
        flags=re.M,
    )
    assert len(blocks) >= 6
    for name, block in blocks:
        listed = re.findall(r":: (\w+)$", block, flags=re.M)
        cls = getattr(aiofdpass, name)
        public = {
            attr
            for klass in cls.__mro__
            if klass.__module__.startswith("aiofdpass")
            for attr in vars(klass)
            if not attr.startswith("_")
        }
        assert sorted(listed) == sorted(public), name
        assert len(listed) == len(set(listed)), name
