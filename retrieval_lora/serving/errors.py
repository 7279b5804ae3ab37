"""Errors a serving request can end in, each with the HTTP status and code the server answers.

The Python API raises them too (they derive from `RetrievalLoraError`), so an in-process caller
sees the same messages an HTTP client does.

Status semantics (documented in the README):
- 401 `invalid_api_key`: no `Authorization: Bearer <key>` header, or a key the keys file does
  not know. Nothing else about the request is looked at.
- 403 `model_not_allowed`: the key is valid but its tenant's `models` patterns do not cover the
  requested model name. Decided from the tenant's own list only, before the registry is read,
  so the answer is the same whether the model exists or not: no tenant learns another
  tenant's adapter names (neither from 403 vs 404 nor from messages).
- 404 `model_not_found`: the tenant may use the name, but the registry has no such adapter,
  no such version, or nothing promoted for a bare name.
- 400 `invalid_request` / limit codes: malformed body, wrong endpoint for the model's task,
  or a request over a limit (the message names the limit, the value and the setting).
- 413 `request_too_large`: the body is larger than `max_body_bytes` (counted while it is read,
  whatever the transfer encoding, so an oversized chunked body is never held in memory).
- 429 `tenant_over_limit`: this tenant already has `max_queued_rows_per_tenant` rows waiting;
  other tenants are still served. `Retry-After` says when to try again.
- 503 `overloaded`: the server's queue holds `max_queued_rows` rows, or every one of the
  `max_loaded_adapters` places is in use by requests in flight; `timeout`: the request waited
  longer than `request_timeout_s`. Both carry `Retry-After`.
- 500 `server_error`: a bug; only the request that hit it fails, and its connection stays open.
"""

from __future__ import annotations

from retrieval_lora.errors import RetrievalLoraError


class ServingError(RetrievalLoraError):
    """A request that cannot be served; `status` and `code` are what the HTTP server answers."""

    status = 500
    code = "server_error"

    def __init__(self, message: str, *, code: str | None = None, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s  # sent as the Retry-After header (whole seconds, at least 1)


class InvalidRequest(ServingError):
    status = 400
    code = "invalid_request"


class Unauthorized(ServingError):
    status = 401
    code = "invalid_api_key"


class Forbidden(ServingError):
    status = 403
    code = "model_not_allowed"


class ModelNotFound(ServingError):
    status = 404
    code = "model_not_found"


class RequestTooLarge(ServingError):
    status = 413
    code = "request_too_large"


class TenantOverLimit(ServingError):
    status = 429
    code = "tenant_over_limit"


class Overloaded(ServingError):
    """The server cannot take the request now (queue full, adapter places busy, timed out)."""

    status = 503
    code = "overloaded"
