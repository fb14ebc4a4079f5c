"""The NV-Embed benchmark runs its tiny CPU shape end to end (a smoke check, not a timing)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO


def test_nvembed_benchmark_smoke_on_cpu():
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_nvembed_gpu.py", "--tiny"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout
    rows = [line for line in out.splitlines() if line.startswith("| (")]
    assert [r.split("|")[1].strip() for r in rows] == ["(a) kt_gen-like mix", "(b) passages"]
    for row in rows:
        tokens_per_s = float(row.split("|")[4].replace(",", ""))
        padding = float(row.split("|")[5])
        assert tokens_per_s > 0 and 0.5 < padding <= 1.0
