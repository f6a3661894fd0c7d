"""The benchmark harness runs (quick mode); no timing is asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_runs_every_implementation(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "bench.py"),
            "--quick",
            "--workloads",
            "w2,w4",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| W2 ping-pong" in result.stdout
    assert "| trio | " in result.stdout  # the ratios the targets use
    data = json.loads(out.read_text())
    for workload in ("w2", "w4"):
        impls = data["summary"][workload]
        floors = (
            {"floor-asyncio", "floor-uvloop", "floor-trio"}
            if workload == "w2"
            else {"floor-asyncio"}
        )
        assert set(impls) == {
            "stdlib",
            "anyio-asyncio",
            "anyio-uvloop",
            "anyio-trio",
            "aiofdpass-asyncio",
            "aiofdpass-uvloop",
            "aiofdpass-trio",
            *floors,
        }
        assert all(s["median"] > 0 for s in impls.values())
        assert impls["stdlib"]["ratio"] == 1.0


def test_replot_draws_the_chart_from_the_results_file(tmp_path: Path) -> None:
    bench = str(ROOT / "bench" / "bench.py")
    chart = tmp_path / "chart.png"
    results = str(ROOT / "bench" / "results.json")
    command = [sys.executable, bench, "--replot", results, "--plot", str(chart)]
    subprocess.run(command, check=True, timeout=120)
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = subprocess.run(
        [sys.executable, bench, "--replot", results],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert missing.returncode == 2
    assert "--replot needs --plot" in missing.stderr
