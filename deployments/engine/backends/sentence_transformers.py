"""sentence-transformers models (bge, e5, mpnet, m3e, MiniLM), computed exactly as ``encode`` does.

Per micro-batch the pipeline is the model's own: its input module tokenises ``prompt + text`` with
truncation at ``max_seq_length``, the model's modules run (transformer, pooling, optional Normalize), and
``sentence_embedding`` is returned. Only the grouping into batches is ours, the encoder's attention mask
made from the texts' lengths (``encoder_mask.py``: so a CUDA launch never waits for the pass before it;
used only where it gives exactly the model's own results), and the precision: on a CPU
with bf16 the pass under bf16 autocast, on a GPU the weights converted to the configured half precision,
each of which serves only once the fidelity gate (``deployments/engine/backends/fidelity.py``) finds it
within ``fidelity_min_cosine`` of the float32 weights (on a GPU the probes run with them before they are
converted; below the bound the float32 weights load again and serve). This
is also the reference, and the fallback, of the OpenVINO runtime
(``deployments/engine/backends/openvino_backend.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from deployments.engine.backends.base import (
    EmbeddingBackend,
    EncodedText,
    PendingPass,
    ServingPath,
    pad_arrays,
)
from deployments.engine.backends.device_pass import launch_on_device, to_device
from deployments.engine.backends.encoder_mask import attention_mask_for
from deployments.engine.backends.fast_tokenizer import DirectTokenizer
from deployments.engine.backends.fidelity import (
    probe_groups,
    probe_texts,
    probe_vocabulary,
    probe_worst_cosine,
)
from deployments.engine.backends.precision import resolve_precision

log = logging.getLogger(__name__)

# A batch on the device, and whether any of its rows is padded (known on the host) -> its output there.
Pass = Callable[[dict[str, torch.Tensor], bool], torch.Tensor]
HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class SentenceTransformersBackend(EmbeddingBackend):
    def __init__(
        self,
        source: str,
        *,
        device: torch.device | None = None,
        dtype: str = "float32",
        max_seq_length: int | None = None,
        trust_remote_code: bool = False,
        threads: int = 1,
        fidelity_min_cosine: float = 0.9999,
    ):
        started = time.perf_counter()
        self.device = device if device is not None else torch.device("cpu")
        self.asynchronous = self.device.type == "cuda"  # launch returns before the pass is done
        self.threads = threads
        self.init_thread()
        self.source = source
        self.trust_remote_code = trust_remote_code
        self.configured_max_seq_length = max_seq_length
        # float32 first, as sentence-transformers loads it: the reference a half-precision GPU copy is
        # checked against (``_gate_half_weights``) before it serves.
        self.model = self._load_float32()
        for module in self.model:
            if getattr(module, "include_prompt", True) is False:
                raise ValueError(f"{source}: pooling with include_prompt=False is not supported")
        self.max_seq_length = int(self.model.max_seq_length)
        self.dimension = int(self.model.get_embedding_dimension())
        tokenizer = self.model.tokenizer
        tokenizer.padding_side = "right"  # pooling follows the attention mask; slicing needs right padding
        self.pad_values = {"input_ids": tokenizer.pad_token_id or 0}
        # The fidelity probes, drawn from this model's own vocabulary (backends/fidelity.py).
        vocabulary = probe_vocabulary(tokenizer.get_vocab()) if hasattr(tokenizer, "get_vocab") else []
        self.probes = probe_texts(self.max_seq_length, vocabulary)
        self.direct_tokenizer = self._direct_tokenizer()
        self.tokenizer_path = "direct" if self.direct_tokenizer is not None else "preprocess"
        self.masks_from_lengths = self._masks_from_lengths_agree()
        # Seconds each load step took (start-up is part of the service: benchmarks/bench_startup.py).
        self.load_seconds: dict[str, float] = {"weights": time.perf_counter() - started}
        self._pass, self.serving = self._choose_pass(source, dtype, fidelity_min_cosine)
        steps = ", ".join(f"{k} {v:.2f} s" for k, v in self.load_seconds.items())
        log.info("%s loaded in %.2f s (%s)", source, time.perf_counter() - started, steps)

    def _load_float32(self) -> SentenceTransformer:
        model = SentenceTransformer(
            self.source, device=str(self.device), trust_remote_code=self.trust_remote_code
        )
        model.to(torch.float32).eval()
        if self.configured_max_seq_length is not None:
            model.max_seq_length = self.configured_max_seq_length
        return model

    def init_thread(self) -> None:
        torch.set_num_threads(self.threads)

    # ---- which path computes the passes -------------------------------------------------------------
    def _choose_pass(self, source: str, dtype: str, min_cosine: float) -> tuple[Pass, ServingPath]:
        """torch float32; on a GPU the weights in the configured half precision, and on a CPU with bf16
        the pass under bf16 autocast, each only if it passes the fidelity gate (OpenVINO is
        ``deployments/engine/backends/openvino_backend.py``)."""
        on_gpu = self.device.type == "cuda"
        precision = resolve_precision(dtype, on_gpu)
        if precision.note:
            log.info("%s: %s", source, precision.note)
        reference = self._torch_pass(autocast=False)
        if precision.compute == "float32":
            return reference, ServingPath("torch", "float32", None, precision.note)
        if on_gpu:
            return self._gate_half_weights(precision.compute, min_cosine)
        candidate = self._torch_pass(autocast=True)
        started = time.perf_counter()
        worst = self._probe(candidate, reference)
        self.load_seconds["fidelity gate"] = time.perf_counter() - started
        if worst < min_cosine:
            note = (
                f"torch {precision.compute} gave worst cosine {worst:.6f} to torch float32 on the "
                f"fidelity probes, below fidelity_min_cosine {min_cosine}: serving torch float32"
            )
            log.warning("%s: %s", source, note)
            return reference, ServingPath("torch", "float32", worst, note)
        log.info("%s: serving torch %s (worst probe cosine %.7f)", source, precision.compute, worst)
        return candidate, ServingPath("torch", precision.compute, worst, precision.note)

    def _gate_half_weights(self, dtype: str, min_cosine: float) -> tuple[Pass, ServingPath]:
        """The weights converted to ``dtype`` (what a GPU serves), checked on the probes against the float32
        weights they were converted from; below ``min_cosine`` the float32 weights are loaded again and
        serve. Device-agnostic, so the gate is tested on CPU as it runs on a GPU."""
        started = time.perf_counter()
        run = self._torch_pass(autocast=False)  # with whatever weights the model holds when called
        items = self.tokenize(self.probes, "")

        def embed(rows: Sequence[int]) -> np.ndarray:
            return self._vectors(run, [items[i] for i in rows])

        lengths = [item.length for item in items]
        wanted = {tuple(group): embed(group) for group in probe_groups(lengths)}
        self.model.to(HALF_DTYPES[dtype])
        self.release_memory()  # the float32 blocks go back, so what the replica reserves is its half copy
        worst = probe_worst_cosine(embed, lambda rows: wanted[tuple(rows)], lengths)
        self.load_seconds["fidelity gate"] = time.perf_counter() - started
        if worst < min_cosine:
            note = (
                f"{dtype} weights gave worst cosine {worst:.6f} to float32 on the fidelity probes, below "
                f"fidelity_min_cosine {min_cosine}: serving float32 weights"
            )
            log.warning("%s: %s", self.source, note)
            self.model = None  # the half copy goes before the float32 one loads again
            self.release_memory()
            self.model = self._load_float32()
            return self._torch_pass(autocast=False), ServingPath("torch", "float32", worst, note)
        log.info("%s: serving %s weights (worst probe cosine %.7f)", self.source, dtype, worst)
        return run, ServingPath("torch", dtype, worst)

    def _probe(self, candidate: Pass, reference: Pass) -> float:
        items = self.tokenize(self.probes, "")

        def run(path: Pass) -> Callable[[Sequence[int]], np.ndarray]:
            return lambda rows: self._vectors(path, [items[i] for i in rows])

        return probe_worst_cosine(run(candidate), run(reference), [item.length for item in items])

    def _torch_pass(self, autocast: bool) -> Pass:
        @torch.inference_mode()
        def run(batch: dict[str, torch.Tensor], padded: bool) -> torch.Tensor:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                return self._modules(batch, padded)

        return run

    def _modules(self, batch: dict[str, torch.Tensor], padded: bool) -> torch.Tensor:
        """The model's modules in order, as ``SentenceTransformer.forward`` runs them; where
        ``masks_from_lengths``, the encoder is handed its attention mask made from ``padded`` instead of
        asking the device (``encoder_mask.py``), while the pooling still reads the 2-D mask."""
        if not self.masks_from_lengths:
            return self.model(batch)["sentence_embedding"]
        return self._modules_with_host_mask(batch, padded)

    def _modules_with_host_mask(self, batch: dict[str, torch.Tensor], padded: bool) -> torch.Tensor:
        first, *rest = self.model
        encoder = first.auto_model
        padding_mask = batch["attention_mask"]
        mask = attention_mask_for(encoder.config, padding_mask, encoder.dtype, padded)
        features = first({**batch, "attention_mask": mask})
        features["attention_mask"] = padding_mask  # what the pooling reads
        for module in rest:
            features = module(features)
        return features["sentence_embedding"]

    def _masks_from_lengths_agree(self) -> bool:
        """Whether the modules with the mask made on the host (``_modules``) give bit for bit what the
        model's own forward gives, on a padded batch and on an unpadded one. Where they do not (another
        kind of first module, an encoder that reads its mask some other way, another library version),
        the model's own forward serves: the same vectors, but on CUDA each launch then waits for the pass
        before it."""
        if getattr(self.model[0], "auto_model", None) is None:
            return False
        padded_texts = ["Marie Curie", "a physicist and chemist who conducted research on radioactivity"]
        try:
            for texts, padded in ((padded_texts, True), (padded_texts[:1] * 2, False)):
                items = self.tokenize(texts, "")
                assert (len({item.length for item in items}) > 1) == padded
                batch = self._batch(items)
                with torch.inference_mode():
                    own = self.model(dict(batch))["sentence_embedding"]
                    ours = self._modules_with_host_mask(batch, padded)
                if not torch.equal(own, ours):
                    raise ValueError(f"results differ from the model's own forward (padded={padded})")
        except Exception as exc:  # noqa: BLE001 - any difference: keep the model's own forward
            # On a GPU that costs the launch's overlap with the pass before it: worth an operator's look.
            level = logging.WARNING if self.device.type == "cuda" else logging.INFO
            log.log(level, "%s: the encoder makes its own attention mask (%s)", self.source, exc)
            return False
        return True

    def _compute(self, path: Pass, items: list[EncodedText]) -> torch.Tensor:
        """``path`` on ``items`` padded into one batch on the device; their lengths say whether any row
        is padded, so nothing asks the device."""
        return path(self._batch(items), len({item.length for item in items}) > 1)

    def _vectors(self, path: Pass, items: list[EncodedText]) -> np.ndarray:
        return launch_on_device(self.device, lambda: self._compute(path, items)).result()

    # ---- tokenisation ---------------------------------------------------------------------------------
    def _direct_tokenizer(self) -> DirectTokenizer | None:
        """The model's own fast tokenizer called directly, in place of sentence-transformers'
        ``preprocess``, where it gives exactly what ``preprocess`` gives on the probes, with and without a
        prompt, truncating and not; otherwise None, and ``preprocess`` stays."""
        tokenizer = getattr(self.model, "tokenizer", None)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        texts = [*self.probes, " Leading and trailing spaces ", "MiXeD CaSe ÀÉÎ"]
        try:
            direct = DirectTokenizer(
                backend.to_str(), list(getattr(tokenizer, "model_input_names", ())), self.max_seq_length
            )
            for prompt in ("", "Represent this sentence for searching relevant passages: "):
                for length in (self.max_seq_length, self.max_seq_length + 1):
                    fast = direct.encode(texts, prompt, length)
                    slow = self._tokenize_preprocess(texts, prompt, length)
                    if any(_features(a) != _features(b) for a, b in zip(fast, slow, strict=True)):
                        raise ValueError("token ids differ from preprocess")
        except Exception as exc:  # noqa: BLE001 - any difference: keep the model's own path
            log.info("tokenising through sentence-transformers' preprocess (%s)", exc)
            return None
        return direct

    def _tokenize_preprocess(self, texts: list[str], prompt: str, max_length: int) -> list[EncodedText]:
        kwargs = {}
        if max_length != self.max_seq_length:
            kwargs["processing_kwargs"] = {"text": {"max_length": max_length}}
        features = self.model.preprocess(texts, prompt=prompt or None, **kwargs)
        lengths = features["attention_mask"].sum(dim=1).tolist()
        arrays = {
            k: v.to(torch.int64).numpy()
            for k, v in features.items()
            if isinstance(v, torch.Tensor) and v.dim() == 2
        }
        return [EncodedText({k: v[i, :n] for k, v in arrays.items()}, int(n)) for i, n in enumerate(lengths)]

    # ---- the backend API ----------------------------------------------------------------------------
    def tokenize(self, texts: list[str], prompt: str, max_length: int | None = None) -> list[EncodedText]:
        if self.direct_tokenizer is not None:
            return self.direct_tokenizer.encode(texts, prompt, max_length)
        return self._tokenize_preprocess(texts, prompt, max_length or self.max_seq_length)

    def _batch(self, items: list[EncodedText]) -> dict[str, torch.Tensor]:
        host = {k: torch.from_numpy(v) for k, v in pad_arrays(items, self.pad_values).items()}
        return to_device(host, self.device)

    def forward(self, items: list[EncodedText]) -> np.ndarray:
        return self._launch(items).result()

    def launch(self, items: list[EncodedText]) -> PendingPass:
        return self._launch(items) if self.asynchronous else super().launch(items)

    def _launch(self, items: list[EncodedText]) -> PendingPass:
        return launch_on_device(self.device, lambda: self._compute(self._pass, items))


def _features(item: EncodedText) -> tuple:
    """An input's token features as plain lists, for comparing two tokenisations exactly."""
    return item.length, {k: v.tolist() for k, v in item.features.items()}
