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
from typing import Any

import numpy as np

from retrieval_lora.errors import ConfigError
from retrieval_lora.registry import Registry
from retrieval_lora.serving.config import ServiceConfig
from retrieval_lora.serving.service import Ranked, RetrievalService
from retrieval_lora.serving.sources import FolderSource, RegistrySource

FOLDER_MODEL = "adapter"  # the name an `adapter_dir` is served under


class _Client:
    def __init__(self, model: str | None, *, registry: str | Path | None, adapter_dir: str | Path | None,
                 service: RetrievalService | None, config: ServiceConfig | None, settings: dict[str, Any]) -> None:
        if model is not None and adapter_dir is not None:
            raise ConfigError("give either a registry model name or adapter_dir, not both")
        if service is not None and (config is not None or settings):
            # A shared service keeps its own settings; ignoring these silently would serve other ones.
            given = sorted(settings) + (["config"] if config is not None else [])
            raise ConfigError(f"give either service= or settings for a new service ({', '.join(given)}), not both; "
                              "configure the shared service itself")
        self._owns_service = service is None
        if service is None:
            source = FolderSource({FOLDER_MODEL: adapter_dir}) if adapter_dir is not None else RegistrySource(Registry(registry))
            service = RetrievalService(source, config, **settings)
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
        registry: registry folder (default: $RETRIEVAL_LORA_REGISTRY or ./registry, see `registry_root`).
        adapter_dir: an adapter folder to use instead of a registry model.
        service: share an existing service (and its loaded bases) instead of creating one.
        config, **settings: the engine settings of the service this object creates: a
            `ServiceConfig` and/or its fields by name (`base`, `max_seq_length`, `device`,
            `batch_size`, ...); unset ones take `ServiceConfig`'s defaults, the server's too.

    Raises:
        ConfigError: at construction, for model together with adapter_dir, settings together with
            service, or an unknown or invalid setting.
        ModelNotFound, InvalidRequest (a reranker adapter), ServingError: at the first `encode`.
    """

    def __init__(self, model: str | None = None, *, registry: str | Path | None = None,
                 adapter_dir: str | Path | None = None, service: RetrievalService | None = None,
                 config: ServiceConfig | None = None, **settings: Any) -> None:
        super().__init__(model, registry=registry, adapter_dir=adapter_dir, service=service, config=config,
                         settings=settings)

    def encode(self, texts: str | list[str], *, truncate: bool = True) -> np.ndarray:
        """(n, dim) float32 unit vectors for `texts` (a single string gives shape (1, dim)).

        `truncate=False` raises InvalidRequest for a text longer than the model reads, instead of cutting it.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        return self.service.embed(self.model, texts, truncate=truncate).vectors


class Reranker(_Client):
    """Score and rank documents for a query with a base plus (optionally) one reranker adapter.

    Arguments as for `Embedder`, but `model=None` (the bare base) ranks only when the base is a
    cross-encoder with a trained head; a bi-encoder base (the default) raises InvalidRequest
    (`no_reranker_head`) at the first call: give a reranker adapter. Scores are the logits through
    the base's configured activation (Sigmoid, in [0, 1], unless the base was saved with another).
    """

    def __init__(self, model: str | None = None, *, registry: str | Path | None = None,
                 adapter_dir: str | Path | None = None, service: RetrievalService | None = None,
                 config: ServiceConfig | None = None, **settings: Any) -> None:
        super().__init__(model, registry=registry, adapter_dir=adapter_dir, service=service, config=config,
                         settings=settings)

    def rerank(self, query: str, documents: list[str], top_n: int | None = None, *,
               truncate: bool = True) -> list[Ranked]:
        """`documents` by relevance to `query`, best first, each with index, score and text."""
        ranking = self.service.rerank(self.model, query, list(documents), top_n, truncate=truncate)
        return [Ranked(hit.index, hit.relevance_score, documents[hit.index]) for hit in ranking.results]

    def score(self, query: str, documents: list[str], *, truncate: bool = True) -> np.ndarray:
        """Relevance scores of `documents` for `query`, in input order (float32)."""
        ranking = self.service.rerank(self.model, query, list(documents), truncate=truncate)
        scores = np.zeros(len(documents), dtype=np.float32)
        for hit in ranking.results:
            scores[hit.index] = hit.relevance_score
        return scores
