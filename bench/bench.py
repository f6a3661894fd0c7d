"""aiofdpass benchmarks against the alternatives: ``make bench`` (``QUICK=1``).

Sender and receiver are separate processes on a socketpair (W5: a listener
and 100 client connections). Implementations run interleaved within each
repetition, so a noisy neighbour hits them all alike; the table gives the
median with min-max and the ratio to baseline (a), the blocking stdlib loop,
measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "workers.py")

IMPLS = [
    "stdlib",
    "anyio-asyncio",
    "anyio-trio",
    "aiofdpass-asyncio",
    "aiofdpass-uvloop",
    "aiofdpass-trio",
]
LABELS = {
    "stdlib": "(a) stdlib blocking",
    "anyio-asyncio": "(b) anyio asyncio",
    "anyio-trio": "(b) anyio trio",
    "aiofdpass-asyncio": "aiofdpass asyncio",
    "aiofdpass-uvloop": "aiofdpass uvloop",
    "aiofdpass-trio": "aiofdpass trio",
}
WORKLOADS = {
    # name: (title, unit, full count, quick count)
    "w1": ("W1 one-way 64 B + 1 fd", "records/s", 200_000, 20_000),
    "w2": ("W2 ping-pong 64 B + 1 fd", "round trips/s", 50_000, 5_000),
    "w3": ("W3 bulk 1 MiB + 1 fd", "MB/s", 2_000, 200),
    "w4": ("W4 many fds: 64 per record", "fds/s", 10_000, 1_000),
    "w5": ("W5 fan-in, 100 connections", "records/s", 100_000, 10_000),
}
TIMEOUT = 600


def run_once(impl: str, workload: str, n: int) -> dict[str, Any]:
    """Run one sender/receiver pair; return the timed side's report."""
    env = dict(os.environ)
    cmd = [sys.executable, WORKER, impl, workload]
    if workload == "w5":
        with tempfile.TemporaryDirectory() as tmp:
            env["BENCH_SOCKET_PATH"] = os.path.join(tmp, "w5.sock")
            server = subprocess.Popen(
                [*cmd, "recv", "-1", str(n)], stdout=subprocess.PIPE, env=env, text=True
            )
            assert server.stdout is not None
            assert server.stdout.readline().strip() == "ready"
            client = subprocess.run(
                [*cmd, "send", "-1", str(n)], env=env, timeout=TIMEOUT
            )
            out, _ = server.communicate(timeout=TIMEOUT)
            if client.returncode or server.returncode:
                raise RuntimeError(f"{impl} {workload} failed")
            return dict(json.loads(out.strip().splitlines()[-1]))
    timed_role, other_role = (
        ("pingpong", "echo") if workload == "w2" else ("recv", "send")
    )
    a, b = socket.socketpair()
    with a, b:
        timed = subprocess.Popen(
            [*cmd, timed_role, str(b.fileno()), str(n)],
            pass_fds=[b.fileno()],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        other = subprocess.Popen(
            [*cmd, other_role, str(a.fileno()), str(n)], pass_fds=[a.fileno()], env=env
        )
    try:
        out, _ = timed.communicate(timeout=TIMEOUT)
        other.wait(timeout=TIMEOUT)
    finally:
        for p in (timed, other):
            if p.poll() is None:
                p.kill()
                p.wait()
    if timed.returncode or other.returncode:
        raise RuntimeError(
            f"{impl} {workload} failed: {timed.returncode} {other.returncode}"
        )
    return dict(json.loads(out.strip().splitlines()[-1]))


def fmt(x: float) -> str:
    if x >= 100_000:
        return f"{x / 1000:.0f}k"
    if x >= 10_000:
        return f"{x / 1000:.1f}k"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--reps", type=int, help="repetitions (default 5, quick 1)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--json", type=Path, help="write the raw numbers here")
    parser.add_argument("--plot", type=Path, help="draw the ratios (needs matplotlib)")
    args = parser.parse_args()
    reps = args.reps or (1 if args.quick else 5)
    workloads = args.workloads.split(",")
    impls = args.impls.split(",")
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {
        w: {i: [] for i in impls} for w in workloads
    }
    started = time.time()
    for rep in range(reps):
        for w in workloads:
            n = WORKLOADS[w][3 if args.quick else 2]
            # Rotate the order each repetition: nobody always goes first.
            order = impls[rep % len(impls) :] + impls[: rep % len(impls)]
            for impl in order:
                result = run_once(impl, w, n)
                result["rate"] = result["units"] / result["elapsed"]
                raw[w][impl].append(result)
                print(
                    f"  rep {rep + 1}/{reps} {w} {impl:18} {fmt(result['rate']):>7} "
                    f"{WORKLOADS[w][1]}",
                    file=sys.stderr,
                    flush=True,
                )
    summary = summarize(raw, impls)
    print_table(summary, impls, reps, args.quick)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": {
                        "cpus": os.cpu_count(),
                        "platform": platform.platform(),
                        "python": platform.python_version(),
                    },
                    "reps": reps,
                    "quick": args.quick,
                    "seconds": time.time() - started,
                    "summary": summary,
                    "raw": raw,
                },
                indent=1,
            )
        )
    if args.plot:
        plot(summary, impls, args.plot)


def summarize(
    raw: dict[str, dict[str, list[dict[str, Any]]]], impls: list[str]
) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for w, by_impl in raw.items():
        summary[w] = {}
        base = (
            statistics.median(r["rate"] for r in by_impl["stdlib"])
            if "stdlib" in by_impl
            else None
        )
        for impl in impls:
            rates = [r["rate"] for r in by_impl[impl]]
            med = statistics.median(rates)
            summary[w][impl] = {
                "median": med,
                "min": min(rates),
                "max": max(rates),
                "ratio": med / base if base else None,
                "rss_kib": max(r["rss_kib"] for r in by_impl[impl]),
            }
    return summary


def print_table(
    summary: dict[str, Any], impls: list[str], reps: int, quick: bool
) -> None:
    quick_note = " (QUICK)" if quick else ""
    print(f"\nmedian of {reps} run(s){quick_note}, min-max, ratio to (a)\n")
    header = "| workload | " + " | ".join(LABELS[i] for i in impls) + " |"
    print(header)
    print("|" + "---|" * (len(impls) + 1))
    for w, by_impl in summary.items():
        cells = []
        for impl in impls:
            s = by_impl[impl]
            ratio = f" **{s['ratio']:.2f}x**" if s["ratio"] is not None else ""
            cells.append(f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])}){ratio}")
        print(f"| {WORKLOADS[w][0]} ({WORKLOADS[w][1]}) | " + " | ".join(cells) + " |")
    for w in ("w1", "w3"):
        if w in summary:
            rss = ", ".join(
                f"{LABELS[i]} {summary[w][i]['rss_kib'] / 1024:.0f} MiB" for i in impls
            )
            print(f"\npeak receiver RSS {w.upper()}: {rss}")


def plot(summary: dict[str, Any], impls: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / len(impls)
    workloads = list(summary)
    for k, impl in enumerate(impls):
        ratios = [summary[w][impl]["ratio"] or 0 for w in workloads]
        ax.bar(
            [x + k * width for x in range(len(workloads))],
            ratios,
            width,
            label=LABELS[impl],
        )
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([x + width * (len(impls) - 1) / 2 for x in range(len(workloads))])
    ax.set_xticklabels([WORKLOADS[w][0] for w in workloads], fontsize=8)
    ax.set_ylabel("throughput / blocking stdlib loop (median)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
