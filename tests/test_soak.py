"""A short soak of the service as make serve runs it (benchmarks/soak.py, its own private service):
8,000 never-repeating texts from 16 clients, and the replica's memory after the warm-up stays flat."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from deployments.engine.allocator import find_jemalloc
from tests.conftest import REPO, free_port

pytestmark = [pytest.mark.ray, pytest.mark.long]  # minutes: make test-long, not make test

# RSS growth of the replica from 2,000 to ~8,000 texts on the 2-core machine (docs/operations.md, "Memory"):
# +67 MB now; +153 MB (jemalloc) and +136 MB (glibc malloc) with OpenVINO's default kernel cache.
BOUND_MB = 100


@pytest.mark.skipif(find_jemalloc() is None, reason="jemalloc is not installed (make setup installs it)")
def test_replica_memory_stays_flat_under_fresh_traffic():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "benchmarks/soak.py", "--texts", "8000", "--warmup-texts", "2000", "--minutes", "10",
         "--sample-s", "1", "--port", str(free_port())],
        cwd=REPO, capture_output=True, text=True, timeout=900, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "errors 0," in out.stdout and "allocator jemalloc" in out.stdout, out.stdout
    row = r"^\| (\S+ \(pid \d+\)) \| (\d+) \| (\d+) \| ([+-]\d+) \| (\d+) \| (\d+) \|$"
    rows = re.findall(row, out.stdout, re.M)
    assert rows, out.stdout
    for name, warm, _end, growth, peak, since_start in rows:
        assert int(warm) > 100, (name, warm)  # a replica holding a model, sampled
        assert int(growth) <= BOUND_MB, out.stdout
        assert int(since_start) >= int(peak) - 1, out.stdout  # the high-water mark covers every sample
