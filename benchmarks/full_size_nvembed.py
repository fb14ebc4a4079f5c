"""NV-Embed-v2 at its published size, served on this machine the way a user serves it (run by hand).

    python benchmarks/full_size_nvembed.py /data/nvembed-full            # write (or reuse) and serve
    python benchmarks/full_size_nvembed.py /data/nvembed-full --soak-s 60  # a shorter concurrency soak

1. Writes (or reuses) a checkpoint laid out exactly as ``nvidia/NV-Embed-v2``: ``config.json`` with the
   published file's fields at the published sizes, four ``model-0000N-of-00004.safetensors`` shards in the
   published tensor names and dtype (float16), ``model.safetensors.index.json``, and Mistral's tokenizer
   files (the golden fixture's, which are the release's). 7,851,016,192 parameters, 15.7 GB.
   Weights are seeded random: how they are scaled is in ``weight_std``.
2. Serves that folder with ``python -m deployments.tools.serve_local`` (``make serve``'s path: ``serve run``
   with a models config: backend ``nvembed``, dtype bfloat16, a CPU placement).
3. Prints one table (copied into docs/nvembed.md and docs/performance.md): checkpoint bytes, start to
   first answer, the replica's peak RSS during load and after the traffic, an instructed query and a
   plain passage, tokens/s on the kt_gen mix and on ~300-token passages, a 4,096-token input, an input
   past ``max_seq_length`` (400 with ``truncate: false``, answered with ``truncate: true``), and
   concurrent clients for ``--soak-s`` seconds with their error count.

Needs about 17 GB of memory and 16 GB of disk; nothing else should run beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    ServeLocal,
    drive,
    free_port,
    kt_gen_mix,
    vocabulary,
    write_serve_config,
)
from deployments.engine.backends.nvembed import load_nvembed_tokenizer  # noqa: E402
from deployments.engine.backends.nvembed_model import NVEmbedConfig, NVEmbedModel  # noqa: E402
from deployments.engine.backends.safetensors_files import read_header  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TOKENIZER_SOURCE = REPO / "tests" / "fixtures" / "nvembed-tiny"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"]
SHARDS = 4
PUBLISHED_PARAMETERS = 7_851_016_192
QUERY_PROMPT = "Instruct: Given a question, retrieve passages that answer the question\nQuery: "

# config.json of nvidia/NV-Embed-v2: the golden fixture's fields (which mirror the published file) at the
# published values (NOTES.md section 1).
PUBLISHED_CONFIG = {
    "architectures": ["NVEmbedModel"],
    "auto_map": {
        "AutoConfig": "configuration_nvembed.NVEmbedConfig",
        "AutoModel": "modeling_nvembed.NVEmbedModel",
    },
    "model_type": "nvembed",
    "hidden_size": 4096,
    "torch_dtype": "float16",
    "padding_side": "right",
    "is_mask_instruction": True,
    "add_pad_token": True,
    "add_eos": True,
    "mask_type": "b",
    "latent_attention_config": {
        "model_type": "latent_attention",
        "num_latents_value": 512,
        "num_cross_heads": 8,
        "output_normalize": True,
        "hidden_dim": 4096,
        "latent_dim": 4096,
        "cross_dim_head": 4096,
    },
    "text_config": {
        "model_type": "bidir_mistral",
        "_name_or_path": "nvidia/NV-Embed-v2",
        "architectures": ["MistralModel"],
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": "float32",
    },
    "transformers_version": "4.42.4",
}

# Matrices that write into the residual stream: their std is divided by sqrt(2 x layers).
_OUTPUT_PROJECTIONS = ("o_proj.weight", "down_proj.weight", "fn.to_out.weight", "fn.net.2.weight")


def weight_std(name: str, layers: int, init: float = 0.02) -> float:
    """Why random weights stay finite through 32 layers in 16 bits: every matrix is N(0, 0.02) (Mistral's
    ``initializer_range``), and the ones that add into the residual stream (attention and MLP outputs) are
    scaled by 1/sqrt(2 x layers) as GPT-2 initialises them, so each of the 64 residual additions adds
    about 1/64 of the stream's variance instead of doubling it; norms are 1 and biases 0. The stream stays
    O(1) (every RMSNorm input is normalised anyway) and nothing approaches float16's 65,504."""
    return init / math.sqrt(2 * layers) if name.endswith(_OUTPUT_PROJECTIONS) else init


def _shapes(config: NVEmbedConfig) -> list[tuple[str, tuple[int, ...]]]:
    with torch.device("meta"):
        model = NVEmbedModel(config)
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def _shard_plan(shapes: list[tuple[str, tuple[int, ...]]], shards: int) -> list[list[tuple[str, tuple]]]:
    """The tensors in model order, cut into ``shards`` runs of about equal bytes."""
    total = sum(math.prod(s) for _, s in shapes)
    plan: list[list[tuple[str, tuple]]] = [[] for _ in range(shards)]
    done = 0
    for name, shape in shapes:
        index = min(shards - 1, int(done * shards / total))
        plan[index].append((name, shape))
        done += math.prod(shape)
    return plan


def _shard_name(i: int, shards: int) -> str:
    return f"model-{i + 1:05d}-of-{shards:05d}.safetensors"


def checkpoint_complete(folder: Path) -> bool:
    """Every shard named by the index is present and its tensors' bytes are all there."""
    index = folder / "model.safetensors.index.json"
    if not (index.exists() and (folder / "config.json").exists()):
        return False
    names = json.loads(index.read_text())["weight_map"]
    for shard in sorted(set(names.values())):
        path = folder / shard
        if not path.exists():
            return False
        records = read_header(path)
        if (
            len(records) != sum(1 for s in names.values() if s == shard)
            or path.stat().st_size < records[-1].end
        ):
            return False
    return True


def write_checkpoint(folder: Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> None:
    """The published layout with seeded random weights (see ``weight_std``), one shard in memory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = dict(PUBLISHED_CONFIG, torch_dtype=str(dtype).removeprefix("torch."))
    config = NVEmbedConfig.from_dict(raw)
    layers = config.text.num_hidden_layers
    shapes = _shapes(config)
    count = sum(math.prod(s) for _, s in shapes)
    if count != PUBLISHED_PARAMETERS:
        raise RuntimeError(f"{count:,} parameters, the published model has {PUBLISHED_PARAMETERS:,}")
    generator = torch.Generator().manual_seed(seed)
    # Drawing 7.85e9 normals one by one takes minutes: a pool of 2^24 draws, each tensor a slice at a random
    # offset, scaled to its std (a pass's numerics depend on the scale, not on the values being distinct).
    pool = torch.randn(1 << 24, generator=generator)
    pool = torch.cat([pool, pool])
    weight_map = {}
    for i, group in enumerate(_shard_plan(shapes, SHARDS)):
        tensors = {}
        for name, shape in group:
            n = math.prod(shape)
            if name.endswith(("norm.weight", "layernorm.weight", "norm_context.weight")):
                tensor = torch.ones(shape, dtype=dtype)
            elif name.endswith(".bias"):
                tensor = torch.zeros(shape, dtype=dtype)
            else:
                tensor = torch.empty(n, dtype=dtype)
                std = weight_std(name, layers)
                for start in range(0, n, 1 << 24):
                    k = min(1 << 24, n - start)
                    offset = int(torch.randint(0, 1 << 24, (1,), generator=generator))
                    tensor[start : start + k] = (pool[offset : offset + k] * std).to(dtype)
                tensor = tensor.view(shape)
            tensors[name] = tensor
            weight_map[name] = _shard_name(i, SHARDS)
        save_file(tensors, str(folder / _shard_name(i, SHARDS)), metadata={"format": "pt"})
        print(f"  wrote {_shard_name(i, SHARDS)} ({sum(t.nbytes for t in tensors.values()) / 1e9:.2f} GB)")
        del tensors
    total_bytes = count * torch.finfo(dtype).bits // 8
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_SOURCE / name, folder / name)
    (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------- serving


def service_configs(folder: Path, workdir: Path, port: int) -> Path:
    """A models config and a Serve config, as a user writes them; the Serve config's path."""
    models = {
        "default_model": "NV-Embed-v2",
        # 17.5 GB: sizing.replica_cpu_memory for this model and batch budget (the config check says so).
        "placements": {"cpu": {"num_cpus": 2, "memory_gb": 17.5}},
        "models": [
            {
                "name": "NV-Embed-v2",
                "source": str(folder),
                "backend": "nvembed",
                "dtype": "bfloat16",
                "max_seq_length": 4096,
                "prompts": {"query": QUERY_PROMPT, "passage": ""},
                "default_prompt": "passage",
                "placement": "cpu",
                "batching": {"max_batch_tokens": 4096, "max_batch_size": 64, "batch_wait_timeout_s": 0},
                "max_ongoing_requests": 16,
            }
        ],
        "router": {"request_timeout_s": 900},
    }
    (workdir / "models.yaml").write_text(yaml.safe_dump(models, sort_keys=False))
    return Path(write_serve_config(workdir / "serve.yaml", port, str(workdir / "models.yaml")))


def replica_pid(name: str = "NV-Embed-v2") -> int | None:
    """The process Ray titled ``ray::ServeReplica:embeddings:<name>``, if it exists yet."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"ServeReplica:embeddings:{name}".encode() in cmdline:
            return int(proc.name)
    return None


def memory_kb(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS), VmRSS and its anonymous / file-backed parts, in kB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0])
    return out


class MemoryWatch(threading.Thread):
    """Samples the replica's memory every 0.5 s: the peak RSS seen (VmHWM) and the last sample."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pid: int | None = None
        self.last: dict[str, int] = {}
        self.peak_anon = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.pid = self.pid or replica_pid()
            if self.pid:
                try:
                    self.last = memory_kb(self.pid)
                    self.peak_anon = max(self.peak_anon, self.last.get("RssAnon", 0))
                except OSError:
                    self.pid = None
            time.sleep(0.5)


def embed(client: httpx.Client, url: str, texts: list[str], **extra) -> httpx.Response:
    return client.post(f"{url}/v1/embeddings", json={"input": texts, "model": "NV-Embed-v2", **extra})


def check_vectors(response: httpx.Response, count: int) -> np.ndarray:
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    vectors = np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)
    if vectors.shape != (count, 4096) or not np.isfinite(vectors).all():
        raise RuntimeError(f"bad vectors: shape {vectors.shape}, finite {np.isfinite(vectors).all()}")
    return vectors


def passages(n: int, tokens: int, seed: int, tokenizer) -> list[str]:
    """``n`` texts of real words, each exactly ``tokens`` tokens long as NV-Embed counts them (BOS and the
    appended EOS included), without an instruction."""
    rng = np.random.default_rng(seed)
    vocab = vocabulary()
    out = []
    for _ in range(n):
        words = [vocab[i] for i in rng.integers(0, len(vocab), tokens)]
        lo, hi = 1, len(words)
        while lo < hi:  # the most words that fit in ``tokens``
            mid = (lo + hi + 1) // 2
            if len(tokenizer(" ".join(words[:mid]) + "</s>")["input_ids"]) <= tokens:
                lo = mid
            else:
                hi = mid - 1
        out.append(" ".join(words[:lo]))
    return out


def throughput(
    client: httpx.Client, url: str, texts: list[str], per_request: int
) -> tuple[float, int, float]:
    """tokens/s, tokens, seconds for ``texts`` sent in requests of ``per_request``, one at a time."""
    tokens = 0
    start = time.perf_counter()
    for i in range(0, len(texts), per_request):
        chunk = texts[i : i + per_request]
        response = embed(client, url, chunk)
        check_vectors(response, len(chunk))
        tokens += response.json()["usage"]["prompt_tokens"]
    elapsed = time.perf_counter() - start
    return tokens / elapsed, tokens, elapsed


class Rows(list):
    """The table's rows, each also printed as it is measured (a run that fails still shows what it got)."""

    def append(self, row: tuple[str, str]) -> None:
        print(f"  {row[0]}: {row[1]}", flush=True)
        super().append(row)


def gib(kb: int) -> str:
    return f"{kb / 1024 / 1024:.2f} GiB"


def serve_and_measure(folder: Path, args: argparse.Namespace) -> list[tuple[str, str]]:
    rows = Rows()
    tokenizer = load_nvembed_tokenizer(folder)
    size = checkpoint_bytes(folder)
    rows.append(("checkpoint", f"{size:,} bytes ({size / 2**30:.2f} GiB) in {SHARDS} float16 shards"))
    workdir = Path(tempfile.mkdtemp(prefix="nvembed-full-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve_config = service_configs(folder, workdir, port)
    print(f"serving {folder} at {url} (log {workdir / 'service.log'})")
    watch = MemoryWatch()
    watch.start()
    service = ServeLocal(serve_config, workdir / "service.log")
    try:
        with httpx.Client(timeout=900) as client:
            first = service.wait_for(
                lambda: embed(client, url, ["first answer"]).status_code == 200, args.start_timeout_s
            )
            rows.append(("start to first answer", f"{first:.1f} s"))
            load = dict(watch.last)
            rows.append(
                (
                    "replica RSS after load + first pass",
                    f"peak {gib(load['VmHWM'])} = {load['VmHWM'] * 1024 / size:.3f}x checkpoint; now "
                    f"{gib(load['VmRSS'])} (anonymous {gib(load['RssAnon'])}, file {gib(load['RssFile'])})",
                )
            )
            info = client.get(f"{url}/v1/models").json()
            entry = next(m for m in info["data"] if m["id"] == "NV-Embed-v2")
            rows.append(("forward overhead in use", str(entry.get("forward_overhead_tokens", "n/a"))))

            query = embed(
                client, url, ["how do latent attention layers pool token states?"], prompt_name="query"
            )
            passage = embed(client, url, ["Latent attention pools token states through learned latents."])
            q, p = check_vectors(query, 1)[0], check_vectors(passage, 1)[0]
            rows.append(
                (
                    "query with instruction, passage without",
                    f"both 200, 4096-d, finite; tokens {query.json()['usage']['prompt_tokens']} / "
                    f"{passage.json()['usage']['prompt_tokens']}; cosine {float(q @ p):.4f}",
                )
            )
            tps, tokens, secs = throughput(client, url, kt_gen_mix(args.kt_gen_texts, seed=7), 16)
            rows.append(("throughput, kt_gen mix", f"{tps:.1f} tokens/s ({tokens} tokens in {secs:.1f} s)"))
            tps, tokens, secs = throughput(
                client, url, passages(args.passages, 300, seed=8, tokenizer=tokenizer), 4
            )
            rows.append(
                ("throughput, ~300-token passages", f"{tps:.1f} tokens/s ({tokens} tokens in {secs:.1f} s)")
            )

            long_text = passages(1, 4096, seed=9, tokenizer=tokenizer)[0]
            start = time.perf_counter()
            response = embed(client, url, [long_text], truncate=False)
            long_tokens = response.json()["usage"]["prompt_tokens"] if response.status_code == 200 else None
            check_vectors(response, 1)
            rows.append(
                ("one long input", f"{long_tokens} tokens: 200 in {time.perf_counter() - start:.1f} s")
            )
            too_long = long_text + " and then some more words past the limit"
            refused = embed(client, url, [too_long], truncate=False)
            message = refused.json().get("error", {}).get("message", "")
            if refused.status_code != 400 or "4096" not in message:
                raise RuntimeError(
                    f"past max_seq_length with truncate false: {refused.status_code} {message}"
                )
            start = time.perf_counter()
            truncated = embed(client, url, [too_long], truncate=True)
            check_vectors(truncated, 1)
            seconds = time.perf_counter() - start
            rows.append(
                (
                    "input past max_seq_length",
                    f"truncate false: 400 ({message[:90]}...); truncate true: 200, "
                    f"{truncated.json()['usage']['prompt_tokens']} tokens in {seconds:.1f} s",
                )
            )
        soak = drive(url, "NV-Embed-v2", args.clients, args.soak_s, per_request=4, dimension=4096)
        rows.append(
            (
                f"{args.clients} concurrent clients, {args.soak_s:.0f} s",
                f"{soak.requests} requests, {soak.errors} errors, {soak.tokens_per_s:.1f} tokens/s",
            )
        )
        after = dict(watch.last)
        rows.append(
            (
                "replica RSS after the traffic",
                f"peak {gib(after['VmHWM'])} = {after['VmHWM'] * 1024 / size:.3f}x checkpoint; now "
                f"{gib(after['VmRSS'])} (anonymous {gib(after['RssAnon'])}, file {gib(after['RssFile'])}); "
                f"peak anonymous seen {gib(watch.peak_anon)}",
            )
        )
        if soak.errors:
            raise RuntimeError(f"{soak.errors} errors under concurrent load")
    finally:
        watch.stop.set()
        service.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folder", type=Path, help="where the checkpoint is written, or reused when complete")
    parser.add_argument("--write-only", action="store_true", help="write the checkpoint, serve nothing")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--soak-s", type=float, default=300.0)
    parser.add_argument("--kt-gen-texts", type=int, default=64)
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    args = parser.parse_args()
    # SIGTERM (a terminal closing, `kill`) ends the run through the finally blocks: the service stops too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    folder = args.folder.resolve()
    if checkpoint_complete(folder):
        print(f"reusing the checkpoint in {folder}")
    else:
        print(f"writing a full-size NV-Embed-v2 checkpoint to {folder}")
        start = time.perf_counter()
        write_checkpoint(folder)
        print(f"  written in {time.perf_counter() - start:.0f} s")
    if args.write_only:
        return
    rows = serve_and_measure(folder, args)
    width = max(len(k) for k, _ in rows)
    print(f"\nFull-size NV-Embed-v2 (random weights) served on {os.cpu_count()} CPUs, bfloat16\n")
    print(f"| {'what'.ljust(width)} | measured |\n| {'-' * width} | --- |")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
