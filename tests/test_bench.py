"""The benchmark harness runs (quick mode); no timing is asserted here."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent


def run_quick(script: str, out: Path, *args: str) -> str:
    """Run a benchmark script's quick mode; return its output."""
    command = [sys.executable, str(ROOT / "bench" / script), "--quick"]
    result = subprocess.run(
        [*command, "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_quick_bench_runs_every_implementation(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    stdout = run_quick("bench.py", out, "--workloads", "w2,w4")
    assert "| W2 ping-pong" in stdout
    assert "| trio | " in stdout  # the ratios the targets use
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


WRK_OUTPUT = """\
Running 1s test @ http://127.0.0.1:4000/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    14.20ms    5.01ms  34.02ms   70.00%
    Req/Sec     3.27k   210.00     3.50k    80.00%
  Latency Distribution
     50%  850.00us
     75%   16.00ms
     90%   20.00ms
     99%    1.20s
  3300 requests in 1.01s, 400.00KB read
  Socket errors: connect 0, read 2, write 1, timeout 0
  Non-2xx or 3xx responses: 4
Requests/sec:   3255.10
Transfer/sec:    396.00KB
"""


def test_prefork_bench_reads_wrk_output() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        prefork_wrk = importlib.import_module("prefork_wrk")
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert prefork_wrk.parse_wrk(WRK_OUTPUT) == {
        "requests_per_s": 3255.10,
        "p50_ms": 0.85,
        "p99_ms": 1200.0,
        "errors": 7,
        "requests": 3300,
    }
    with pytest.raises(ValueError, match="not wrk's output"):
        prefork_wrk.parse_wrk("Segmentation fault")


@pytest.mark.skipif(
    shutil.which("wrk") is None,
    reason="wrk is not installed (make bench-prefork installs it with apt-get)",
)
def test_quick_prefork_bench_runs_every_server(tmp_path: Path) -> None:
    out = tmp_path / "prefork.json"
    run_quick("prefork_wrk.py", out, "--workers", "1")
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"single process", "pool N=1", "reuseport N=1"}
    for loads in summary.values():
        assert set(loads) == {"keepalive", "close", "cpu"}
        assert all(row["requests_per_s"] > 0 for row in loads.values())
