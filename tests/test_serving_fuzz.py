"""API fuzzing from the server's own OpenAPI schema with schemathesis: no request may get a 5xx.

The schema is the app's own (`create_app(...).openapi()`, built without loading a model); the
requests go to the real uvicorn server of test_serving_http's `setup` (keys, a registry with
adapters, small limits). Schemathesis generates valid and invalid requests (its positive and
negative modes) for every operation. Random model names mostly stop at 400/403/404, so a second
test puts real model names (right task, base, wrong task) into generated bodies to drive
generated texts, documents and options through the model. Bounded: `MAX_EXAMPLES` per
operation and test, loopback only.
"""

from __future__ import annotations

import zlib

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from retrieval_lora.models import DEFAULT_BASE
from retrieval_lora.serving import RetrievalService
from retrieval_lora.serving.app import create_app
from test_serving_http import LIMITS, OPS, setup  # noqa: F401 - the server fixture

MAX_EXAMPLES = 40
REAL_MODELS = {"/v1/embeddings": ["acme-embed", DEFAULT_BASE, "acme-rerank"],
               "/v1/rerank": ["acme-rerank", DEFAULT_BASE, "acme-embed"]}
BOUNDED = settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))

schema = schemathesis.openapi.from_dict(create_app(RetrievalService(None), limits=LIMITS).openapi())


def _call(case, url: str) -> None:
    case.call_and_validate(base_url=url, headers={"Authorization": f"Bearer {OPS}"}, checks=[not_a_server_error],
                           timeout=60)


@schema.parametrize()
@BOUNDED
def test_no_request_gets_a_server_error(case, setup) -> None:  # noqa: F811
    _call(case, setup[0])


@schema.include(method="POST").parametrize()
@BOUNDED
def test_no_request_naming_a_real_model_gets_a_server_error(case, setup) -> None:  # noqa: F811
    if isinstance(case.body, dict):  # which real name: derived from the body, so a failure replays the same
        models = REAL_MODELS[case.path]
        case.body["model"] = models[zlib.crc32(repr(case.body).encode()) % len(models)]
    _call(case, setup[0])
