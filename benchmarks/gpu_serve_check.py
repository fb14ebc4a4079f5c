"""NV-Embed-v2 at full size through Ray Serve on one GPU, beside a bge-large-shape model on a quarter of it.

The second half of ``benchmarks/run_on_gpu.sh`` (the first is ``bench_nvembed_gpu.py``, in process):

1. writes a full-size NV-Embed-v2 checkpoint (published layout, seeded random weights:
   ``full_size_nvembed.write_checkpoint``) and a bge-large-shape sentence-transformers folder
   (``model_shapes.build_shape``) under ``--workdir``, reused when present;
2. in process, no Ray: NV-Embed-v2 loaded from that folder, the engine on both text mixes (a kt_gen-like mix
   of ~20 tokens, ~300-token passages), sent as the HTTP clients send them, ``--repeats`` times with the
   mixes alternating: the baseline;
3. Serve (its own Ray, private temp dir): NV-Embed-v2 on 0.75 of the GPU, the bge shape on 0.25 (fp16, its
   fidelity gate at load), one app, HTTP with base64 vectors: each model's single-query p50 while idle;
   NV-Embed alone on each mix (``--repeats`` times, alternating); NV-Embed on passages while single
   queries are timed one at a time (a retriever during an index build); bge alone; both at once; per phase the
   tokens/s, the passes the engine ran
   (its own counters) and the share of the wall time the GPU spent in them; each replica's reserved
   memory against ``sizing.replica_gpu_memory_gb``'s prediction;
4. Ray shut down, the in-process baseline once more (the model stayed loaded); per mix the min and median of
   each side and Serve / in-process (medians): the goal is >= 0.9 for NV-Embed.

Honest by construction: a response that is not a 200 with one finite vector of the model's dimension per
text, a failed call or an out-of-memory split in a replica's counters, or a non-finite in-process vector
fails the run with its reason and exit 1 (``CHECK FAILED``), never a fast number. ``--inject-fault``
poisons one word of the bge model (a NaN embedding row) that its texts hold: the run must fail.

    python benchmarks/gpu_serve_check.py                   # on the GPU machine (run_on_gpu.sh runs it)
    python benchmarks/gpu_serve_check.py --tiny            # CPU smoke check: tiny shapes, CPU placements
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_nvembed_gpu import make_texts, words_from_vocab  # noqa: E402
from benchmarks.common import Load, free_port, start_local_service, stop_local_service  # noqa: E402
from benchmarks.full_size_nvembed import checkpoint_complete, write_checkpoint  # noqa: E402
from benchmarks.model_shapes import build_shape  # noqa: E402
from deployments.config import load_models_config  # noqa: E402
from deployments.engine.backends.nvembed import NVEmbedBackend, load_nvembed_tokenizer  # noqa: E402
from deployments.engine.embedding_engine import EmbeddingEngine  # noqa: E402
from deployments.engine.sizing import replica_gpu_memory_gb  # noqa: E402
from deployments.protocol.options import EmbedOptions, EmbedRequest, EmbedResult  # noqa: E402

FIXTURE = REPO / "tests" / "fixtures" / "nvembed-tiny"
NV, BGE = "NV-Embed-v2", "bge-large"
POISON_WORD = "the"  # --inject-fault: a word every bge text of the check holds


class CheckFailed(Exception):
    pass


# ---------------------------------------------------------------------------------------------- models


def nvembed_folder(workdir: Path, tiny: bool) -> Path:
    if tiny:
        return FIXTURE
    folder = workdir / "nvembed-full"
    if not checkpoint_complete(folder):
        started = time.perf_counter()
        write_checkpoint(folder)
        print(f"wrote the full-size checkpoint in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def bge_folder(workdir: Path, tiny: bool, tokenizer_dir: str | None, poison: bool) -> Path:
    """The bge-large shape (``bge-tiny`` for the smoke check); with ``poison`` a copy whose embedding row of
    ``POISON_WORD`` is NaN: every text holding it embeds to NaN in the served model."""
    name = "bge-tiny" if tiny else "bge-large"
    folder = Path(build_shape(name, workdir / name, tokenizer_dir=tokenizer_dir))
    if not poison:
        return folder
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), device="cpu")
    token = model.tokenizer.convert_tokens_to_ids(POISON_WORD)
    with torch.no_grad():
        model[0].auto_model.embeddings.word_embeddings.weight[token] = float("nan")
    poisoned = workdir / f"{name}-poisoned"
    model.save(str(poisoned))
    return poisoned


def models_config(workdir: Path, nv: Path, bge: Path, tiny: bool, args: argparse.Namespace) -> Path:
    """Both models in one app: on the GPU 0.75 and 0.25 of it (classes sized to the card), on CPU (smoke
    check) one core each."""
    if tiny:
        placements = {"nv": {"num_cpus": 1}, "small": {"num_cpus": 1}}
    else:
        card_gb = round(torch.cuda.get_device_properties(0).total_memory / 1e9, 1)
        placements = {
            "nv": {"num_gpus": 0.75, "gpu_memory_gb": card_gb},
            "small": {"num_gpus": 0.25, "gpu_memory_gb": card_gb},
        }
    config = {
        "default_model": NV,
        "placements": placements,
        "models": [
            {
                "name": NV,
                "source": str(nv),
                "backend": "nvembed",
                "dtype": "float32" if tiny else "bfloat16",
                "max_seq_length": 4096,
                "placement": "nv",
                "batching": nv_batching(args),
                "max_ongoing_requests": 64,
            },
            {
                "name": BGE,
                "source": str(bge),
                "backend": "sentence-transformers",
                "dtype": "float32" if tiny else "float16",
                "max_seq_length": 512,
                "placement": "small",
                "batching": {"max_batch_tokens": 16384, "max_batch_size": 256, "forward_overhead_tokens": 16},
                "max_ongoing_requests": 64,
            },
        ],
        "router": {"request_timeout_s": 600},
    }
    path = workdir / "models.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def nv_batching(args: argparse.Namespace) -> dict:
    return {
        "max_batch_tokens": args.max_batch_tokens,
        "max_batch_size": args.max_batch_size,
        "forward_overhead_tokens": args.forward_overhead_tokens,
        "batch_wait_timeout_s": 0.005,
    }


# ------------------------------------------------------------------------------------------- in process


def in_process(engine: EmbeddingEngine, texts: list[str], per_request: int, dimension: int) -> Load:
    """The texts as the HTTP clients send them (requests of ``per_request``), all admitted at once."""
    options = EmbedOptions(prompt="", normalize=True, truncate=True)
    requests = [EmbedRequest(texts[i : i + per_request], options) for i in range(0, len(texts), per_request)]
    started = time.perf_counter()
    results = engine.run(requests)
    seconds = time.perf_counter() - started
    tokens = 0
    for k, result in enumerate(results):
        if not isinstance(result, EmbedResult):
            raise CheckFailed(f"in process: request {k} failed: {result!r}")
        if (
            result.vectors.shape != (len(requests[k].texts), dimension)
            or not np.isfinite(result.vectors).all()
        ):
            raise CheckFailed(f"in process: request {k} gave {result.vectors.shape} or non-finite values")
        tokens += int(result.token_counts.sum())
    return Load(requests=len(requests), texts=len(texts), tokens=tokens, seconds=seconds)


# ------------------------------------------------------------------------------------------------ HTTP


def embed_http(client: httpx.Client, url: str, model: str, texts: list[str], dimension: int) -> int:
    """One request; its prompt tokens. Anything but a 200 with one finite vector per text fails the check."""
    response = client.post(
        f"{url}/v1/embeddings", json={"input": texts, "model": model, "encoding_format": "base64"}
    )
    if response.status_code != 200:
        raise CheckFailed(f"{model}: HTTP {response.status_code}: {response.text[:300]}")
    body = response.json()
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
    if len(rows) != len(texts) or any(r.shape != (dimension,) for r in rows):
        raise CheckFailed(f"{model}: {len(rows)} vectors for {len(texts)} texts, or not {dimension} wide")
    if not all(np.isfinite(r).all() for r in rows):
        raise CheckFailed(f"{model}: a non-finite vector")
    return int(body["usage"]["prompt_tokens"])


def send_all(url: str, model: str, texts: list[str], per_request: int, clients: int, dimension: int) -> Load:
    """Every text once, in requests of ``per_request``, by ``clients`` threads taking the next request."""
    chunks = iter([texts[i : i + per_request] for i in range(0, len(texts), per_request)])
    lock = threading.Lock()
    sent = Load()
    failures: list[Exception] = []

    def client_loop() -> None:
        with httpx.Client(timeout=600) as client:
            while not failures:
                with lock:
                    chunk = next(chunks, None)
                if chunk is None:
                    return
                try:
                    tokens = embed_http(client, url, model, chunk, dimension)
                except Exception as exc:  # noqa: BLE001 - the first failure fails the check
                    failures.append(exc)
                    return
                with lock:
                    sent.texts += len(chunk)
                    sent.tokens += tokens

    started = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sent.seconds = time.perf_counter() - started
    if failures:
        raise failures[0] if isinstance(failures[0], CheckFailed) else CheckFailed(repr(failures[0]))
    return sent


def single_query_p50_ms(url: str, model: str, texts: list[str], dimension: int) -> float:
    with httpx.Client(timeout=600) as client:
        embed_http(client, url, model, texts[:1], dimension)  # warm
        times = []
        for text in texts:
            started = time.perf_counter()
            embed_http(client, url, model, [text], dimension)
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def probe_while(
    busy: threading.Event, url: str, model: str, texts: list[str], dimension: int, interval_s: float
) -> list[float]:
    """A retriever during an index build: while ``busy`` is set, one query at a time, ``interval_s`` after
    the last answer; each query's seconds."""
    latencies: list[float] = []
    with httpx.Client(timeout=600) as client:
        for text in itertools.cycle(texts):
            time.sleep(interval_s)
            if not busy.is_set():
                return latencies
            started = time.perf_counter()
            embed_http(client, url, model, [text], dimension)
            latencies.append(time.perf_counter() - started)
    return latencies


def replica_stats(model: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle(model, app_name="embeddings").stats.remote().result()


def checked_delta(model: str, before: dict, after: dict) -> dict:
    """The engine's own counters over a phase; a failed call or an out-of-memory split fails the check."""
    keys = ("forward_passes", "real_tokens", "padded_tokens", "failed_calls", "out_of_memory_passes")
    launches = ("launches_after_it_ended", "launches_behind_a_pass")
    delta = {k: after[k] - before.get(k, 0) for k in (*keys, *launches, "device_seconds")}
    if delta["failed_calls"] or delta["out_of_memory_passes"]:
        raise CheckFailed(
            f"{model}: {delta['failed_calls']} failed call(s), {delta['out_of_memory_passes']} pass(es) out "
            "of memory (split) in the replica's counters"
        )
    return delta


# ------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke check: tiny shapes, CPU placements")
    parser.add_argument("--workdir", default=None, help="checkpoints and configs (default: a temp dir)")
    parser.add_argument(
        "--bert-tokenizer", default=None, help="BERT WordPiece tokenizer files (default: MiniLM's)"
    )
    parser.add_argument("--max-batch-tokens", type=int, default=32768)
    parser.add_argument("--max-batch-size", type=int, default=1024)
    parser.add_argument("--forward-overhead-tokens", type=int, default=256)
    parser.add_argument("--short-texts", type=int, default=8192)
    parser.add_argument("--passages", type=int, default=512)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs of each side, the mixes alternating"
    )
    parser.add_argument("--inject-fault", action="store_true", help="a poisoned bge word: the run must fail")
    args = parser.parse_args()

    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-serve-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    nv = nvembed_folder(workdir, tiny)
    bge = bge_folder(workdir, tiny, args.bert_tokenizer, poison=args.inject_fault)
    tokenizer = load_nvembed_tokenizer(nv)
    words = words_from_vocab(tokenizer)
    n_short, n_pass = (256, 32) if tiny else (args.short_texts, args.passages)
    mixes = {  # (texts, texts per request)
        "kt_gen-like mix": (make_texts(words, n_short, 15.0, 0.8, seed=1), 64),
        "passages": (make_texts(words, n_pass, 290.0, 0.25, seed=2), 8),
    }
    bge_texts = [
        f"{t} the" for t in make_texts(words, n_short // 2, 15.0, 0.8, seed=3)
    ]  # ends in a common word
    config_path = models_config(workdir, nv, bge, tiny, args)
    entries = {e.name: e for e in load_models_config(config_path).models}

    started = time.perf_counter()
    backend = NVEmbedBackend.load(
        str(nv), device=device, dtype=entries[NV].dtype, max_seq_length=4096, threads=2 if tiny else 1
    )
    print(f"in process: {NV} loaded in {time.perf_counter() - started:.1f} s (packed: {backend.packed})")
    engine = EmbeddingEngine(backend, entries[NV].batching)
    dim = backend.dimension
    in_process(engine, mixes["kt_gen-like mix"][0][:256], 64, dim)  # warm-up
    baseline: dict[str, list[float]] = {mix: [] for mix in mixes}
    for _ in range(args.repeats):
        for mix, (texts, per_request) in mixes.items():
            baseline[mix].append(in_process(engine, texts, per_request, dim).tokens_per_s)

    rows: list[str] = []
    memory: list[str] = []
    url = start_local_service(str(config_path), free_port())
    try:
        infos = {m["id"]: m for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"]}
        if not all(infos[m]["state"] == "ready" for m in (NV, BGE)):
            raise CheckFailed(f"not ready: {[(m, infos[m]['state']) for m in (NV, BGE)]}")
        bge_dim = int(infos[BGE]["dimension"])
        queries = make_texts(words, 30, 6.0, 0.5, seed=4)
        p50 = {
            NV: single_query_p50_ms(url, NV, queries, dim),
            BGE: single_query_p50_ms(url, BGE, queries, bge_dim),
        }

        def phase(
            label: str, work: dict[str, tuple[list[str], int, int]], probe: list[float] | None = None
        ) -> dict[str, Load]:
            """Each model's texts sent at once (threads); a table row per model. ``probe``: filled with
            the seconds of NV-Embed queries sent one at a time meanwhile."""
            before = {m: replica_stats(m) for m in work}
            sent: dict[str, Load] = {}
            errors: list[Exception] = []
            busy = threading.Event()
            busy.set()

            def run(model: str) -> None:
                texts, per_request, width = work[model]
                try:
                    sent[model] = send_all(url, model, texts, per_request, args.clients, width)
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)

            def run_probe() -> None:
                try:
                    probe.extend(probe_while(busy, url, NV, queries, dim, 0.005 if tiny else 0.05))
                except Exception as exc:  # noqa: BLE001
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(m,)) for m in work]
            prober = threading.Thread(target=run_probe) if probe is not None else None
            for t in threads + ([prober] if prober else []):
                t.start()
            for t in threads:
                t.join()
            busy.clear()
            if prober:
                prober.join()
            if errors:
                raise errors[0] if isinstance(errors[0], CheckFailed) else CheckFailed(repr(errors[0]))
            for model, s in sent.items():
                d = checked_delta(model, before[model], replica_stats(model))
                busy = f"{d['device_seconds'] / s.seconds:.0%}" if d["device_seconds"] else "-"
                gap = (
                    (s.seconds - d["device_seconds"]) / d["forward_passes"] * 1000
                    if d["device_seconds"]
                    else None
                )
                per_pass = d["device_seconds"] / max(1, d["forward_passes"]) * 1000
                rows.append(
                    f"| {label} | {model} | {s.texts} | {s.tokens_per_s:,.0f} | {d['forward_passes']} | "
                    f"{d['real_tokens'] / max(1, d['padded_tokens']):.2f} | {busy} | "
                    f"{f'{per_pass:.0f}' if gap is not None else '-'} | "
                    f"{f'{gap:.1f}' if gap is not None else '-'} | "
                    f"{d['launches_after_it_ended']} of {d['launches_behind_a_pass']} |"
                )
            return sent

        served: dict[str, list[float]] = {mix: [] for mix in mixes}
        for repeat in range(args.repeats):
            for mix, (texts, per_request) in mixes.items():
                label = f"{NV} alone, {mix} ({repeat + 1}/{args.repeats})"
                served[mix].append(phase(label, {NV: (texts, per_request, dim)})[NV].tokens_per_s)
        during_bulk: list[float] = []  # a retriever's queries while an index is built
        bulk = mixes["passages"][0] * 2
        # requests of 64 passages, as the clients cut an encode() (a query beside them gets a pass of its own)
        phase(f"{NV}, passages + single queries", {NV: (bulk, 64, dim)}, probe=during_bulk)
        if not during_bulk:
            raise CheckFailed("no query was answered while the passages ran")
        phase(f"{BGE} alone", {BGE: (bge_texts, 64, bge_dim)})
        phase("both at once", {NV: (mixes["kt_gen-like mix"][0], 64, dim), BGE: (bge_texts, 64, bge_dim)})
        for model in (NV, BGE):
            stats = replica_stats(model)
            predicted = replica_gpu_memory_gb(entries[model], config_path.parent)
            held = [
                stats.get(k, "-") for k in ("gpu_reserved_gb", "gpu_max_reserved_gb", "gpu_max_allocated_gb")
            ]
            card = infos[model]
            memory.append(
                f"| {model} | {' | '.join(map(str, held))} | {predicted} | {card['precision']} | "
                f"{card['fidelity_worst_cosine']} |"
            )
    finally:
        stop_local_service()

    for mix, (texts, per_request) in mixes.items():  # again, with no Ray beside it
        baseline[mix].append(in_process(engine, texts, per_request, dim).tokens_per_s)

    card = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (tiny shapes, smoke check)"
    print(f"\n{NV} through Ray Serve on {card}; beside it {BGE} ({'tiny' if tiny else 'bge-large shape'})")
    print(f"{NV} batching: {nv_batching(args)}; {args.clients} HTTP clients per model, base64 vectors\n")
    print(
        f"| mix | in process, tokens/s: median (min) of {args.repeats} before Serve and 1 after | "
        f"Serve, tokens/s: median (min) of {args.repeats} | Serve / in process (medians) |"
    )
    print("| --- | ---: | ---: | ---: |")
    for mix in mixes:
        inside, outside = statistics.median(baseline[mix]), statistics.median(served[mix])
        print(
            f"| {mix} | {inside:,.0f} ({min(baseline[mix]):,.0f}) | "
            f"{outside:,.0f} ({min(served[mix]):,.0f}) | {outside / inside:.2f} |"
        )
    print(f"\nsingle query (one short text, idle), p50: {NV} {p50[NV]:.1f} ms, {BGE} {p50[BGE]:.1f} ms")
    waits = sorted(during_bulk)
    pct = {q: 1000 * waits[min(len(waits) - 1, int(q * len(waits)))] for q in (0.5, 0.9)}
    print(
        f"{NV} single queries while {len(bulk)} passages load (requests of 64): {len(waits)} "
        f"queries, p50 {pct[0.5]:.0f} ms, p90 {pct[0.9]:.0f} ms, max {1000 * waits[-1]:.0f} ms (the "
        "phase's device ms per pass is in its row below)\n"
    )
    header = "| phase | model | texts | tokens/s | passes (engine's own) | padding eff. | GPU busy |"
    print(header + " device ms/pass | idle ms/pass | launched after the pass before ended |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))
    print(
        "(idle ms/pass: the phase's wall time less the GPU's, per pass, so moments the queue ran dry count; "
        "launched after the pass before ended: passes the GPU waited for while the host launched them, of "
        "those launched while another ran)"
    )
    print(
        "\n| replica | GPU reserved GB | peak reserved | peak allocated | predicted (sizing) | precision | "
        "fidelity worst cosine |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | ---: |")
    print("\n".join(memory))
    print(json.dumps({"served": served, "baseline": baseline, "p50_ms": p50, "queries_during_bulk_s": waits}))


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as failure:
        print(f"\nCHECK FAILED: {failure}", file=sys.stderr)
        raise SystemExit(1) from None
