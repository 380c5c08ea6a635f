"""Every benchmark script runs from the repo root with tiny sizes and ends with its `<name>=<value>` line."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.browser_helpers import CHROMIUM
from tests.conftest import FIXTURE_DIR

ROOT = FIXTURE_DIR.parents[2]

RUNS = {
    "stream_efficiency": ["--lengths", "8", "--reps", "1", "--hidden", "128", "--layers", "1"],
    "per_token_overhead": ["--reps", "1"],
    "ui_updates": ["--rates", "1000,max", "--seconds", "0.2", "--engine-tokens", "16"],
    "sse_delivery": ["--tokens", "16", "--reps", "1", "--health-samples", "8", "--hidden", "128", "--layers", "1"],
    "concurrency_gain": ["--tokens", "16", "--reps", "1"],
    "gpu_serve": [],
    "gpu_serve --cpu-smoke": ["--cpu-smoke", "--tokens", "8", "--reps", "1", "--streams", "1,2,8"],
    "gpu_decode": [],
    "gpu_fp16": [],
    "gpu_decode --cpu-smoke": ["--cpu-smoke", "--prompt-lengths", "8", "--new-tokens", "4", "--reps", "1"],
    "fault_load": ["--streams", "2", "--no-browser"],
    "convert_memory": ["--hidden", "64", "--heads", "8", "--kv-heads", "2", "--intermediate", "128", "--shards", "2"],
    "one_port_memory": [],
}
NEEDS_CHROMIUM = {"one_port_memory"}  # its web face is driven by a browser, like tests/test_browser_app.py
# Over 50 s each on 2 cores (many servers and page loads even at these sizes): `pytest -m "not slow"` leaves them out.
SLOW = {"fault_load", "one_port_memory"}


@pytest.mark.parametrize("run", [pytest.param(r, marks=pytest.mark.slow) if r in SLOW else r for r in RUNS])
def test_benchmark_runs_and_prints_its_headline(run):
    name = run.split()[0]
    if name in NEEDS_CHROMIUM and not CHROMIUM.exists():
        pytest.skip(f"needs Debian chromium at {CHROMIUM}")
    result = subprocess.run(
        [sys.executable, f"benchmarks/{name}.py", *RUNS[run]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    last = result.stdout.strip().splitlines()[-1]
    value = r"skipped|\d+(\.\d+)?" if name.startswith("gpu_") else r"\d+(\.\d+)?"
    assert re.fullmatch(rf"{name}=({value})", last), result.stdout[-2000:]
    if run in ("gpu_decode", "gpu_fp16", "gpu_serve") and last.endswith("skipped"):
        assert "skipped: no CUDA" in result.stdout
