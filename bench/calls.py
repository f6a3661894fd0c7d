"""Python calls per round trip of W2, measured with cProfile on one side.

``python bench/calls.py [IMPL ...]`` runs the W2 ping-pong (64 bytes + 1 fd
each way) with the echo side under cProfile and the ping side plain, in
separate processes as in bench.py, and prints the function calls the echo
side made per round trip, and the functions that made most of them.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
N = 5_000
DEFAULT = [
    "anyio-asyncio",
    "anyio-trio",
    "aiofdpass-asyncio",
    "aiofdpass-uvloop",
    "aiofdpass-trio",
]


def profile(impl: str) -> tuple[float, pstats.Stats]:
    a, b = socket.socketpair()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "echo.prof")
        echo = subprocess.Popen(
            [sys.executable, __file__, "--echo", impl, str(b.fileno()), out],
            pass_fds=[b.fileno()],
        )
        ping = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "workers.py"),
                impl,
                "w2",
                "pingpong",
                str(a.fileno()),
                str(N),
            ],
            pass_fds=[a.fileno()],
            stdout=subprocess.DEVNULL,
        )
        a.close()
        b.close()
        ping.wait()
        echo.wait()
        stats = pstats.Stats(out)
    return stats.total_calls / N, stats  # type: ignore[attr-defined]


def run_echo(impl: str, fd: int, out: str) -> None:
    sys.argv = ["workers.py", impl, "w2", "echo", str(fd), str(N)]
    sys.path.insert(0, str(HERE))
    import workers

    profiler = cProfile.Profile()
    profiler.runcall(workers.main)
    profiler.dump_stats(out)


def main() -> None:
    if sys.argv[1:2] == ["--echo"]:
        run_echo(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return
    for impl in sys.argv[1:] or DEFAULT:
        per, stats = profile(impl)
        print(f"{impl:20} {per:6.1f} Python calls per round trip (echo side)")
        if os.environ.get("TOP"):
            stats.sort_stats("ncalls").print_stats(int(os.environ["TOP"]))


if __name__ == "__main__":
    main()
