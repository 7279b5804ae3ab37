"""Serving adapters to RAG systems: one base per model, adapters chosen per request.

- `Embedder`, `Reranker` (api.py): the in-process Python API.
- `RetrievalService` (service.py): resolution, leases and batching, shared by the API and the server.
- `create_app` (app.py): the FastAPI app (`/v1/embeddings`, `/v1/rerank`, `/v1/models`, `/health`).
- `AdapterPool` / `BaseSlot` (pool.py): bases loaded once, PEFT mixed-adapter forward passes.
- `ServiceConfig` (engine defaults, read by the API and the server), `ServeConfig` (the serve
  command: `ServiceConfig` plus registry, address, keys) and `Limits` (config.py); `KeyRing`
  (auth.py); status codes in errors.py.
"""

from retrieval_lora.serving.api import Embedder, Reranker
from retrieval_lora.serving.config import Limits, ServeConfig, ServiceConfig
from retrieval_lora.serving.errors import Forbidden, InvalidRequest, ModelNotFound, ServingError, Unauthorized
from retrieval_lora.serving.service import Embeddings, Ranked, Ranking, RetrievalService
from retrieval_lora.serving.sources import FolderSource, RegistrySource

__all__ = ["Embedder", "Reranker", "Limits", "ServeConfig", "ServiceConfig", "ServingError", "InvalidRequest", "Unauthorized",
           "Forbidden", "ModelNotFound", "Embeddings", "Ranked", "Ranking", "RetrievalService", "FolderSource",
           "RegistrySource"]
