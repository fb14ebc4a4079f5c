"""sentence-transformers models (bge, e5, mpnet, m3e, MiniLM), computed exactly as ``encode`` does.

Per micro-batch the pipeline is the model's own: its input module tokenises ``prompt + text`` with
truncation at ``max_seq_length``, the model's modules run (transformer, pooling, optional Normalize), and
``sentence_embedding`` is returned. Only the grouping into batches is ours, and, on CPU, what runs the
transformer: torch float32 (the reference), torch under bf16 autocast, or OpenVINO
(``deployments/backends/openvino_runtime.py``). A fast path serves only once the fidelity gate
(``deployments/backends/fidelity.py``) finds it within ``fidelity_min_cosine`` of torch float32.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from deployments.backends.base import EmbeddingBackend, EncodedText, ServingPath, pad_right, torch_dtype
from deployments.backends.fidelity import probe_texts, probe_worst_cosine
from deployments.backends.precision import resolve_precision
from deployments.errors import input_too_long

log = logging.getLogger(__name__)

Pass = Callable[[dict[str, torch.Tensor]], np.ndarray]


class SentenceTransformersBackend(EmbeddingBackend):
    def __init__(
        self,
        source: str,
        *,
        device: torch.device,
        dtype: str = "float32",
        max_seq_length: int | None = None,
        trust_remote_code: bool = False,
        runtime: str = "torch",
        threads: int = 1,
        compile_cache_dir: Path | None = None,
        fidelity_min_cosine: float = 0.9999,
    ):
        started = time.perf_counter()
        self.device = device
        self.model = SentenceTransformer(source, device=str(device), trust_remote_code=trust_remote_code)
        self.model.to(torch_dtype(dtype, device))
        self.model.eval()
        for module in self.model:
            if getattr(module, "include_prompt", True) is False:
                raise ValueError(f"{source}: pooling with include_prompt=False is not supported")
        if max_seq_length is not None:
            self.model.max_seq_length = max_seq_length
        self.max_seq_length = int(self.model.max_seq_length)
        self.dimension = int(self.model.get_embedding_dimension())
        tokenizer = self.model.tokenizer
        tokenizer.padding_side = "right"  # pooling follows the attention mask; slicing needs right padding
        self._pad_values = {"input_ids": tokenizer.pad_token_id or 0}
        self._direct = self._direct_tokenizers()
        self.tokenizer_path = "direct" if self._direct is not None else "preprocess"
        self.serving_how = "torch"  # how the pass was obtained (OpenVINO: converted or read from the cache)
        # Seconds each load step took (start-up is part of the service: benchmarks/bench_startup.py).
        self.load_seconds: dict[str, float] = {"weights": time.perf_counter() - started}
        self._pass, self.serving = self._choose_pass(
            source, dtype, runtime, threads, compile_cache_dir, fidelity_min_cosine
        )
        steps = ", ".join(f"{k} {v:.2f} s" for k, v in self.load_seconds.items())
        log.info("%s loaded in %.2f s (%s)", source, time.perf_counter() - started, steps)

    # ---- which path computes the passes -------------------------------------------------------------
    def _choose_pass(
        self,
        source: str,
        dtype: str,
        runtime: str,
        threads: int,
        cache_dir: Path | None,
        min_cosine: float,
    ) -> tuple[Pass, ServingPath]:
        on_gpu = self.device.type == "cuda"
        precision = resolve_precision(dtype, on_gpu)
        if precision.note:
            log.info("%s: %s", source, precision.note)
        reference = self._torch_pass(autocast=False)
        if on_gpu or (runtime == "torch" and precision.compute == "float32"):
            return reference, ServingPath("torch", precision.compute, None, precision.note)
        started = time.perf_counter()
        if runtime == "openvino":
            candidate = self._openvino_pass(precision.compute, threads, cache_dir)
            self.load_seconds["openvino"] = time.perf_counter() - started
        else:
            candidate = self._torch_pass(autocast=True)
        started = time.perf_counter()
        worst = self._probe(candidate, reference)
        self.load_seconds["fidelity gate"] = time.perf_counter() - started
        if worst < min_cosine:
            note = (
                f"{runtime} {precision.compute} gave worst cosine {worst:.6f} to torch float32 on the "
                f"fidelity probes, below fidelity_min_cosine {min_cosine}: serving torch float32"
            )
            log.warning("%s: %s", source, note)
            return reference, ServingPath("torch", "float32", worst, note)
        log.info("%s: serving %s %s (worst probe cosine %.7f)", source, runtime, precision.compute, worst)
        return candidate, ServingPath(runtime, precision.compute, worst, precision.note)

    def _probe(self, candidate: Pass, reference: Pass) -> float:
        items = self.tokenize(probe_texts(self.max_seq_length), "")

        def run(path: Pass) -> Callable[[Sequence[int]], np.ndarray]:
            return lambda rows: path(self._batch([items[i] for i in rows]))

        return probe_worst_cosine(run(candidate), run(reference), len(items))

    def _torch_pass(self, autocast: bool) -> Pass:
        @torch.inference_mode()
        def run(batch: dict[str, torch.Tensor]) -> np.ndarray:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                out = self.model(batch)["sentence_embedding"]
            return out.float().cpu().numpy()

        return run

    def _openvino_pass(self, precision: str, threads: int, cache_dir: Path | None) -> Pass:
        from deployments.backends.openvino_runtime import OpenVINOTransformer

        first, rest = self.model[0], list(self.model)[1:]
        example = self._batch(self.tokenize(probe_texts(8)[:3], ""))
        transformer = OpenVINOTransformer(
            first, example, precision=precision, threads=threads, cache_dir=cache_dir
        )
        self.serving_how = f"OpenVINO model {transformer.how}"
        log.info(self.serving_how)

        @torch.inference_mode()
        def run(batch: dict[str, torch.Tensor]) -> np.ndarray:
            features: dict = dict(batch)
            features["token_embeddings"] = transformer(batch)
            for module in rest:
                features = module(features)
            return features["sentence_embedding"].float().numpy()

        return run

    # ---- tokenisation ---------------------------------------------------------------------------------
    def _direct_tokenizers(self) -> tuple[Any, Any] | None:
        """The model's own fast tokenizer, called directly (truncating at ``max_seq_length``, and at one
        more token to tell an over-long input when truncation is off), in place of sentence-transformers'
        ``preprocess``, which wraps the same call in per-request work that costs several times the
        tokenisation of a short text. Used only where it gives exactly what ``preprocess`` gives on the
        probes, with and without a prompt; otherwise None, and ``preprocess`` stays."""
        tokenizer = getattr(self.model, "tokenizer", None)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        names = list(getattr(tokenizer, "model_input_names", ()))
        if backend is None or "input_ids" not in names or "attention_mask" not in names:
            return None
        from tokenizers import Tokenizer

        def copy(max_length: int) -> Tokenizer:
            direct = Tokenizer.from_str(backend.to_str())
            direct.no_padding()
            direct.enable_truncation(max_length)
            return direct

        direct = (copy(self.max_seq_length), copy(self.max_seq_length + 1))
        self._feature_names = names
        texts = [*probe_texts(self.max_seq_length), " Leading and trailing spaces ", "MiXeD CaSe ÀÉÎ"]
        try:
            for prompt in ("", "Represent this sentence for searching relevant passages: "):
                for truncate in (True, False):
                    fast = self._tokenize_direct(direct, texts, prompt, truncate, check=False)
                    slow = self._tokenize_preprocess(texts, prompt, truncate, check=False)
                    if any(_features(a) != _features(b) for a, b in zip(fast, slow, strict=True)):
                        raise ValueError("token ids differ from preprocess")
        except Exception as exc:  # noqa: BLE001 - any difference: keep the model's own path
            log.info("tokenising through sentence-transformers' preprocess (%s)", exc)
            return None
        return direct

    def _tokenize_direct(
        self,
        direct: tuple[Any, Any],
        texts: list[str],
        prompt: str,
        truncate: bool,
        first_index: int = 0,
        check: bool = True,
    ) -> list[EncodedText]:
        encodings = direct[0 if truncate else 1].encode_batch([prompt + t for t in texts])
        items = []
        for i, e in enumerate(encodings):
            n = len(e.ids)
            if check and not truncate and n > self.max_seq_length:
                raise input_too_long(first_index + i, n, self.max_seq_length)
            columns = {"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
            features = {
                k: torch.from_numpy(np.array(columns[k], dtype=np.int64)) for k in self._feature_names
            }
            items.append(EncodedText(features, n))
        return items

    def _tokenize_preprocess(
        self, texts: list[str], prompt: str, truncate: bool, first_index: int = 0, check: bool = True
    ) -> list[EncodedText]:
        kwargs = {} if truncate else {"processing_kwargs": {"text": {"max_length": self.max_seq_length + 1}}}
        features = self.model.preprocess(texts, prompt=prompt or None, **kwargs)
        lengths = features["attention_mask"].sum(dim=1).tolist()
        if check and not truncate:
            for i, n in enumerate(lengths):
                if n > self.max_seq_length:
                    raise input_too_long(first_index + i, n, self.max_seq_length)
        tensors = {k: v for k, v in features.items() if isinstance(v, torch.Tensor) and v.dim() == 2}
        return [EncodedText({k: v[i, :n] for k, v in tensors.items()}, int(n)) for i, n in enumerate(lengths)]

    # ---- the backend API ----------------------------------------------------------------------------
    def tokenize(
        self, texts: list[str], prompt: str, truncate: bool = True, first_index: int = 0
    ) -> list[EncodedText]:
        if self._direct is not None:
            return self._tokenize_direct(self._direct, texts, prompt, truncate, first_index)
        return self._tokenize_preprocess(texts, prompt, truncate, first_index)

    def _batch(self, items: list[EncodedText]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in pad_right(items, self._pad_values).items()}

    def forward(self, items: list[EncodedText]) -> np.ndarray:
        return self._pass(self._batch(items))


def _features(item: EncodedText) -> tuple:
    """An input's token features as plain lists, for comparing two tokenisations exactly."""
    return item.length, {k: v.tolist() for k, v in item.features.items()}
