"""The FastAPI app: OpenAI-compatible embeddings, Cohere/Jina-compatible rerank, models, health, metrics.

Every request goes: edge (request id, body limit while reading, 413; edge.py) -> key (401) ->
may this tenant use the model name (403) -> request limits and text checks (400) -> resolve
the version and lease it (404 / 400 for the wrong task / 503 when every adapter place is
busy) -> the tenant's queue in the batcher (429 / 503 when full) -> shared forward passes,
waited for at most `request_timeout_s` (then 503 `timeout`). Errors have OpenAI's shape,
unknown routes included: `{"error": {"message", "type", "param", "code"}}`; 429 and 503 carry
`Retry-After`. See errors.py for the status semantics.

`GET /health` (liveness) and `GET /ready` (200 once the bases and preloaded adapters are in
memory, else 503) need no key and name no adapters. `GET /metrics` is Prometheus text; since
it names adapters, a server with keys serves it only to a tenant whose models are `["*"]`.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
from concurrent.futures import Future

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from retrieval_lora.serving.auth import OPEN_ACCESS, KeyRing, Tenant
from retrieval_lora.serving.config import Limits
from retrieval_lora.serving.edge import EdgeMiddleware, error_body
from retrieval_lora.serving.errors import Forbidden, InvalidRequest, ModelNotFound, Overloaded, ServingError
from retrieval_lora.serving.metrics import CONTENT_TYPE, exposition, metrics_registry
from retrieval_lora.serving.schemas import EmbeddingsRequest, RerankRequest
from retrieval_lora.serving.service import RetrievalService
from retrieval_lora.serving.sources import split_spec

HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body") or "body"
        parts.append(f"'{where}': {error.get('msg')}")
    return "invalid request: " + "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServingError)
    async def serving_error(request: Request, exc: ServingError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        return _error(exc.status, exc.code, str(exc), headers or None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "invalid_request", _validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Unknown routes (404), wrong methods (405), unparsable bodies (400): OpenAI's shape too."""
        code = HTTP_CODES.get(exc.status_code, "invalid_request")
        message = {404: f"no route {request.method} {request.url.path}: the API is /v1/embeddings, /v1/rerank, "
                        "/v1/models, /health, /ready and /metrics",
                   405: f"{request.url.path} does not accept {request.method}"}.get(exc.status_code, str(exc.detail))
        return _error(exc.status_code, code, message, getattr(exc, "headers", None))


async def _outcome(future: Future, started: float, limits: Limits):
    """The result of `future`, or 503 `timeout` once the request is `request_timeout_s` old (its rows are dropped)."""
    remaining = limits.request_timeout_s - (time.monotonic() - started)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout=max(remaining, 0.001))
    except TimeoutError:
        future.cancel()
        raise Overloaded(f"no answer within {limits.request_timeout_s:g}s (request_timeout_s): the server is busy; "
                         "retry later", code="timeout", retry_after_s=1) from None


def create_app(service: RetrievalService, keys: KeyRing | None = None, limits: Limits | None = None) -> FastAPI:
    """The HTTP app over `service`; `keys=None` lets every caller use every model (loopback only)."""
    limits = limits or Limits()
    app = FastAPI(title="retrieval-lora", version="1", description=__doc__)
    app.state.service = service
    registry, request_metrics = metrics_registry(service)
    _install_error_handlers(app)

    def tenant(request: Request) -> Tenant:
        who = OPEN_ACCESS if keys is None else keys.authenticate(request.headers.get("authorization"))
        request.state.tenant = who.name
        return who

    def allowed(who: Tenant, model: str) -> str:
        """The model's name without version, once `who` may use it (403 otherwise)."""
        name = model if model == service.base_name else split_spec(model)[0]
        who.check(name)
        return name

    async def submit(request: Request, name: str, call) -> Future:
        """`call()` in the thread pool; the metrics label is the model's name once it resolved (a name
        this tenant may use and that exists), so callers cannot make labels up."""
        try:
            future = await run_in_threadpool(call)
        except ModelNotFound:
            raise
        except ServingError:
            request.state.model = name
            raise
        request.state.model = name
        return future

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @app.get("/ready")
    async def ready() -> JSONResponse:
        loaded = [{"task": slot.task, "base": slot.base} for slot in service.pool.slots()]
        if service.ready:
            return JSONResponse({"status": "ready", "bases": loaded})
        return JSONResponse({"status": "loading", "bases": loaded}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if keys is not None and "*" not in tenant(request).models:
            raise Forbidden("/metrics names every adapter: use the key of a tenant whose models are ['*'] "
                            "(an operator key)")
        return Response(exposition(registry), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(who: Tenant = Depends(tenant)) -> dict:
        infos = await run_in_threadpool(service.models)
        return {"object": "list", "data": [
            {"id": info.id, "object": "model", "created": 0, "owned_by": "retrieval-lora", "tasks": info.tasks,
             "version": info.version, "base_model": info.base_model} for info in infos if who.allows(info.id)]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request, body: EmbeddingsRequest, who: Tenant = Depends(tenant)) -> dict:
        started = time.monotonic()
        name = allowed(who, body.model)
        texts = body.texts()
        limits.check_inputs(texts)
        future = await submit(request, name, lambda: service.submit_embed(body.model, texts, tenant=who.name,
                                                                          truncate=body.truncate))
        result = await _outcome(future, started, limits)
        dim = result.vectors.shape[1]
        if body.dimensions is not None and body.dimensions != dim:
            raise InvalidRequest(f"model {result.model} returns {dim}-dimensional embeddings; omit 'dimensions' "
                                 f"or set it to {dim}", code="invalid_dimensions")
        return {"object": "list", "model": result.model,
                "data": [{"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
                         for i, vector in enumerate(result.vectors)],
                "usage": {"prompt_tokens": result.tokens, "total_tokens": result.tokens}}

    @app.post("/v1/rerank")
    async def rerank(request: Request, body: RerankRequest, who: Tenant = Depends(tenant)) -> dict:
        started = time.monotonic()
        name = allowed(who, body.model)
        documents = body.document_texts()
        limits.check_rerank(body.query, documents)
        future = await submit(request, name, lambda: service.submit_rerank(
            body.model, body.query, documents, body.top_n, tenant=who.name, truncate=body.truncate))
        ranking = await _outcome(future, started, limits)
        results = []
        for hit in ranking.results:
            item = {"index": hit.index, "relevance_score": hit.relevance_score}
            if body.return_documents:
                item["document"] = {"text": documents[hit.index]}
            results.append(item)
        return {"id": request.state.request_id, "model": ranking.model, "results": results,
                "usage": {"total_tokens": ranking.tokens}, "meta": {"billed_units": {"search_units": 1}}}

    endpoints = frozenset(route.path for route in app.routes)
    app.add_middleware(EdgeMiddleware, max_body_bytes=limits.max_body_bytes, endpoints=endpoints,
                       metrics=request_metrics)
    return app


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":  # what the openai client asks for by default: little-endian float32
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
