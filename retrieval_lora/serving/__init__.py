"""Serving adapters to RAG systems: one base per model, adapters chosen per request.

- `Embedder`, `Reranker` (api.py): the in-process Python API.
- `RetrievalService` (service.py): resolution, leases and batching, shared by the API and the server.
- `create_app` (app.py): the FastAPI app (`/v1/embeddings`, `/v1/rerank`, `/v1/models`, `/health`,
  `/ready`, `/metrics`); edge.py: request ids, body limit while reading, 500s that keep the
  connection, access log; metrics.py: the Prometheus metrics.
- `Batcher` (batcher.py): per-tenant queues, bounded, shared passes; a failed shared pass is
  rerun request by request. texts.py: the Unicode check every text passes before it is queued.
- `AdapterPool` / `BaseSlot` (pool.py): bases loaded once, PEFT mixed-adapter forward passes.
- `ServiceConfig` (engine defaults, read by the API and the server), `ServeConfig` (the serve
  command: `ServiceConfig` plus registry, address, keys) and `Limits` (config.py); `KeyRing`
  (auth.py); status codes in errors.py.
"""

from retrieval_lora.serving.api import Embedder, Reranker
from retrieval_lora.serving.config import Limits, ServeConfig, ServiceConfig
from retrieval_lora.serving.errors import (
    Forbidden, InvalidRequest, ModelNotFound, Overloaded, ServingError, TenantOverLimit, Unauthorized,
)
from retrieval_lora.serving.service import Embeddings, Ranked, Ranking, RetrievalService
from retrieval_lora.serving.sources import FolderSource, RegistrySource

__all__ = ["Embedder", "Reranker", "Limits", "ServeConfig", "ServiceConfig", "ServingError", "InvalidRequest", "Unauthorized",
           "Forbidden", "ModelNotFound", "Overloaded", "TenantOverLimit", "Embeddings", "Ranked", "Ranking", "RetrievalService", "FolderSource",
           "RegistrySource"]
