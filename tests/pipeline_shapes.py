"""Code shaped like youtu-graphrag's retrievers' embedding calls (written from what the public code does).

Imported by the tests before ``clients.install()`` runs, with the module-level ``from sentence_transformers
import SentenceTransformer`` the upstream modules have: the one-line switch must reach names taken that way.
tree_comm's calls and the fork's semantic dedup are the examples' functions (``examples/``).
"""

from __future__ import annotations

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

MINILM_DIM = 384


class FaissFilterShape:
    """``models/retriever/faiss_filter.py`` (``DualFAISSRetriever``): the model named by
    ``embeddings.model_name``, a random projection to 384-d for any other width, tensors on ``device``."""

    def __init__(self, model_name: str, device: str = "cpu"):
        self.model = SentenceTransformer(model_name)
        self.device = torch.device(device)
        self.model_dim = self.model.get_sentence_embedding_dimension()
        self.dim_transform = None
        if self.model_dim != MINILM_DIM:  # the FAISS trap: an untrained Linear for non-384-d models
            torch.manual_seed(0)
            self.dim_transform = torch.nn.Linear(self.model_dim, MINILM_DIM)

    def node_embeddings(self, texts: list[str]) -> torch.Tensor:
        embeddings = self.model.encode(texts, convert_to_tensor=True, device=self.device)
        return self.dim_transform(embeddings) if self.dim_transform is not None else embeddings

    def one_node(self, text: str) -> torch.Tensor:
        return self.model.encode([text], convert_to_tensor=True, device=self.device)[0]

    def index_vectors(self, texts: list[str]) -> np.ndarray:
        """``encode(texts)`` then normalised in place, as ``faiss.normalize_L2`` does before IndexFlatIP."""
        vectors = self.model.encode(texts)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)  # in place: must be a writable array
        return vectors

    def search(self, index: np.ndarray, query: str, top_k: int) -> list[int]:
        q = self.model.encode([query])
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        return np.argsort(-(index @ q[0]), kind="stable")[:top_k].tolist()


class KTRetrieverShape:
    """``models/retriever/enhanced_kt_retriever.py`` (``KTRetriever``): ``embeddings.model_name`` with a
    hard-coded ``all-MiniLM-L6-v2`` fallback; single texts in loops, batches as tensors."""

    def __init__(self, model_name: str | None, device: str = "cpu", fallback: str = "all-MiniLM-L6-v2"):
        encoder = SentenceTransformer(model_name) if model_name else None
        self.qa_encoder = encoder or SentenceTransformer(fallback)
        self.device = device

    def query_embedding(self, query: str) -> torch.Tensor:
        return torch.tensor(self.qa_encoder.encode(query)).float().to(self.device)

    def node_embeddings(self, texts: list[str], batch_size: int = 96) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for start in range(0, len(texts), batch_size):
            batch = self.qa_encoder.encode(texts[start : start + batch_size], convert_to_tensor=True)
            out.extend(batch[j] for j in range(len(batch)))
        return out
