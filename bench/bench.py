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
    "anyio-uvloop",
    "anyio-trio",
    "aiofdpass-asyncio",
    "aiofdpass-uvloop",
    "aiofdpass-trio",
    "floor-asyncio",
    "floor-uvloop",
    "floor-trio",
]
LABELS = {
    "stdlib": "(a) stdlib blocking",
    "anyio-asyncio": "(b) anyio asyncio",
    "anyio-uvloop": "(b) anyio uvloop",
    "anyio-trio": "(b) anyio trio",
    "aiofdpass-asyncio": "aiofdpass asyncio",
    "aiofdpass-uvloop": "aiofdpass uvloop",
    "aiofdpass-trio": "aiofdpass trio",
    "floor-asyncio": "(c) floor asyncio",
    "floor-uvloop": "(c) floor uvloop",
    "floor-trio": "(c) floor trio",
    "base-asyncio": "baseline asyncio",
    "base-uvloop": "baseline uvloop",
    "base-trio": "baseline trio",
}
# The floors (bench/floors.py: the event loop alone, no library) exist for
# these workloads only.
FLOORS = {"floor-asyncio": {"w2", "w4"}, "floor-uvloop": {"w2"}, "floor-trio": {"w2"}}
WORKLOADS = {
    # name: (title, unit, full count, quick count)
    "w1": ("W1 one-way 64 B + 1 fd", "records/s", 200_000, 20_000),
    "w2": ("W2 ping-pong 64 B + 1 fd", "round trips/s", 50_000, 5_000),
    "w3": ("W3 bulk 1 MiB + 1 fd", "MB/s", 2_000, 200),
    "w4": ("W4 many fds: 64 per record", "fds/s", 10_000, 1_000),
    "w5": ("W5 fan-in, 100 connections", "records/s", 100_000, 10_000),
}
TIMEOUT = 600


def applies(impl: str, workload: str) -> bool:
    """Whether ``impl`` runs ``workload`` (a floor exists only for some)."""
    return impl not in FLOORS or workload in FLOORS[impl]


def run_once(
    impl: str, workload: str, n: int, baseline_src: str | None = None
) -> dict[str, Any]:
    """Run one sender/receiver pair; return the timed side's report."""
    env = dict(os.environ)
    if impl.startswith("base-"):
        assert baseline_src, "base-* implementations need --baseline-src"
        env["PYTHONPATH"] = baseline_src
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
    parser.add_argument(
        "--baseline-src",
        help="also run base-asyncio/uvloop/trio: aiofdpass from this src directory "
        "(e.g. a worktree of the previous release), for before/after in one run",
    )
    parser.add_argument(
        "--replot", type=Path, help="only draw --plot again from this results file"
    )
    args = parser.parse_args()
    if args.replot:
        if args.plot is None:
            parser.error("--replot needs --plot PATH (where to draw the chart)")
        replot(args.replot, args.plot)
        return
    reps = args.reps or (1 if args.quick else 5)
    workloads = args.workloads.split(",")
    impls = args.impls.split(",")
    if args.baseline_src:
        impls += ["base-asyncio", "base-uvloop", "base-trio"]
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
                if not applies(impl, w):
                    continue
                result = run_once(impl, w, n, args.baseline_src)
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
    print_targets(summary)
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
            if not rates:
                continue
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
            if impl not in by_impl:
                cells.append("-")
                continue
            s = by_impl[impl]
            ratio = f" **{s['ratio']:.2f}x**" if s["ratio"] is not None else ""
            cells.append(f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])}){ratio}")
        print(f"| {WORKLOADS[w][0]} ({WORKLOADS[w][1]}) | " + " | ".join(cells) + " |")
    for w in ("w1", "w3"):
        if w in summary:
            rss = ", ".join(
                f"{LABELS[i]} {summary[w][i]['rss_kib'] / 1024:.0f} MiB"
                for i in impls
                if i in summary[w]
            )
            print(f"\npeak receiver RSS {w.upper()}: {rss}")


def ratio(summary: dict[str, Any], w: str, impl: str, other: str) -> str:
    """``impl``'s median over ``other``'s in workload ``w``, if both ran."""
    by_impl = summary.get(w, {})
    if impl not in by_impl or other not in by_impl:
        return "-"
    return f"{by_impl[impl]['median'] / by_impl[other]['median']:.2f}x"


def print_targets(summary: dict[str, Any]) -> None:
    """The ratios the performance targets are stated in (same run)."""
    print("\nratios from this run:\n")
    print("| loop | W1 / (a) | W1 / anyio | W2 / floor | W2 / anyio | W4 / anyio |")
    print("|---|---|---|---|---|---|")
    for loop in ("asyncio", "uvloop", "trio"):
        ours, anyio_, floor = f"aiofdpass-{loop}", f"anyio-{loop}", f"floor-{loop}"
        print(
            f"| {loop} | {ratio(summary, 'w1', ours, 'stdlib')} "
            f"| {ratio(summary, 'w1', ours, anyio_)} "
            f"| {ratio(summary, 'w2', ours, floor)} "
            f"| {ratio(summary, 'w2', ours, anyio_)} "
            f"| {ratio(summary, 'w4', ours, anyio_)} |"
        )
    if any(k.startswith("base-") for w in summary.values() for k in w):
        print("\nagainst the baseline source (same run):\n")
        for w in summary:
            cells = [
                f"{loop} {ratio(summary, w, f'aiofdpass-{loop}', f'base-{loop}')}"
                for loop in ("asyncio", "uvloop", "trio")
            ]
            print(f"- {WORKLOADS[w][0]}: " + ", ".join(cells))


def plot(summary: dict[str, Any], impls: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5))
    workloads = list(summary)
    colors = plt.get_cmap("tab20").colors
    color = {impl: colors[k % len(colors)] for k, impl in enumerate(impls)}
    # Each workload gets a group of the bars it has (no gaps for the floors
    # that exist for W2 and W4 only), centred on its tick.
    group = 0.85
    width = group / max(sum(impl in summary[w] for impl in impls) for w in workloads)
    labelled: set[str] = set()
    for x, w in enumerate(workloads):
        present = [impl for impl in impls if impl in summary[w]]
        left = x - width * (len(present) - 1) / 2
        for k, impl in enumerate(present):
            ax.bar(
                left + k * width,
                summary[w][impl].get("ratio") or 0,
                width,
                label=None if impl in labelled else LABELS[impl],
                color=color[impl],
                edgecolor="white",
                linewidth=0.4,
                hatch="//" if impl.startswith(("floor-", "base-")) else None,
            )
            labelled.add(impl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(workloads)))
    ax.set_xticklabels([WORKLOADS[w][0] for w in workloads], fontsize=8)
    ax.set_ylabel("throughput / blocking stdlib loop (median)")
    # Outside the axes, so it never covers a bar; in the order of the table.
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(
        range(len(labels)), key=lambda i: list(LABELS.values()).index(labels[i])
    )
    ax.legend(
        [handles[i] for i in order],
        [labels[i] for i in order],
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def replot(json_path: Path, path: Path) -> None:
    """Draw the chart again from a results file (``--replot``)."""
    data = json.loads(json_path.read_text())
    summary = data["summary"]
    impls = [i for i in LABELS if any(i in by_impl for by_impl in summary.values())]
    plot(summary, impls, path)


if __name__ == "__main__":
    main()
