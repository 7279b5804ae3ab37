"""The in-process Python API: an embedder or reranker with an adapter, for RAG code.

It runs on the same `RetrievalService` as the HTTP server (same resolution, batching and
forward passes), so `Embedder("faq").encode(texts)` equals what `/v1/embeddings` returns for
model "faq". Several `Embedder`/`Reranker` objects can share one service, and so one base.

Example:
    from retrieval_lora.serving import Embedder, Reranker

    embedder = Embedder("support-faq", registry="registry")     # the promoted version, followed live
    vectors = embedder.encode(["how do I reset my password"])    # (1, 384) float32, unit norm
    reranker = Reranker(adapter_dir="runs/reranker/adapter")     # an adapter folder, no registry
    for hit in reranker.rerank("reset password", documents, top_n=3):
        print(hit.index, hit.relevance_score, hit.document)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from retrieval_lora.errors import ConfigError
from retrieval_lora.models import DEFAULT_BASE
from retrieval_lora.registry import Registry
from retrieval_lora.serving.service import Ranked, RetrievalService
from retrieval_lora.serving.sources import FolderSource, RegistrySource

FOLDER_MODEL = "adapter"  # the name an `adapter_dir` is served under


class _Client:
    def __init__(self, model: str | None, *, registry: str | Path | None, adapter_dir: str | Path | None,
                 base: str, max_seq_length: int | None, device: str | None, service: RetrievalService | None) -> None:
        if model is not None and adapter_dir is not None:
            raise ConfigError("give either a registry model name or adapter_dir, not both")
        self._owns_service = service is None
        if service is None:
            source = FolderSource({FOLDER_MODEL: adapter_dir}) if adapter_dir is not None else RegistrySource(Registry(registry))
            service = RetrievalService(source, base=base, device=device, max_seq_length=max_seq_length)
        self.service = service
        self.model = FOLDER_MODEL if adapter_dir is not None else (model or service.base_name)

    def close(self) -> None:
        """Stop the service's worker thread (only if this object created the service)."""
        if self._owns_service:
            self.service.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Embedder(_Client):
    """Embed texts with a base plus (optionally) one adapter.

    Args:
        model: a registry spec ("name" follows the promoted version at every call, "name@3" is
            pinned); None for the bare base.
        registry: registry folder (default: $RETRIEVAL_LORA_REGISTRY or ./registry).
        adapter_dir: an adapter folder to use instead of a registry model.
        base, max_seq_length, device: how to load the base.
        service: share an existing service (and its loaded bases) instead of creating one.

    Raises:
        ModelNotFound, InvalidRequest (a reranker adapter), ServingError: at the first `encode`.
    """

    def __init__(self, model: str | None = None, *, registry: str | Path | None = None,
                 adapter_dir: str | Path | None = None, base: str = DEFAULT_BASE, max_seq_length: int | None = None,
                 device: str | None = None, service: RetrievalService | None = None) -> None:
        super().__init__(model, registry=registry, adapter_dir=adapter_dir, base=base, max_seq_length=max_seq_length,
                         device=device, service=service)

    def encode(self, texts: str | list[str]) -> np.ndarray:
        """(n, dim) float32 unit vectors for `texts` (a single string gives shape (1, dim))."""
        return self.service.embed(self.model, [texts] if isinstance(texts, str) else list(texts)).vectors


class Reranker(_Client):
    """Score and rank documents for a query with a base plus (optionally) one reranker adapter.

    Arguments as for `Embedder`. Scores are the cross-encoder's sigmoid outputs in [0, 1].
    """

    def __init__(self, model: str | None = None, *, registry: str | Path | None = None,
                 adapter_dir: str | Path | None = None, base: str = DEFAULT_BASE, max_seq_length: int | None = None,
                 device: str | None = None, service: RetrievalService | None = None) -> None:
        super().__init__(model, registry=registry, adapter_dir=adapter_dir, base=base, max_seq_length=max_seq_length,
                         device=device, service=service)

    def rerank(self, query: str, documents: list[str], top_n: int | None = None) -> list[Ranked]:
        """`documents` by relevance to `query`, best first, each with index, score and text."""
        ranking = self.service.rerank(self.model, query, list(documents), top_n)
        return [Ranked(hit.index, hit.relevance_score, documents[hit.index]) for hit in ranking.results]

    def score(self, query: str, documents: list[str]) -> np.ndarray:
        """Relevance scores of `documents` for `query`, in input order (float32)."""
        ranking = self.service.rerank(self.model, query, list(documents))
        scores = np.zeros(len(documents), dtype=np.float32)
        for hit in ranking.results:
            scores[hit.index] = hit.relevance_score
        return scores
