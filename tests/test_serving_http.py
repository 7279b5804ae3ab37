"""The HTTP server on loopback: real uvicorn, called with httpx and with the `openai` client.

Checks shapes and values against the Python API, concurrent mixed-adapter requests, the
401/403/404 semantics, every request limit, and a promotion picked up while the server runs.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import uvicorn

from retrieval_lora.models import DEFAULT_BASE
from retrieval_lora.registry import Registry
from retrieval_lora.serving import Embedder, Limits, Reranker, RetrievalService
from retrieval_lora.serving.app import create_app
from retrieval_lora.serving.auth import KeyRing
from retrieval_lora.serving.sources import RegistrySource
from test_serving import MAX_LEN, QUERY, TEXTS, build_adapters, register

ACME = "sk-acme-0123456789abcdef"
GLOBEX = "sk-globex-0123456789abcdef"
LIMITS = Limits(max_inputs=8, max_documents=6, max_input_chars=300, max_body_bytes=20_000)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base URL, service, registry, adapter folders) of a server running in a thread on 127.0.0.1."""
    folders = build_adapters(tmp_path_factory.getbasetemp() / "serving-adapters")
    root = tmp_path_factory.mktemp("http")
    registry = Registry(root / "registry")
    for name, folder in [("acme-embed", "emb-a"), ("acme-live", "emb-a"), ("globex-embed", "emb-b"),
                         ("acme-rerank", "rr-a")]:
        register(registry, name, folders[folder])
    keys = root / "keys.yaml"
    keys.write_text(f"tenants:\n  acme: {{keys: [{ACME}], models: ['acme-*', '{DEFAULT_BASE}']}}\n"
                    f"  globex: {{keys: [{GLOBEX}], models: ['globex-*']}}\n")
    service = RetrievalService(RegistrySource(registry), max_seq_length=MAX_LEN, batch_size=64, batch_wait_ms=10)
    service.start(["embedder", "reranker"])
    server = uvicorn.Server(uvicorn.Config(create_app(service, KeyRing(keys), LIMITS), log_level="warning",
                                           lifespan="off"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, held from the start so no other process can take it
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start within 30 s"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", service, registry, folders
    server.should_exit = True
    thread.join(timeout=10)
    service.close()
    sock.close()


def _post(url: str, path: str, body: dict, key: str | None = ACME) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


def _vectors(response: httpx.Response) -> np.ndarray:
    return np.asarray([item["embedding"] for item in response.json()["data"]], dtype=np.float32)


def test_health_needs_no_key_and_names_no_adapters(setup) -> None:
    url, *_ = setup
    response = httpx.get(url + "/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    assert "acme" not in response.text and "globex" not in response.text


def test_embeddings_match_the_python_api(setup) -> None:
    url, service, _, _ = setup
    expected = Embedder("acme-embed", service=service).encode(TEXTS)
    response = _post(url, "/v1/embeddings", {"model": "acme-embed", "input": TEXTS})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "acme-embed@1" and body["object"] == "list" and body["usage"]["total_tokens"] > len(TEXTS)
    assert [item["index"] for item in body["data"]] == list(range(len(TEXTS)))
    np.testing.assert_array_equal(_vectors(response), expected)
    single = _post(url, "/v1/embeddings", {"model": "acme-embed", "input": TEXTS[0], "encoding_format": "base64"})
    decoded = np.frombuffer(base64.b64decode(single.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(decoded, expected[0], atol=1e-6, rtol=0)


def test_openai_client_gets_the_same_embeddings(setup) -> None:
    import openai

    url, service, _, _ = setup
    client = openai.OpenAI(base_url=url + "/v1", api_key=ACME, max_retries=0)
    result = client.embeddings.create(model="acme-embed", input=TEXTS)
    assert result.model == "acme-embed@1" and len(result.data) == len(TEXTS)
    got = np.asarray([item.embedding for item in result.data], dtype=np.float32)
    np.testing.assert_allclose(got, Embedder("acme-embed", service=service).encode(TEXTS), atol=1e-6, rtol=0)
    base = client.embeddings.create(model=DEFAULT_BASE, input=["hello"])
    assert len(base.data[0].embedding) == 384
    assert {model.id for model in client.models.list()} == {DEFAULT_BASE, "acme-embed", "acme-live", "acme-rerank"}
    with pytest.raises(openai.PermissionDeniedError):
        client.embeddings.create(model="globex-embed", input=["hello"])


def test_rerank_matches_the_python_api(setup) -> None:
    url, service, _, _ = setup
    expected = Reranker("acme-rerank", service=service).rerank(QUERY, TEXTS)
    documents = [{"text": text} for text in TEXTS[:2]] + TEXTS[2:]  # Jina/Cohere v1 objects and plain strings
    response = _post(url, "/v1/rerank", {"model": "acme-rerank", "query": QUERY, "documents": documents,
                                         "top_n": 3, "return_documents": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "acme-rerank@1" and len(body["results"]) == 3
    assert [hit["index"] for hit in body["results"]] == [hit.index for hit in expected[:3]]
    assert [hit["relevance_score"] for hit in body["results"]] == [hit.relevance_score for hit in expected[:3]]
    assert body["results"][0]["document"] == {"text": TEXTS[expected[0].index]}
    plain = _post(url, "/v1/rerank", {"model": "acme-rerank", "query": QUERY, "documents": TEXTS}).json()
    assert len(plain["results"]) == len(TEXTS) and "document" not in plain["results"][0]


def test_concurrent_requests_for_different_adapters_get_their_own_results(setup) -> None:
    url, service, _, _ = setup
    calls = [("acme-embed", ACME), ("globex-embed", GLOBEX), (DEFAULT_BASE, ACME)] * 4
    expected = {model: service.embed(model, TEXTS).vectors for model, _ in calls[:3]}
    with ThreadPoolExecutor(len(calls)) as pool:
        responses = list(pool.map(lambda call: _post(url, "/v1/embeddings", {"model": call[0], "input": TEXTS},
                                                     key=call[1]), calls))
    for (model, _), response in zip(calls, responses):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(_vectors(response), expected[model], atol=1e-5, rtol=0)
    assert service.health()["bases"][0]["forward_passes"] > 0


@pytest.mark.parametrize("key, model, status, message", [
    (None, "acme-embed", 401, "missing API key"),
    ("sk-nobody-0123456789abcdef", "acme-embed", 401, "invalid API key"),
    (ACME, "globex-embed", 403, "may not use model 'globex-embed'"),      # another tenant's adapter
    (ACME, "zeta-missing", 403, "may not use model 'zeta-missing'"),      # same answer when it does not exist
    (ACME, "acme-missing", 404, "model 'acme-missing' not found"),        # its own namespace: the truth
    (ACME, "acme-embed@7", 404, "has no version 7"),
    (GLOBEX, DEFAULT_BASE, 403, "may not use model"),
])
def test_auth_semantics(setup, key, model, status, message) -> None:
    url, *_ = setup
    response = _post(url, "/v1/embeddings", {"model": model, "input": ["hello"]}, key=key)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


def test_models_list_only_what_the_key_may_use(setup) -> None:
    url, *_ = setup
    response = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {GLOBEX}"})
    assert [(m["id"], m["tasks"], m["version"]) for m in response.json()["data"]] == [("globex-embed", ["embedder"], 1)]
    assert httpx.get(url + "/v1/models").status_code == 401


@pytest.mark.parametrize("path, body, status, code", [
    ("/v1/embeddings", {"model": "acme-embed", "input": ["x"] * 9}, 400, "too_many_inputs"),
    ("/v1/embeddings", {"model": "acme-embed", "input": ["x" * 301]}, 400, "input_too_long"),
    ("/v1/embeddings", {"model": "acme-embed", "input": []}, 400, "empty_input"),
    ("/v1/embeddings", {"model": "acme-embed", "input": [101, 2023]}, 400, "invalid_request"),
    ("/v1/embeddings", {"model": "acme-embed", "input": ["x"], "dimensions": 128}, 400, "invalid_dimensions"),
    ("/v1/embeddings", {"model": "acme-rerank", "input": ["x"]}, 400, "wrong_task"),
    ("/v1/embeddings", {"input": ["x"]}, 400, "invalid_request"),
    ("/v1/rerank", {"model": "acme-rerank", "query": "q", "documents": ["d"] * 7}, 400, "too_many_documents"),
    ("/v1/rerank", {"model": "acme-rerank", "query": "q" * 301, "documents": ["d"]}, 400, "input_too_long"),
    ("/v1/rerank", {"model": "acme-rerank", "query": "q", "documents": ["d"], "top_n": 0}, 400, "invalid_request"),
    ("/v1/rerank", {"model": "acme-embed", "query": "q", "documents": ["d"]}, 400, "wrong_task"),
    ("/v1/embeddings", {"model": "acme-embed", "input": ["x" * 250] * 90}, 413, "request_too_large"),
])
def test_limits_and_bad_requests_are_clear_4xx(setup, path, body, status, code) -> None:
    url, *_ = setup
    response = _post(url, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


def test_promotion_is_picked_up_without_restart(setup) -> None:
    url, service, registry, folders = setup
    before = _post(url, "/v1/embeddings", {"model": "acme-live", "input": TEXTS})
    assert before.json()["model"] == "acme-live@1"
    register(registry, "acme-live", folders["emb-a-v2"])  # register + promote version 2 while the server runs
    after = _post(url, "/v1/embeddings", {"model": "acme-live", "input": TEXTS})
    assert after.json()["model"] == "acme-live@2"
    np.testing.assert_array_equal(_vectors(after), Embedder("acme-live@2", service=service).encode(TEXTS))
    assert not np.allclose(_vectors(after), _vectors(before), atol=1e-3)
    pinned = _post(url, "/v1/embeddings", {"model": "acme-live@1", "input": TEXTS})
    np.testing.assert_array_equal(_vectors(pinned), _vectors(before))
