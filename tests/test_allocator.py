"""The replica's allocator (deployments/engine/allocator.py): jemalloc preloaded wherever it is installed, an
operator's own preloads kept, and what a process really runs with read from its own memory maps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from deployments.engine.allocator import (
    ALLOCATOR_ENV,
    TBB_WITH_PRELOAD,
    active_allocator,
    allocator_env,
    find_jemalloc,
)
from deployments.tools.serve_local import serving_env

JEMALLOC = find_jemalloc()


def test_allocator_env_preloads_jemalloc_first_and_keeps_other_preloads():
    lib = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    assert allocator_env({}, jemalloc=lib) == {"LD_PRELOAD": lib, **TBB_WITH_PRELOAD}
    both = allocator_env({"LD_PRELOAD": "/opt/libfoo.so"}, jemalloc=lib)
    assert both["LD_PRELOAD"] == f"{lib} /opt/libfoo.so"
    assert allocator_env({"LD_PRELOAD": lib}, jemalloc=lib) == TBB_WITH_PRELOAD  # already there
    assert allocator_env({ALLOCATOR_ENV: "system"}, jemalloc=lib) == {}
    assert find_jemalloc(("/nonexistent/libjemalloc.so.2",)) is None


def test_active_allocator_reads_the_memory_maps():
    maps = "7f00-7f01 r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    assert active_allocator(maps) == "jemalloc (/usr/lib/x86_64-linux-gnu/libjemalloc.so.2)"
    assert active_allocator("7f00-7f01 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n") == (
        "glibc malloc"
    )


@pytest.mark.skipif(JEMALLOC is None, reason="jemalloc is not installed (make setup installs it)")
def test_a_process_started_with_make_serves_env_runs_on_jemalloc(monkeypatch):
    monkeypatch.delenv("LD_PRELOAD", raising=False)  # the suite's own preload (tests/conftest.py)
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    env = dict(os.environ)
    code = "from deployments.engine.allocator import active_allocator; print(active_allocator())"
    run = lambda extra: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert run(serving_env()) == f"jemalloc ({JEMALLOC})"
    assert run({}) == "glibc malloc"


@pytest.mark.skipif(JEMALLOC is None, reason="jemalloc is not installed (make setup installs it)")
def test_openvino_compiles_and_runs_under_the_preload(monkeypatch):
    """Without TBB_WITH_PRELOAD, ov.Core() aborts under a preloaded jemalloc (free(): invalid pointer)."""
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(ALLOCATOR_ENV, raising=False)
    code = (
        "import numpy as np, openvino as ov, torch\n"
        "class M(torch.nn.Module):\n"
        "    def forward(self, x): return x @ torch.ones(4, 4)\n"
        "model = ov.convert_model(M(), example_input=torch.ones(2, 4))\n"
        "compiled = ov.Core().compile_model(model, 'CPU', {'INFERENCE_NUM_THREADS': 2})\n"
        "print(float(compiled({0: np.ones((2, 4), np.float32)})[0].sum()))\n"
    )
    env = {**os.environ, **serving_env()}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "32.0"
