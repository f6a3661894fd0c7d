"""What every example shares: the ``--backend`` flag, running on it, tagged output."""

from __future__ import annotations

import argparse
import os
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

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
