"""The prefork pool against what users would pick instead, measured with wrk.

``make bench-prefork`` (``QUICK=1`` for a smoke run). For each worker count N
(1, 2 and the number of cores by default) it starts
``examples/prefork_http.py`` as: one process (``single``, the same for every
N), the master and N workers of :mod:`aiofdpass.prefork` (``pool``), and N
processes sharing the port with ``SO_REUSEPORT`` (``reuseport``). Each
server takes three loads from ``wrk``:

- ``keepalive``: ``GET /`` on 50 keep-alive connections (one dispatch per
  connection, amortised over its requests);
- ``close``: ``GET /`` with ``Connection: close`` on 50 connections (one
  dispatch per request: the worst case);
- ``cpu``: ``GET /cpu?ms=2`` (2 ms of CPU each) on 16 keep-alive connections.

Servers and loads run interleaved within each repetition (the order
rotates), so a noisy neighbour hurts them alike; the table gives medians
(min-max) over the repetitions. ``--baseline-src DIR`` also runs the pool
from another source tree (``PYTHONPATH=DIR``, e.g. ``git worktree add`` of
an older commit, its ``src``) in the same repetitions, for a before/after
comparison on equal terms. Requires ``wrk`` on PATH.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SERVER = HERE.parent / "examples" / "prefork_http.py"

LOADS = {
    # name: (path, connections, extra wrk arguments)
    "keepalive": ("/", 50, []),
    "close": ("/", 50, ["-H", "Connection: close"]),
    "cpu": ("/cpu?ms=2", 16, []),
}
UNITS = {"ms": 1.0, "us": 0.001, "s": 1000.0}


def parse_wrk(output: str) -> dict[str, float]:
    """Read requests/s, p50/p99 latency (ms), errors and requests from wrk --latency."""

    def latency(percent: str) -> float:
        match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        if match is None:
            raise ValueError(f"no {percent}% latency in wrk's output:\n{output}")
        return float(match.group(1)) * UNITS[match.group(2)]

    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    done = re.search(r"^\s+(\d+) requests in ([\d.]+)(ms|s|m)", output, re.M)
    if rate is None or done is None:
        raise ValueError(f"not wrk's output:\n{output}")
    errors = 0
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    return {
        "requests_per_s": float(rate.group(1)),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "errors": errors,
        "requests": int(done.group(1)),
    }


def start_server(
    mode: str, workers: int, backend: str, baseline_src: str | None = None
) -> tuple[subprocess.Popen[str], int]:
    """Start one server; return it and its port.

    ``pool-base`` is the pool run from ``baseline_src`` (on PYTHONPATH).
    """
    env = None
    if mode == "pool-base":
        assert baseline_src, "pool-base needs --baseline-src"
        env = {**os.environ, "PYTHONPATH": baseline_src}
        mode = "pool"
    process = subprocess.Popen(
        [
            sys.executable,
            str(SERVER),
            "--serve",
            mode,
            "--workers",
            str(workers),
            "--backend",
            backend,
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("listening on "):
        process.kill()
        raise RuntimeError(f"{mode} server did not start: {line!r}")
    return process, int(line.rsplit(":", 1)[1])


def stop_server(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run_wrk(port: int, load: str, seconds: float, threads: int) -> dict[str, float]:
    path, connections, extra = LOADS[load]
    result = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds:g}s",
            "--latency",
            *extra,
            f"http://127.0.0.1:{port}{path}",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    return parse_wrk(result.stdout)


def servers(counts: list[int], baseline: bool = False) -> list[tuple[str, int]]:
    """(mode, N) for every server to measure: single once, then pool and reuseport.

    With ``baseline``, the pool from the baseline source too (``pool-base``).
    """
    modes = ("pool", "pool-base", "reuseport") if baseline else ("pool", "reuseport")
    return [("single", 1)] + [(m, n) for n in counts for m in modes]


def median_row(samples: list[dict[str, float]]) -> dict[str, Any]:
    keys = samples[0].keys()
    row: dict[str, Any] = {k: statistics.median(s[k] for s in samples) for k in keys}
    row["min_rps"] = min(s["requests_per_s"] for s in samples)
    row["max_rps"] = max(s["requests_per_s"] for s in samples)
    row["errors"] = sum(s["errors"] for s in samples)
    return row


def label(mode: str, n: int) -> str:
    if mode == "pool-base":
        return f"pool N={n} (baseline)"
    return "single process" if mode == "single" else f"{mode} N={n}"


def table(summary: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = [
        "| server | load | requests/s (min-max) | connections/s "
        "| p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, loads in summary.items():
        for load, row in loads.items():
            conns = f"{row['requests_per_s']:.0f}" if load == "close" else "-"
            lines.append(
                f"| {name} | {load} | {row['requests_per_s']:.0f} "
                f"({row['min_rps']:.0f}-{row['max_rps']:.0f}) | {conns} | "
                f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['errors']:.0f} |"
            )
    return "\n".join(lines)


def ratios(summary: dict[str, dict[str, dict[str, Any]]], counts: list[int]) -> str:
    """The ratios the targets are stated in."""
    rps = {
        name: {load: row["requests_per_s"] for load, row in loads.items()}
        for name, loads in summary.items()
    }
    single = rps["single process"]
    lines = [
        "| N | close: pool / reuseport | cpu: pool / (N x single) | "
        "cpu: reuseport / (N x single) | keepalive: pool / reuseport |",
        "|---|---|---|---|---|",
    ]
    for n in counts:
        pool, reuse = rps[f"pool N={n}"], rps[f"reuseport N={n}"]
        lines.append(
            f"| {n} | {pool['close'] / reuse['close']:.2f}x | "
            f"{pool['cpu'] / (n * single['cpu']):.2f}x | "
            f"{reuse['cpu'] / (n * single['cpu']):.2f}x | "
            f"{pool['keepalive'] / reuse['keepalive']:.2f}x |"
        )
    if all(f"pool N={n} (baseline)" in rps for n in counts):
        lines += [
            "",
            "| N | close: pool / baseline | keepalive: pool / baseline "
            "| cpu: pool / baseline | close: baseline / reuseport |",
            "|---|---|---|---|---|",
        ]
        for n in counts:
            pool, base = rps[f"pool N={n}"], rps[f"pool N={n} (baseline)"]
            reuse = rps[f"reuseport N={n}"]
            lines.append(
                f"| {n} | {pool['close'] / base['close']:.2f}x | "
                f"{pool['keepalive'] / base['keepalive']:.2f}x | "
                f"{pool['cpu'] / base['cpu']:.2f}x | "
                f"{base['close'] / reuse['close']:.2f}x |"
            )
    return "\n".join(lines)


def plot(summary: dict[str, dict[str, dict[str, Any]]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    loads = list(LOADS)
    fig, axes = plt.subplots(1, len(loads), figsize=(5 * len(loads), 4.5))
    for ax, load in zip(axes, loads, strict=True):
        values = [summary[n][load]["requests_per_s"] for n in names]
        low = [
            v - summary[n][load]["min_rps"] for n, v in zip(names, values, strict=True)
        ]
        high = [
            summary[n][load]["max_rps"] - v for n, v in zip(names, values, strict=True)
        ]
        colors = [
            "0.5"
            if n.startswith("single")
            else "tab:cyan"
            if n.endswith("(baseline)")
            else "tab:blue"
            if n.startswith("pool")
            else "tab:orange"
            for n in names
        ]
        ax.bar(range(len(names)), values, yerr=[low, high], color=colors, capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(
            {
                "keepalive": "keep-alive GET /",
                "close": "Connection: close (1 connection/request)",
                "cpu": "GET /cpu?ms=2, keep-alive",
            }[load]
        )
        ax.set_ylabel("requests/s (median, min-max)")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workers",
        default=None,
        help="worker counts, e.g. 1,2,16 (default: 1, 2, cores)",
    )
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument(
        "--backend", default="uvloop", choices=["asyncio", "uvloop", "trio"]
    )
    parser.add_argument("--quick", action="store_true", help="1 repetition of 1 s")
    parser.add_argument("--json")
    parser.add_argument("--plot")
    parser.add_argument("--replot", help="redraw --plot from this results JSON")
    parser.add_argument(
        "--baseline-src",
        help="also run the pool from this source tree (PYTHONPATH), interleaved",
    )
    args = parser.parse_args()
    if args.replot:
        data = json.loads(Path(args.replot).read_text())
        plot(data["summary"], args.plot, data["title"])
        return
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: `make bench-prefork` installs it with apt-get")
    cores = os.cpu_count() or 1
    counts = (
        sorted({int(n) for n in args.workers.split(",")})
        if args.workers
        else sorted({1, 2, cores})
    )
    if args.quick:
        args.repeat, args.seconds = 1, 1.0
    plan = servers(counts, baseline=bool(args.baseline_src))
    samples: dict[tuple[str, int], dict[str, list[dict[str, float]]]] = {
        s: {load: [] for load in LOADS} for s in plan
    }
    loadavg = []
    for rep in range(args.repeat):
        order = plan[rep % len(plan) :] + plan[: rep % len(plan)]
        for mode, n in order:
            process, port = start_server(mode, n, args.backend, args.baseline_src)
            try:
                for load in LOADS:
                    loadavg.append(os.getloadavg()[0])
                    result = run_wrk(port, load, args.seconds, args.threads)
                    samples[(mode, n)][load].append(result)
                    print(
                        f"rep {rep + 1}/{args.repeat} {label(mode, n)} {load}: "
                        f"{result['requests_per_s']:.0f} requests/s, "
                        f"{result['errors']:.0f} errors",
                        flush=True,
                    )
            finally:
                stop_server(process)
    summary = {
        label(mode, n): {load: median_row(s) for load, s in loads.items()}
        for (mode, n), loads in samples.items()
    }
    title = (
        f"{cores} cores, Linux {platform.release()}, Python "
        f"{platform.python_version()}, {args.backend}; wrk -t{args.threads}, "
        f"{args.repeat} x {args.seconds:g} s; load average during the run "
        f"{min(loadavg):.1f}-{max(loadavg):.1f}"
    )
    print(f"\n{title}\n")
    print(table(summary))
    print()
    print(ratios(summary, counts))
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "title": title,
                    "counts": counts,
                    "summary": summary,
                    "samples": {f"{m} {n}": s for (m, n), s in samples.items()},
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                },
                indent=1,
            )
        )
    if args.plot:
        plot(summary, args.plot, title)


if __name__ == "__main__":
    main()
