"""The ``nvembed`` backend: NV-Embed-v2 tokenised and pooled exactly as its published ``encode``.

Tokenisation (published ``NVEmbedModel.encode``): the string ``instruction + text + "</s>"`` (EOS appended
as text, before truncation, so a truncated input loses it), BOS added by the tokenizer, pad = EOS, right
padding, truncation at ``max_seq_length`` counting every token. The first
``len(tokenizer.tokenize(instruction))`` positions leave the pooling mask (not the attention).

The tokenizer is ``tokenizer.json`` of the checkpoint directory loaded as a fast tokenizer. Not
``AutoTokenizer``: on transformers 5 it rebuilds the tokenizer from the sentencepiece model and gives
other ids for text with leading spaces; and never ``text_config._name_or_path``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from deployments.engine.backends.base import (
    EmbeddingBackend,
    EncodedText,
    PendingPass,
    ServingPath,
    pad_right,
)
from deployments.engine.backends.device_pass import launch_on_device, to_device
from deployments.engine.backends.fidelity import worst_cosine
from deployments.engine.backends.nvembed_model import NVEmbedModel, build_nvembed, flash_varlen_supported
from deployments.engine.backends.precision import cpu_bf16
from deployments.protocol.errors import ClientError

log = logging.getLogger(__name__)

CHECKPOINT_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer*",
    "special_tokens_map.json",
]
TOKENIZER_FILES = ["config.json", "tokenizer*", "special_tokens_map.json"]

# oneDNN (torch's CPU matmuls) keeps the primitives it compiles, one set per pass shape, up to 1,024 by
# default. At NV-Embed's size a shape's set holds ~14 MB, so varied traffic grew a replica by up to 1.9 GiB
# over its weights (1.144x the checkpoint after 5 minutes of kt_gen traffic). Measured in process on the
# full-size model: 48 passes of new shapes grew it +0.67 GiB at the default, +0.48 GiB at 256 (flat from
# about the 30th), +0.14 GiB at 0; a capacity of 0 doubles every pass (4x32 tokens: 4.7 s against 2.3 s),
# so shapes that recur keep their primitives.
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
CPU_PRIMITIVE_CACHE = 256


def local_checkpoint(source: str, patterns: list[str]) -> Path:
    """A local directory as is; a hub id downloaded (only the files named) into the Hugging Face cache."""
    path = Path(source)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id=source, allow_patterns=patterns))


def load_nvembed_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    special = {}
    special_file = path / "special_tokens_map.json"
    if special_file.exists():
        for key, value in json.loads(special_file.read_text()).items():
            special[key] = value["content"] if isinstance(value, dict) else value
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **special)
    tokenizer.pad_token = tokenizer.eos_token  # the published code pads with EOS, on the right
    tokenizer.padding_side = "right"
    return tokenizer


def bound_cpu_primitive_cache(capacity: int = CPU_PRIMITIVE_CACHE) -> str:
    """Caps oneDNN's primitive cache for this process (an operator's own value is kept); returns the
    capacity in force. oneDNN reads the variable when it makes its first primitive, so this runs before
    the first pass."""
    return os.environ.setdefault(ONEDNN_CACHE_ENV, str(capacity))


def nvembed_dtype(dtype: str, device: torch.device) -> tuple[torch.dtype, str]:
    """NV-Embed's weights are held in the configured dtype on every device, CPU included: unlike the small
    models (float32 weights, bf16 autocast: ``precision.py``), 7.85B parameters in float32 (31.4 GB) do
    not fit the hosts it runs on beside their 16-bit copy, and a 16-bit copy is all a pass reads. On a CPU
    without bf16 or fp16 instructions the matmuls are emulated (slow); the note says so."""
    weights = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    if device.type != "cpu" or dtype == "float32":
        return weights, ""
    has_bf16, evidence = cpu_bf16()
    if dtype == "bfloat16" and has_bf16:
        return weights, ""
    if dtype == "bfloat16":
        return weights, f"bfloat16 weights on a CPU without bf16 instructions ({evidence}): emulated, slow"
    return (
        weights,
        "float16 weights on a CPU: its matmuls are emulated (slow); bfloat16 is the CPU's 16-bit type",
    )


class InstructionLengths:
    """``len(tokenize(instruction))`` per instruction, and the check that leaves room to pool."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast, mask_instruction: bool = True):
        self.tokenizer = tokenizer
        self.mask_instruction = mask_instruction
        self._cache: dict[str, int] = {}

    def __call__(self, instruction: str) -> int:
        if not instruction or not self.mask_instruction:
            return 0
        if instruction not in self._cache:
            self._cache[instruction] = len(self.tokenizer.tokenize(instruction))
        return self._cache[instruction]

    def check_room(self, prompts: dict[str, str], max_seq_length: int) -> list[str]:
        """Problems, one per prompt whose instruction leaves no position to pool within max_seq_length."""
        return [
            f"prompts.{name}: the instruction takes {self(text)} tokens, which leaves nothing to pool within "
            f"max_seq_length {max_seq_length}"
            for name, text in prompts.items()
            if self(text) >= max_seq_length
        ]


class NVEmbedBackend(EmbeddingBackend):
    def __init__(
        self,
        model: NVEmbedModel,
        tokenizer: PreTrainedTokenizerFast,
        *,
        max_seq_length: int = 4096,
        packed: bool | None = None,
        threads: int = 1,
    ):
        """The prompts are checked by ``load`` (and the config check), before the weights load.
        ``packed``: run micro-batches as one concatenated run (no padding); by default where Flash
        Attention's variable-length kernel serves it (CUDA, half precision) and agrees with the padded
        layout on a self-check at load, padded elsewhere."""
        config = model.config
        self.model = model
        self.threads = threads
        weight = next(model.parameters())
        self.device = weight.device
        self.asynchronous = self.device.type == "cuda"  # launch returns before the pass is done
        self.packed = bool(packed)
        self.max_seq_length = max_seq_length
        self.dimension = config.text.hidden_size
        self.tokenizer = tokenizer
        self.instruction_lengths = InstructionLengths(tokenizer, config.is_mask_instruction)
        self._eos = tokenizer.eos_token if config.add_eos else ""
        self._pad_values = {"input_ids": tokenizer.eos_token_id}
        if packed is None and flash_varlen_supported(weight.device, weight.dtype):
            self.packed = self.packed_layout_agrees()

    def packed_layout_agrees(self, min_cosine: float = 0.99) -> bool:
        """Embed two texts packed and padded: the packed layout is used only if it runs and agrees
        (cosine, since half precision rounds the two layouts differently). Leaves ``packed`` as found."""
        items = self.tokenize(["packing self-check", "a second, longer text packed beside the first one"], "")
        was = self.packed
        try:
            self.packed = True
            packed = self.forward(items)
            self.packed = False
            padded = self.forward(items)
        except Exception:  # noqa: BLE001 - any failure means: serve padded
            log.exception("packed NV-Embed forward failed; serving the padded layout")
            return False
        finally:
            self.packed = was
        worst = worst_cosine(packed, padded)
        if not worst >= min_cosine:
            log.warning("packed and padded NV-Embed layouts disagree (cosine %.6f); serving padded", worst)
            return False
        return True

    @classmethod
    def load(
        cls,
        source: str,
        *,
        device: torch.device,
        dtype: str = "bfloat16",
        max_seq_length: int = 4096,
        prompts: dict[str, str] | None = None,
        packed: bool | None = None,
        threads: int = 1,
    ) -> NVEmbedBackend:
        """From a checkpoint directory or hub id; the prompts are checked before the weights load."""
        torch.set_num_threads(threads)
        path = local_checkpoint(source, CHECKPOINT_FILES)
        tokenizer = load_nvembed_tokenizer(path)
        problems = InstructionLengths(tokenizer).check_room(prompts or {}, max_seq_length)
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems))
        weights, note = nvembed_dtype(dtype, device)
        if device.type == "cpu":
            log.info("%s: oneDNN primitive cache capacity %s", source, bound_cpu_primitive_cache())
        if note:
            log.warning("%s: %s", source, note)
        model = build_nvembed(path, device, weights)
        backend = cls(model, tokenizer, max_seq_length=max_seq_length, packed=packed, threads=threads)
        backend.serving = ServingPath("torch", str(weights).removeprefix("torch."), note=note)
        return backend

    def init_thread(self) -> None:
        torch.set_num_threads(self.threads)

    def tokenize(self, texts: list[str], prompt: str, max_length: int | None = None) -> list[EncodedText]:
        limit = max_length or self.max_seq_length
        strings = [prompt + text + self._eos for text in texts]
        ids = self.tokenizer(strings, truncation=True, max_length=limit, add_special_tokens=True)["input_ids"]
        masked = self.instruction_lengths(prompt)
        items = []
        for i, row in enumerate(ids):
            n = len(row)
            if masked >= n:
                raise ClientError(
                    f"the instruction takes {masked} of its {n} tokens and leaves nothing to pool; raise "
                    "max_seq_length or shorten the instruction",
                    "nothing_to_pool",
                    "input",
                    index=i,
                )
            pool = torch.ones(n, dtype=torch.long)
            pool[:masked] = 0
            items.append(
                EncodedText(
                    {
                        "input_ids": torch.tensor(row, dtype=torch.long),
                        "attention_mask": torch.ones(n, dtype=torch.long),
                        "pool_mask": pool,
                    },
                    n,
                )
            )
        return items

    def forward(self, items: list[EncodedText]) -> np.ndarray:
        return self._launch(items).result()

    def launch(self, items: list[EncodedText]) -> PendingPass:
        return self._launch(items) if self.asynchronous else super().launch(items)

    def _launch(self, items: list[EncodedText]) -> PendingPass:
        return launch_on_device(self.device, lambda: self._embed(items))

    @torch.inference_mode()
    def _embed(self, items: list[EncodedText]) -> torch.Tensor:
        """The pass, queued on the device: [rows, dimension] there."""
        if self.packed:
            return self._embed_packed(items)
        batch = to_device(pad_right(items, self._pad_values), self.device)
        # Whether any row is padded, from the host's lengths: the model never reads the mask on the host.
        padded = any(it.length != items[0].length for it in items)
        return self.model(batch["input_ids"], batch["attention_mask"] if padded else None, batch["pool_mask"])

    def _embed_packed(self, items: list[EncodedText]) -> torch.Tensor:
        lengths = torch.tensor([it.length for it in items], dtype=torch.int32)
        ends = lengths.cumsum(0, dtype=torch.int32)
        text_index = torch.repeat_interleave(torch.arange(len(items)), lengths)
        starts = (ends - lengths).to(torch.long)
        host = {
            "input_ids": torch.cat([it.features["input_ids"] for it in items]),
            "position_ids": torch.arange(int(ends[-1])) - starts[text_index],
            "pool_mask": torch.cat([it.features["pool_mask"] for it in items]),
            "text_index": text_index,
            "cu_seqlens": torch.cat([torch.zeros(1, dtype=torch.int32), ends]),
        }
        return self.model.forward_packed(**to_device(host, self.device), max_len=int(lengths.max()))
