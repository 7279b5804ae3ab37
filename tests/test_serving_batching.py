"""The batcher alone, on a fake slot (no model): tenant turns, queue bounds, cancelling, isolation.

Fast and deterministic: the fake slot records every pass and can be held (like a busy model)
so that the tests decide exactly what waits in the queue.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from retrieval_lora.serving.batcher import Batcher
from retrieval_lora.serving.errors import Overloaded, TenantOverLimit


class FakeSlot:
    """Answers each row with its length; `hold` blocks passes until released; rows 'poison' raise."""

    task = "embedder"

    def __init__(self) -> None:
        self.passes: list[list[str]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.running = threading.Event()

    def run(self, inputs: list, adapter_names: list[str]):
        self.running.set()
        self.hold.wait(30)
        self.passes.append(list(inputs))
        if any("poison" in row for row in inputs):
            raise ValueError("the tokenizer rejects this text")
        return np.asarray([len(row) for row in inputs], dtype=np.float32), [1] * len(inputs)


def batcher(slot: FakeSlot, **overrides) -> Batcher:
    settings = dict(batch_size=4, wait_s=0.0, max_queued_rows=100, max_queued_rows_per_tenant=100) | overrides
    return Batcher(slot, **settings)


def _busy(slot: FakeSlot, work: Batcher) -> None:
    """Occupy the worker with one pass that waits on `slot.hold`, so later jobs queue up."""
    slot.hold.clear()
    slot.running.clear()
    work.submit(["x"], ["base"], "warmup")
    assert slot.running.wait(10)


def test_tenants_take_turns_so_a_flood_cannot_starve_another_tenant() -> None:
    slot = FakeSlot()
    work = batcher(slot)
    try:
        _busy(slot, work)
        flood = [work.submit([f"a{i}"], ["base"], "tenant-a") for i in range(40)]
        other = work.submit(["b0"], ["base"], "tenant-b")
        slot.hold.set()
        assert other.result(timeout=10)[0].tolist() == [2.0]
        for future in flood:
            future.result(timeout=10)
        passes = slot.passes[1:]  # after the warmup pass
        first_with_b = next(i for i, rows in enumerate(passes) if "b0" in rows)
        assert first_with_b == 0, passes[:2]  # B's request rides in the very next pass, not after A's 40
        assert all(len(rows) <= 4 for rows in passes)
    finally:
        slot.hold.set()
        work.close()


def test_queue_bounds_answer_503_and_429_with_retry_after() -> None:
    slot = FakeSlot()
    work = batcher(slot, max_queued_rows=10, max_queued_rows_per_tenant=6)
    try:
        _busy(slot, work)
        accepted = [work.submit(["r"] * 3, ["base"] * 3, "a") for _ in range(2)]  # a: 6 rows waiting
        with pytest.raises(TenantOverLimit, match="already has 6 rows waiting.*max_queued_rows_per_tenant") as caught:
            work.submit(["r"], ["base"], "a")
        assert caught.value.status == 429 and caught.value.retry_after_s >= 1
        accepted.append(work.submit(["r"] * 4, ["base"] * 4, "b"))  # 10 rows in all
        with pytest.raises(Overloaded, match="10 rows wait .*max_queued_rows=10") as caught:
            work.submit(["r"], ["base"], "c")
        assert caught.value.status == 503 and 1 <= caught.value.retry_after_s <= 60
        assert work.queued() == (3, 10) and work.stats.rejected_overloaded == 1 and work.stats.rejected_tenant == 1
        slot.hold.set()
        for future in accepted:
            future.result(timeout=10)
        assert work.queued() == (0, 0)
        big = work.submit(["r"] * 50, ["base"] * 50, "a")  # bigger than a tenant's bound, but nothing of a's waits
        assert big.result(timeout=10)[0].shape == (50,)
    finally:
        slot.hold.set()
        work.close()


def test_a_cancelled_job_leaves_the_queue_at_once_and_never_runs() -> None:
    slot = FakeSlot()
    work = batcher(slot, max_queued_rows=5)
    try:
        _busy(slot, work)
        doomed = work.submit(["gone"] * 5, ["base"] * 5, "a")
        assert work.queued() == (1, 5)
        assert doomed.cancel()
        assert work.queued() == (0, 0)
        kept = work.submit(["kept"] * 5, ["base"] * 5, "b")  # the place it held is free again
        slot.hold.set()
        assert kept.result(timeout=10)[0].tolist() == [4.0] * 5
        assert not any("gone" in rows for rows in slot.passes)
    finally:
        slot.hold.set()
        work.close()


def test_only_the_request_that_fails_alone_gets_the_error() -> None:
    slot = FakeSlot()
    work = batcher(slot, batch_size=8)
    try:
        _busy(slot, work)
        good = [work.submit([f"ok{i}", "fine"], ["base"] * 2, "b") for i in range(3)]
        bad = work.submit(["poison"], ["base"], "a")
        slot.hold.set()
        with pytest.raises(ValueError, match="rejects"):
            bad.result(timeout=10)
        assert [future.result(timeout=10)[0].tolist() for future in good] == [[3.0, 4.0]] * 3
        assert work.stats.isolated_failures == 1
        assert work.submit(["after"], ["base"], "b").result(timeout=10)[0].tolist() == [5.0]  # the worker lives on
    finally:
        slot.hold.set()
        work.close()


def test_close_finishes_queued_jobs_and_refuses_new_ones() -> None:
    slot = FakeSlot()
    work = batcher(slot)
    _busy(slot, work)
    queued = work.submit(["last"], ["base"], "a")
    closer = threading.Thread(target=work.close)
    closer.start()
    time.sleep(0.05)
    with pytest.raises(Overloaded, match="shutting down"):
        work.submit(["late"], ["base"], "a")
    slot.hold.set()
    closer.join(10)
    assert queued.result(timeout=1)[0].tolist() == [4.0]


def test_short_and_long_rows_go_in_separate_passes_and_come_back_in_order() -> None:
    slot = FakeSlot()
    rows = ["q" * 12, "d" * 300, "q" * 10, "d" * 280, "q" * 11, "d" * 290]
    work = batcher(slot, batch_size=8)
    try:
        out, _ = work.submit(rows, ["base"] * len(rows), "a").result(10)
    finally:
        work.close()
    assert out.tolist() == [float(len(row)) for row in rows]  # each row its own answer, in input order
    assert [sorted(map(len, p)) for p in slot.passes] == [[280, 290, 300], [10, 11, 12]]


def test_length_chunks_bound_padding_and_batch_size() -> None:
    from retrieval_lora.serving.batcher import length_chunks

    lengths = [100] * 10 + [10] * 10
    chunks = length_chunks(lengths, batch_size=4)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(20))
    assert all(len(chunk) <= 4 for chunk in chunks)
    for chunk in chunks:
        longest, total = max(lengths[i] for i in chunk), sum(lengths[i] for i in chunk)
        assert len(chunk) * longest <= 1.25 * total
    assert len(length_chunks([50] * 9, batch_size=32)) == 1  # equal lengths: one pass
    assert length_chunks([100, 10], batch_size=32, max_padding=10.0) == [[0, 1]]
