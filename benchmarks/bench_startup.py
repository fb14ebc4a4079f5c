"""``make serve`` start-up: seconds from the command to the first embedding answered, with OpenVINO's
compile cache empty (the conversion included, as on a fresh machine) and then filled.

Runs the same command as ``make serve`` (``python -m deployments.tools.serve_local``) on a copy of
``configs/local.yaml`` whose models config points ``compile_cache_dir`` at a new temporary folder, on a
private Ray (``RAY_TMPDIR``), and stops it with SIGTERM after each start.

    python benchmarks/bench_startup.py [--port 8000] [--runs 2]
    python benchmarks/bench_startup.py --shape bge-large     # a 335M model in bge-large's shape instead
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent


def configs(port: int, cache: Path, shape: str | None = None) -> Path:
    """A serve config like configs/local.yaml on ``port``, its models config caching in ``cache``; with
    ``shape``, its model is a random-weight model of that shape (``benchmarks/model_shapes.py``)."""
    folder = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    models = yaml.safe_load((REPO / "configs/models.local.yaml").read_text())
    for entry in models["models"]:
        entry["compile_cache_dir"] = str(cache)
    if shape:
        from benchmarks.model_shapes import SHAPES, build_shape

        entry = models["models"][0]
        entry["source"] = build_shape(shape, folder / shape)
        entry["max_seq_length"] = SHAPES[shape].max_seq_length
    (folder / "models.yaml").write_text(yaml.safe_dump(models))
    serve = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    serve["http_options"]["port"] = port
    serve["applications"][0]["args"]["models_config"] = str(folder / "models.yaml")
    (folder / "serve.yaml").write_text(yaml.safe_dump(serve))
    return folder / "serve.yaml"


def first_answer_s(serve_config: Path, port: int, timeout_s: float) -> tuple[float, dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": tempfile.mkdtemp(prefix="ray-startup-")}
    env.pop("RAY_ADDRESS", None)
    log = open(Path(env["RAY_TMPDIR"]) / "serve.log", "w")  # noqa: SIM115 - closed below
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "deployments.tools.serve_local", str(serve_config)],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    answer = None
    try:
        while time.perf_counter() - started < timeout_s:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}; log in {log.name}")
            try:
                resp = httpx.post(f"{url}/v1/embeddings", json={"input": ["Marie Curie"]}, timeout=5)
                if resp.status_code == 200:
                    elapsed = time.perf_counter() - started
                    answer = elapsed, httpx.get(f"{url}/v1/models", timeout=5).json()["data"][0]
                    return answer
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"no answer in {timeout_s} s; log in {log.name}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(90)
        log.close()
        if answer is not None:  # Ray's files and the log are kept only when the start failed
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--runs", type=int, default=2, help="starts after the first, each with the cache filled"
    )
    parser.add_argument("--shape", default=None, help="a random-weight model shape, e.g. bge-large")
    parser.add_argument("--timeout", type=float, default=900, help="seconds a start may take")
    args = parser.parse_args()
    if args.shape:
        sys.path.insert(0, str(REPO))
        from benchmarks.model_shapes import SHAPES  # torch and transformers: only when asked

        if args.shape not in SHAPES:
            parser.error(f"--shape {args.shape!r}: one of {', '.join(SHAPES)}")
    cache = Path(tempfile.mkdtemp(prefix="bench-startup-cache-"))
    serve_config = configs(args.port, cache, args.shape)
    print("| start | compile cache | first answer s | serves |")
    print("| --- | --- | ---: | --- |")
    for run in range(1 + args.runs):
        seconds, model = first_answer_s(serve_config, args.port, args.timeout)
        state = "empty (converts)" if run == 0 else "filled"
        print(
            f"| {run + 1} | {state} | {seconds:.1f} | {model['runtime']} {model['precision']} |", flush=True
        )
    shutil.rmtree(cache, ignore_errors=True)  # a shape and its compiled copy: 1.3 GB each at bge-large
    shutil.rmtree(serve_config.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
