"""Back-pressure over real HTTP: a full queue answers 503, a tenant over its share 429, a slow answer
503 `timeout`, and one tenant's flood does not delay another tenant's request.

The model is gated (its forward pass waits on an event), so each test decides exactly what is in
flight and what waits; every count is bounded and everything runs on 127.0.0.1.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from retrieval_lora.models import DEFAULT_BASE
from retrieval_lora.serving import Limits, RetrievalService
from retrieval_lora.serving.app import create_app
from test_serving import MAX_LEN, TEXTS
from test_serving_http import keys_file, running

TENANTS = {name: f"sk-{name}-0123456789abcdef" for name in ("t1", "t2", "t3")}
ROWS = 8  # rows per request in the overload tests = batch_size: one request fills one pass


class Gate:
    """Wraps the slot's forward pass: records each pass's rows and holds passes while closed."""

    def __init__(self, slot, monkeypatch) -> None:
        self.passes: list[list[str]] = []
        self.entered = threading.Event()
        self.open = threading.Event()
        real = slot.run

        def gated(inputs, adapter_names):
            self.entered.set()
            assert self.open.wait(60), "the test never opened the gate"
            self.passes.append(list(inputs))
            return real(inputs, adapter_names)

        monkeypatch.setattr(slot, "run", gated)

    def occupy(self, url: str, pool: ThreadPoolExecutor):
        """Send one request and wait until its pass is held, so the next requests must queue."""
        first = pool.submit(_embed, url, "t3", ["the one in flight"] * ROWS)
        assert self.entered.wait(30), "the first request never reached the model"
        return first


def _embed(url: str, tenant: str, texts: list[str]) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = httpx.post(url + "/v1/embeddings", json={"model": DEFAULT_BASE, "input": texts},
                          headers={"Authorization": f"Bearer {TENANTS[tenant]}"}, timeout=120)
    return response, time.perf_counter() - started


def _wait_for(condition, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    """(main URL, URL whose requests time out after 1 s, service, slot, batcher) over one small-queue service."""
    keys = keys_file(tmp_path_factory.mktemp("load") / "keys.yaml",
                     **{name: (key, [DEFAULT_BASE]) for name, key in TENANTS.items()})
    service = RetrievalService(None, max_seq_length=MAX_LEN, batch_size=ROWS, batch_wait_ms=0,
                               max_queued_rows=3 * ROWS, max_queued_rows_per_tenant=2 * ROWS)
    service.start(["embedder"])
    slot = service.pool.base_slot("embedder", DEFAULT_BASE)
    service.embed(DEFAULT_BASE, TEXTS)  # starts the batcher
    batcher = service.batchers()[0]
    try:
        with running(create_app(service, keys, Limits(request_timeout_s=120))) as url, \
                running(create_app(service, keys, Limits(request_timeout_s=1.0))) as impatient:
            yield url, impatient, service, slot, batcher
    finally:
        service.close()


def test_a_full_queue_answers_503_with_retry_after_instead_of_waiting(load, monkeypatch) -> None:
    url, _, _, slot, batcher = load
    gate = Gate(slot, monkeypatch)
    with ThreadPoolExecutor(12) as pool:
        try:
            first = gate.occupy(url, pool)
            rest = [pool.submit(_embed, url, f"t{1 + i % 3}", [f"request {i}"] * ROWS) for i in range(11)]
            _wait_for(lambda: sum(future.done() for future in rest) >= 8)  # all but the 3 queued are answered
            refused = [future.result()[0] for future in rest if future.done()]
            quick = [future.result()[1] for future in rest if future.done()]
            assert batcher.queued() == (3, 3 * ROWS)  # max_queued_rows: 24 rows
        finally:
            gate.open.set()
        answers = [first.result()[0]] + [future.result()[0] for future in rest]
    statuses = [response.status_code for response in answers]
    assert statuses.count(200) == 4, statuses  # the one in flight and the three that fit in the queue
    assert set(statuses) <= {200, 429, 503} and statuses.count(503) >= 1
    for response in refused:
        assert response.status_code in (429, 503) and int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] in ("overloaded", "tenant_over_limit")
    assert max(quick) < 10  # refused at once, while the model was still busy
    for response in answers:
        if response.status_code == 200:
            assert len(response.json()["data"]) == ROWS


def test_a_tenant_over_its_share_gets_429_while_another_tenant_is_served(load, monkeypatch) -> None:
    url, _, _, slot, batcher = load
    gate = Gate(slot, monkeypatch)
    with ThreadPoolExecutor(8) as pool:
        try:
            first = gate.occupy(url, pool)
            mine = [pool.submit(_embed, url, "t1", [f"t1 asks {i}"] * ROWS) for i in range(3)]
            _wait_for(lambda: sum(future.done() for future in mine) >= 1)
            over = [future.result()[0] for future in mine if future.done()]
            assert [response.status_code for response in over] == [429]
            assert "max_queued_rows_per_tenant" in over[0].json()["error"]["message"]
            other = pool.submit(_embed, url, "t2", ["t2 asks"] * ROWS)
            _wait_for(lambda: batcher.queued() == (3, 3 * ROWS))
        finally:
            gate.open.set()
        assert first.result()[0].status_code == 200 and other.result()[0].status_code == 200
        assert sorted(future.result()[0].status_code for future in mine) == [200, 200, 429]


def test_a_tenants_flood_does_not_delay_another_tenants_request(load, monkeypatch) -> None:
    url, _, _, slot, batcher = load
    gate = Gate(slot, monkeypatch)
    with ThreadPoolExecutor(20) as pool:
        try:
            gate.occupy(url, pool)
            flood = [pool.submit(_embed, url, "t1", [f"flood {i}"]) for i in range(2 * ROWS)]
            _wait_for(lambda: batcher.queued() == (2 * ROWS, 2 * ROWS))
            other = pool.submit(_embed, url, "t2", ["the other tenant"])
            _wait_for(lambda: batcher.queued()[0] == 2 * ROWS + 1)
        finally:
            gate.open.set()
        assert other.result()[0].status_code == 200
        assert all(future.result()[0].status_code == 200 for future in flood)
    after_first = gate.passes[1:]
    assert "the other tenant" in after_first[0]  # in the very next pass, not behind the 16 of the flood
    assert sum(len(rows) for rows in after_first) == 2 * ROWS + 1


def test_a_request_that_waits_too_long_gets_503_timeout_and_its_rows_are_dropped(load, monkeypatch) -> None:
    _, impatient, service, slot, batcher = load
    gate = Gate(slot, monkeypatch)
    with ThreadPoolExecutor(4) as pool:
        try:
            first = gate.occupy(impatient, pool)  # in flight: it cannot be stopped, but its answer is
            queued = pool.submit(_embed, impatient, "t1", ["never runs"] * ROWS)
            answers = [first.result(timeout=30), queued.result(timeout=30)]
            assert batcher.queued() == (0, 0)  # the queued one left the queue when it timed out
        finally:
            gate.open.set()
    for response, seconds in answers:
        assert response.status_code == 503 and response.json()["error"]["code"] == "timeout"
        assert "request_timeout_s" in response.json()["error"]["message"] and response.headers["retry-after"]
        assert 0.9 < seconds < 10
    _wait_for(lambda: len(gate.passes) >= 1)
    np.testing.assert_equal(service.embed(DEFAULT_BASE, ["after"]).vectors.shape, (1, 384))
    assert not any("never runs" in rows for rows in gate.passes)
