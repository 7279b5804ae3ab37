"""The FastAPI app: OpenAI-compatible embeddings, Cohere/Jina-compatible rerank, models, health.

Every request goes: key (401) -> may this tenant use the model name (403) -> request limits
(400) -> resolve the version and lease it (404 / 400 for the wrong task) -> shared forward
passes in the batcher. Errors have OpenAI's shape: `{"error": {"message", "type", "code"}}`.
`GET /health` needs no key and names no adapters. See errors.py for the status semantics.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from retrieval_lora.serving.auth import OPEN_ACCESS, KeyRing, Tenant
from retrieval_lora.serving.config import Limits
from retrieval_lora.serving.errors import InvalidRequest, RequestTooLarge, ServingError
from retrieval_lora.serving.schemas import EmbeddingsRequest, RerankRequest
from retrieval_lora.serving.service import RetrievalService
from retrieval_lora.serving.sources import split_spec

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": code, "code": code}}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"'{where}': {error.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def _install_error_handlers(app: FastAPI, limits: Limits) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, exc.code, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "invalid_request", _validation_message(exc))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        return _error(500, "server_error", f"internal error ({type(exc).__name__}); see the server log")

    @app.middleware("http")
    async def body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            error = RequestTooLarge(f"request body is {length} bytes; the limit is {limits.max_body_bytes} "
                                    "(max_body_bytes): send fewer or shorter texts per request")
            return _error(error.status, error.code, str(error))
        return await call_next(request)


def create_app(service: RetrievalService, keys: KeyRing | None = None, limits: Limits | None = None) -> FastAPI:
    """The HTTP app over `service`; `keys=None` lets every caller use every model (loopback only)."""
    limits = limits or Limits()
    app = FastAPI(title="retrieval-lora", version="1", description=__doc__)
    app.state.service = service
    _install_error_handlers(app, limits)

    def tenant(request: Request) -> Tenant:
        return OPEN_ACCESS if keys is None else keys.authenticate(request.headers.get("authorization"))

    def allowed(who: Tenant, model: str) -> None:
        who.check(model if model == service.base_name else split_spec(model)[0])

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @app.get("/v1/models")
    async def models(who: Tenant = Depends(tenant)) -> dict:
        infos = await run_in_threadpool(service.models)
        return {"object": "list", "data": [
            {"id": info.id, "object": "model", "created": 0, "owned_by": "retrieval-lora", "tasks": info.tasks,
             "version": info.version, "base_model": info.base_model} for info in infos if who.allows(info.id)]}

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingsRequest, who: Tenant = Depends(tenant)) -> dict:
        allowed(who, body.model)
        texts = body.texts()
        limits.check_inputs(texts)
        future = await run_in_threadpool(service.submit_embed, body.model, texts)
        result = await asyncio.wrap_future(future)
        dim = result.vectors.shape[1]
        if body.dimensions is not None and body.dimensions != dim:
            raise InvalidRequest(f"model {result.model} returns {dim}-dimensional embeddings; omit 'dimensions' "
                                 f"or set it to {dim}", code="invalid_dimensions")
        return {"object": "list", "model": result.model,
                "data": [{"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
                         for i, vector in enumerate(result.vectors)],
                "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}}

    @app.post("/v1/rerank")
    async def rerank(body: RerankRequest, who: Tenant = Depends(tenant)) -> dict:
        allowed(who, body.model)
        documents = body.document_texts()
        limits.check_rerank(body.query, documents)
        future = await run_in_threadpool(service.submit_rerank, body.model, body.query, documents, body.top_n)
        ranking = await asyncio.wrap_future(future)
        results = []
        for hit in ranking.results:
            item = {"index": hit.index, "relevance_score": hit.relevance_score}
            if body.return_documents:
                item["document"] = {"text": documents[hit.index]}
            results.append(item)
        return {"id": uuid.uuid4().hex, "model": ranking.model, "results": results,
                "usage": {"total_tokens": ranking.tokens}, "meta": {"billed_units": {"search_units": 1}}}

    return app


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the openai client asks for by default: little-endian float32
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
