"""What every example shares: ``--backend``, running on it, tagged output, C peers."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.abc

import aiofdpass

BACKENDS = ("asyncio", "uvloop", "trio")


def say(who: str, text: str) -> None:
    """Print a line tagged with the process it comes from."""
    print(f"[{who} pid {os.getpid()}] {text}", flush=True)


def run(func: Callable[..., Awaitable[Any]], *args: object, backend: str) -> Any:
    """Run ``func(*args)`` on ``backend`` (uvloop is asyncio with uvloop's loop)."""
    options = {"use_uvloop": True} if backend == "uvloop" else {}
    name = "trio" if backend == "trio" else "asyncio"
    return anyio.run(func, *args, backend=name, backend_options=options)


def argument_parser(doc: str | None) -> argparse.ArgumentParser:
    """Return a parser described by the first line of ``doc``, with ``--backend``."""
    parser = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="asyncio")
    return parser


@contextlib.contextmanager
def built_c_program(source: Path) -> Iterator[Path]:
    """Compile the C file ``source``; yield the binary.

    The compiler is ``$CC``, else the first of cc, gcc, clang on PATH. The
    binary lives in a temporary directory, removed on the way out. A failed
    build raises ``RuntimeError`` with the compiler's messages.
    """
    found = (shutil.which(name) for name in ("cc", "gcc", "clang"))
    compiler = shlex.split(os.environ.get("CC") or next(filter(None, found), "cc"))
    with tempfile.TemporaryDirectory(prefix="aiofdpass-c-") as tmp:
        binary = Path(tmp) / source.stem
        result = subprocess.run(
            [*compiler, "-std=c11", "-Wall", "-Wextra", "-O2", "-o", binary, source],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"building {source.name} failed:\n{result.stderr}")
        yield binary


async def start_c_peer(
    binary: Path, *args: str
) -> tuple[anyio.abc.Process, aiofdpass.FdStream]:
    """Start ``binary`` on one end of a socket pair (its standard input).

    Returns the process (its standard output is a pipe, standard error is
    this process's) and an :class:`aiofdpass.FdStream` on the other end.
    Close the stream before waiting for the process: it ends at end of file.
    """
    ours, theirs = socket.socketpair()
    stream = aiofdpass.FdStream.from_socket(ours)
    try:
        with theirs:
            process = await anyio.open_process(
                [binary, *args], stdin=theirs.fileno(), stderr=None
            )
    except BaseException:
        await stream.aclose()
        raise
    return process, stream


def run_recipe(
    doc: str | None,
    checked_run: Callable[[], Awaitable[tuple[list[str], bool]]],
    name: str,
    claim: str,
) -> None:
    """Be a recipe's ``main``: ``--backend``, ``--self-test``, the exit status.

    ``checked_run()`` runs the scenario and returns its report and whether
    it is what the recipe expects; the self-test prints PASS or FAIL with
    ``claim`` and exits 1 on failure.
    """
    parser = argument_parser(doc)
    parser.add_argument("--self-test", action="store_true", help="check the outcome")
    args = parser.parse_args()
    report, ok = run(checked_run, backend=args.backend)
    for line in report:
        print(line)
    if args.self_test:
        verdict = "PASS" if ok else "FAIL"
        print(f"{name} self-test: {verdict}: {claim} ({args.backend})")
        sys.exit(0 if ok else 1)
