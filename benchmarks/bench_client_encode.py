"""One ``faiss_filter``-shaped call, ``model.encode(texts)`` with the default ``batch_size``, in process and
through the service, in one run.

The in-process baseline runs first, with no Ray on the machine; then the script starts its own Ray
(private temp dir) and the app, and times the same call through ``HTTPEmbedder`` and ``ServeEmbedder``
(a driver joining that cluster), three times each, on the same texts (kt_gen-like mix). Prints a table.

    python benchmarks/bench_client_encode.py                  # 1248 texts, configs/models.local.yaml
    python benchmarks/bench_client_encode.py --texts 4000
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import (  # noqa: E402
    add_ingress_option,
    config_with_cache,
    kt_gen_mix,
    start_local_service,
    stop_local_service,
    use_haproxy,
)


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models-config", default=str(REPO / "configs/models.local.yaml"))
    parser.add_argument("--texts", type=int, default=1248)
    parser.add_argument("--repeats", type=int, default=3)
    add_ingress_option(parser)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    from deployments.config import load_models_config, resolve_model_source

    config = load_models_config(args.models_config)
    model = config.name_table()[config.default_model]
    entry = config.entry(model)
    texts = kt_gen_mix(args.texts, seed=11)

    # In process, nothing else running, with the threads the service's replica gets.
    torch.set_num_threads(max(1, int(config.placements[entry.placement].num_cpus or 1)))
    local = SentenceTransformer(resolve_model_source(entry.source), device="cpu")
    local.max_seq_length = entry.max_seq_length
    local.encode(texts[:64])
    rows = {"in-process SentenceTransformer.encode(texts)": timed(lambda: local.encode(texts), args.repeats)}

    from clients import HTTPEmbedder, ServeEmbedder
    from tests.conftest import free_port

    port = free_port()
    # The service as `make serve` runs it: through HAProxy when it is installed.
    lean = use_haproxy(args)
    base = start_local_service(config_with_cache(args.models_config, None), port, haproxy=lean)
    try:
        for name, client in (
            ("HTTPEmbedder.encode(texts)", HTTPEmbedder(model, base_url=base)),
            ("ServeEmbedder.encode(texts)", ServeEmbedder(model)),
        ):
            client.encode(texts[:64])
            rows[name] = timed(lambda client=client: client.encode(texts), args.repeats)
    finally:
        stop_local_service()

    base = statistics.median(rows["in-process SentenceTransformer.encode(texts)"])
    print(f"\nmodel {model}, {len(texts)} kt_gen-like texts, default batch_size, {os.cpu_count()} CPUs\n")
    print("| call | median s | runs (s) | texts/s | vs in-process |")
    print("| --- | ---: | --- | ---: | ---: |")
    for name, times in rows.items():
        median = statistics.median(times)
        runs = ", ".join(f"{t:.2f}" for t in times)
        print(f"| {name} | {median:.2f} | {runs} | {len(texts) / median:.0f} | {base / median:.2f}x |")


if __name__ == "__main__":
    main()
