"""The HTTP server on loopback: real uvicorn, called with httpx, the `openai` client and raw sockets.

Checks shapes and values against the Python API, concurrent mixed-adapter requests, the
401/403/404 semantics, every request limit, a promotion picked up while the server runs, and
the edge: a poison text from one tenant failing none of another tenant's concurrent requests,
a chunked body over the limit refused while it is read, a 500 that keeps its connection,
request ids, /ready and /metrics (parsed with the Prometheus client's own parser).
"""

from __future__ import annotations

import base64
import json
import select
import socket
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

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
OPS = "sk-ops-0123456789abcdef"  # an operator key: every model, so it may read /metrics
LIMITS = Limits(max_inputs=8, max_documents=6, max_input_chars=300, max_body_bytes=20_000)


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn in a thread on a free port of 127.0.0.1; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, held from the start so no other process can take it
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start within 30 s"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def keys_file(path, **tenants: tuple[str, list[str]]) -> KeyRing:
    """A keys file with `tenant=(key, model patterns)` entries."""
    path.write_text("tenants:\n" + "".join(f"  {name}: {{keys: [{key}], models: {json.dumps(models)}}}\n"
                                           for name, (key, models) in tenants.items()))
    return KeyRing(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(base URL, service, registry, adapter folders) of a server running in a thread on 127.0.0.1."""
    folders = build_adapters(tmp_path_factory.getbasetemp() / "serving-adapters")
    root = tmp_path_factory.mktemp("http")
    registry = Registry(root / "registry")
    for name, folder in [("acme-embed", "emb-a"), ("acme-live", "emb-a"), ("globex-embed", "emb-b"),
                         ("acme-rerank", "rr-a")]:
        register(registry, name, folders[folder])
    keys = keys_file(root / "keys.yaml", acme=(ACME, ["acme-*", DEFAULT_BASE]), globex=(GLOBEX, ["globex-*"]),
                     ops=(OPS, ["*"]))
    service = RetrievalService(RegistrySource(registry), max_seq_length=MAX_LEN, batch_size=64, batch_wait_ms=10)
    service.start(["embedder", "reranker"])
    try:
        with running(create_app(service, keys, LIMITS)) as url:
            yield url, service, registry, folders
    finally:
        service.close()


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
    ("/v1/embeddings", {"model": "acme-embed", "input": ""}, 400, "empty_input"),
    ("/v1/embeddings", {"model": "acme-embed", "input": ["fine", " \t\n "]}, 400, "empty_input"),
    ("/v1/rerank", {"model": "acme-rerank", "query": "  ", "documents": ["d"]}, 400, "empty_input"),
    ("/v1/rerank", {"model": "acme-rerank", "query": "q", "documents": ["d", ""]}, 400, "empty_input"),
    ("/v1/embeddings", {"model": "acme-embed", "input": ["word " * 60], "truncate": False}, 400, "input_too_long"),
    ("/v1/rerank", {"model": "acme-rerank", "query": "q", "documents": ["d " * 60], "truncate": False}, 400,
     "input_too_long"),
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


# ---- the edge: poison, body limit, errors, request ids, readiness, metrics ----------------------
def _raw_post(url: str, path: str, body: dict, key: str) -> httpx.Response:
    """POST with the body as ASCII JSON (`\\ud800` stays an escape: httpx itself cannot encode a lone surrogate)."""
    return httpx.post(url + path, content=json.dumps(body).encode("ascii"), timeout=120,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})


@pytest.mark.parametrize("path, poison", [
    ("/v1/embeddings", {"model": "acme-embed", "input": ["fine", "bad \ud800 text"]}),
    ("/v1/rerank", {"model": "acme-rerank", "query": "q", "documents": ["fine", "\udfff"]}),
])
def test_a_poison_text_gets_400_and_every_concurrent_request_of_another_tenant_succeeds(setup, path,
                                                                                        poison) -> None:
    url, service, _, _ = setup
    expected = service.embed("globex-embed", TEXTS).vectors
    calls = [("poison", i) for i in range(20)] + [("valid", i) for i in range(60)]
    calls.sort(key=lambda call: (call[1] % 4, call[0]))  # interleaved, so they share forward passes

    def send(call):
        if call[0] == "poison":
            return _raw_post(url, path, poison, ACME)
        return _post(url, "/v1/embeddings", {"model": "globex-embed", "input": TEXTS}, key=GLOBEX)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(send, calls))
    for (kind, _), response in zip(calls, responses):
        if kind == "poison":
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "invalid_text"
            assert "not valid Unicode" in response.json()["error"]["message"]
        else:
            assert response.status_code == 200, response.text
            np.testing.assert_allclose(_vectors(response), expected, atol=1e-5, rtol=0)


def _read_response(sock: socket.socket, timeout: float = 60) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response (with Content-Length) read off a raw socket: (status, headers, body)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection; got {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def test_an_unexpected_error_is_a_500_for_that_request_only_and_keeps_the_connection(setup, monkeypatch) -> None:
    url, service, _, _ = setup

    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(service, "models", broken)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ACME}\r\n"
                     "X-Request-ID: trace-42\r\n\r\n".encode())
        status, headers, body = _read_response(sock)
        assert status == 500 and headers["x-request-id"] == "trace-42"
        error = json.loads(body)["error"]
        assert error["code"] == "server_error" and "trace-42" in error["message"] and "a bug" not in error["message"]
        assert headers.get("connection") != "close"
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection serves the next request
        status, _, body = _read_response(sock)
        assert status == 200 and json.loads(body)["status"] == "ok"


def test_a_chunked_body_over_the_limit_is_refused_while_it_is_read(setup) -> None:
    """413 after about max_body_bytes arrived, without a Content-Length, and memory does not grow with the body."""
    url, *_ = setup
    host, port = url.removeprefix("http://").split(":")
    piece = b"x" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    offered = 64 * 2**20  # what the client would send if nobody stopped it: 3000 times the limit
    tracemalloc.start()
    try:
        baseline = tracemalloc.get_traced_memory()[0]
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ACME}\r\n"
                         "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
            sent = 0
            while sent < offered:
                readable, writable, _ = select.select([sock], [sock], [], 30)
                if readable:
                    break
                if writable:
                    try:
                        sock.sendall(chunk)
                    except (ConnectionResetError, BrokenPipeError):
                        # The server answered and closed while our bytes were still in flight: its kernel resets
                        # the connection. The 413 arrived before the reset and is still ours to read.
                        break
                    sent += len(piece)
            status, headers, body = _read_response(sock)
        peak = tracemalloc.get_traced_memory()[1] - baseline
    finally:
        tracemalloc.stop()
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    assert "max_body_bytes" in json.loads(body)["error"]["message"] and headers["connection"] == "close"
    assert sent < offered  # refused before the body ended
    assert peak < LIMITS.max_body_bytes + 2 * 2**20, f"memory grew by {peak} bytes"


def test_unknown_routes_and_methods_answer_in_openai_error_shape(setup) -> None:
    url, *_ = setup
    missing = httpx.get(url + "/v1/chat/completions")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    wrong = httpx.get(url + "/v1/embeddings")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    garbage = httpx.post(url + "/v1/embeddings", content=b"{not json", headers={"Authorization": f"Bearer {ACME}",
                                                                              "Content-Type": "application/json"})
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "invalid_request"


def test_request_ids_are_echoed_or_made(setup) -> None:
    url, *_ = setup
    given = httpx.post(url + "/v1/rerank", json={"model": "acme-rerank", "query": "q", "documents": ["d"]},
                       headers={"Authorization": f"Bearer {ACME}", "X-Request-ID": "client-7"})
    assert given.headers["x-request-id"] == "client-7" and given.json()["id"] == "client-7"
    made = httpx.get(url + "/health", headers={"X-Request-ID": "not a token\t!"})
    assert len(made.headers["x-request-id"]) == 32 and made.headers["x-request-id"] != "not a token\t!"


def test_ready_is_separate_from_health(setup) -> None:
    url, service, _, _ = setup
    ready = httpx.get(url + "/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert {base["task"] for base in ready.json()["bases"]} == {"embedder", "reranker"}
    loading = RetrievalService(None, max_seq_length=MAX_LEN)  # nothing started yet
    with running(create_app(loading)) as other:
        assert httpx.get(other + "/health").status_code == 200
        not_yet = httpx.get(other + "/ready")
        assert not_yet.status_code == 503 and not_yet.headers["retry-after"] and not_yet.json()["status"] == "loading"
    loading.close()


def test_metrics_parse_with_the_prometheus_parser_and_count_what_happened(setup) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    url, *_ = setup
    assert _post(url, "/v1/embeddings", {"model": "acme-embed", "input": TEXTS}).status_code == 200
    assert _post(url, "/v1/embeddings", {"model": "acme-missing", "input": TEXTS}).status_code == 404
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ACME}"}).status_code == 403
    response = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {OPS}"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    ok = ("retrieval_lora_requests_total", (("endpoint", "/v1/embeddings"), ("model", "acme-embed"), ("status", "200")))
    assert samples[ok] >= 1
    assert samples[("retrieval_lora_requests_total", (("endpoint", "/v1/embeddings"), ("model", ""),
                                                      ("status", "404")))] >= 1  # a made-up name is no label
    assert samples[("retrieval_lora_request_duration_seconds_count", ok[1])] >= 1
    for name in ("retrieval_lora_queue_rows", "retrieval_lora_queue_requests", "retrieval_lora_adapters_loaded",
                 "retrieval_lora_batch_rows", "retrieval_lora_batch_adapters", "retrieval_lora_forward_passes",
                 "retrieval_lora_isolated_failures", "retrieval_lora_rejected"):
        assert name in families, name
    assert samples[("retrieval_lora_batch_rows_count", (("task", "embedder"),))] >= 1
    assert samples[("retrieval_lora_adapters_loaded", (("task", "embedder"),))] >= 1
    forbidden = _post(url, "/v1/embeddings", {"model": "zeta-secret", "input": ["x"]})  # 403: the name is not kept
    assert forbidden.status_code == 403
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {OPS}"}).text
    assert "zeta-secret" not in text and "acme-missing" not in text
