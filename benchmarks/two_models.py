"""bge-large at its size beside MiniLM on one machine, through ``make serve``'s path, both busy at once.

    python benchmarks/two_models.py                  # 60 s a phase
    python benchmarks/two_models.py --seconds 30 --work /data/shapes

A bge-large-shape model (24 layers, hidden 1024, CLS pooling; random weights: ``model_shapes.py``) gets its
own placement beside all-MiniLM-L6-v2 (run by the ingress, as ``configs/models.local.yaml`` does), one CPU
each on this 2-core machine, both on the default CPU path (OpenVINO, bf16 where the CPU has it, behind the
fidelity gate). The service is started with ``python -m deployments.tools.serve_local`` as a user starts it
(the one-machine check and ``memory_gb`` sizing included). Three phases, HTTP, kt_gen-mix requests of 8
texts from 4 clients a model: MiniLM alone, bge-large alone, both at once. Prints one table.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Load, ServeLocal, drive, free_port, write_serve_config  # noqa: E402
from benchmarks.model_shapes import SHAPES, build_shape  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BGE = "bge-large-shape"


def models_config(bge_dir: str, workdir: Path) -> Path:
    """configs/models.local.yaml with MiniLM on one CPU, plus the bge-large shape on the other."""
    data = yaml.safe_load((REPO / "configs" / "models.local.yaml").read_text())
    data["placements"] = {"minilm_cpu": {"num_cpus": 1}, "bge_cpu": {"num_cpus": 1, "memory_gb": 3.5}}
    minilm = data["models"][0]
    minilm["placement"] = "minilm_cpu"
    minilm.pop("cache", None)  # every text computed: the cache would answer the repeats
    data["models"].append(
        {
            "name": BGE,
            "source": bge_dir,
            "backend": "sentence-transformers",
            "runtime": "openvino",
            "dtype": "bfloat16",
            "compile_cache_dir": str(workdir / "openvino-cache"),
            "max_seq_length": SHAPES["bge-large"].max_seq_length,
            "placement": "bge_cpu",
            "batching": {"max_batch_tokens": 4096, "max_batch_size": 256, "batch_wait_timeout_s": 0},
        }
    )
    path = workdir / "models.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="per phase")
    parser.add_argument("--clients", type=int, default=4, help="per model")
    parser.add_argument("--work", type=Path, default=None, help="where the shape is built (reused)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # through the finally: the service stops too
    work = args.work or Path(tempfile.mkdtemp(prefix="two-models-"))
    work.mkdir(parents=True, exist_ok=True)
    bge_dir = build_shape("bge-large", work / "bge-large")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve_config = write_serve_config(work / "serve.yaml", port, str(models_config(bge_dir, work)))
    print(f"serving MiniLM and {BGE} at {url} (log {work / 'service.log'})", flush=True)
    service = ServeLocal(serve_config, work / "service.log")
    rows: list[tuple[str, str, Load]] = []
    try:
        with httpx.Client(timeout=120) as client:

            def both_ready() -> bool:  # HAProxy answers 503 (not JSON) until the ingress is up
                response = client.get(f"{url}/v1/models")
                ready = response.status_code == 200
                return ready and all(m["state"] == "ready" for m in response.json()["data"])

            started = service.wait_for(both_ready, 900)
            models = {m["id"]: m for m in client.get(f"{url}/v1/models").json()["data"]}
        print(f"both ready after {started:.0f} s", flush=True)
        for name, model in models.items():
            print(
                f"  {name}: {model['runtime']} {model['precision']}, gate {model['fidelity_worst_cosine']}, "
                f"overhead {model['forward_overhead_tokens']} tokens ({model['forward_overhead_source']})"
            )
        for model in ("all-MiniLM-L6-v2", BGE):  # warm-up, then each alone
            drive(url, model, args.clients, 5, per_request=8)
            rows.append(("alone", model, drive(url, model, args.clients, args.seconds, per_request=8)))
        together: dict[str, Load] = {}

        def run(model: str, seed: int) -> None:
            together[model] = drive(url, model, args.clients, args.seconds, per_request=8, seed=seed)

        threads = [
            threading.Thread(target=run, args=(m, s)) for m, s in (("all-MiniLM-L6-v2", 300), (BGE, 400))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows += [("both at once", model, load) for model, load in together.items()]
    finally:
        service.stop()
    print(f"\nMiniLM and a bge-large shape on one machine, {args.clients} clients x 8 texts each, HTTP\n")
    print("| phase | model | texts/s | tokens/s | requests | errors |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for phase, model, load in rows:
        print(
            f"| {phase} | {model} | {load.texts_per_s:.1f} | {load.tokens_per_s:.0f} | {load.requests} | "
            f"{load.errors} |"
        )
    if any(load.errors for _, _, load in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
