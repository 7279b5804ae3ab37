"""Micro-batching: requests that arrive together for one base share its forward passes.

Each `BaseSlot` gets one `Batcher` with one worker thread. A request submits its rows (with
the PEFT adapter name of each row) under a tenant name and gets a `concurrent.futures.Future`.
The worker waits up to `wait_s` for more while fewer than `batch_size` rows wait, then takes
jobs round-robin across tenants (one job per tenant per turn) until it has `batch_size` rows,
and runs them through `run_rows`: rows are sorted by length (less padding, as
sentence-transformers does) and cut into chunks of at most `batch_size` rows, a new chunk
starting early where padding to the chunk's longest row would waste more than
`MAX_PADDING` of its work (a pass of short queries and long documents becomes two passes);
each chunk is one mixed-adapter forward pass. Results go back to each job in its own order.

Guarantees:
- One request's rows can never fail another's: when a shared pass raises, every job of it is
  run again alone, so only the job that fails alone gets the error.
- Fairness: each tenant has its own queue and the worker serves them in turn, so a tenant with
  a thousand requests waiting delays another tenant's request by at most one turn.
- Bounded memory and latency: at most `max_queued_rows` rows wait in all (then `Overloaded`,
  503) and at most `max_queued_rows_per_tenant` per tenant (then `TenantOverLimit`, 429), both
  with a Retry-After estimated from the measured time per row. A request bigger than a bound is
  still taken when nothing of its kind waits, so every request the limits allow can run.
- A cancelled job (its request timed out) leaves the queue at once and never runs.

`run_rows` is also what the in-process Python API calls directly, so both paths compute the
same thing the same way.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from retrieval_lora.serving.errors import Overloaded, TenantOverLimit
from retrieval_lora.serving.pool import BaseSlot

log = logging.getLogger(__name__)
RETRY_AFTER_MAX_S = 60.0


def _length(row: object) -> int:
    return sum(len(part) for part in row) if isinstance(row, tuple) else len(str(row))


# A chunk ends before the row that would make padding more than this share of its real work
# (rows x longest row > (1 + MAX_PADDING) x the rows' lengths summed). Measured in
# evals/results/serving.md: an embed mix of short queries and 64-word documents at batch 32.
MAX_PADDING = 0.25


def length_chunks(lengths: list[int], batch_size: int, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Row indices, longest first, cut into chunks of at most `batch_size` rows whose padded size
    (rows x the chunk's longest row) stays within (1 + `max_padding`) x their summed lengths."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    for index in order:
        chunk = chunks[-1] if chunks else None
        if chunk and len(chunk) < batch_size:
            longest, total = lengths[chunk[0]], sum(lengths[i] for i in chunk) + lengths[index]
            if (len(chunk) + 1) * longest <= (1 + max_padding) * max(total, 1):
                chunk.append(index)
                continue
        chunks.append([index])
    return chunks


def run_rows(slot: BaseSlot, inputs: list, adapter_names: list[str], batch_size: int) -> tuple[np.ndarray, list[int]]:
    """Run `inputs` (row i through adapter `adapter_names[i]`) in length-sorted chunks (`length_chunks`).

    Returns (outputs in input order, tokens per row), as `BaseSlot.run` does for one chunk.
    """
    chunks = length_chunks([_length(row) for row in inputs], batch_size)
    order = [index for chunk in chunks for index in chunk]
    outputs: list[np.ndarray] = []
    tokens: list[int] = []
    for chunk in chunks:
        out, toks = slot.run([inputs[i] for i in chunk], [adapter_names[i] for i in chunk])
        outputs.append(out)
        tokens.extend(toks)
    merged = np.concatenate(outputs, axis=0)
    result = np.empty_like(merged)
    result[order] = merged
    token_counts = [0] * len(inputs)
    for position, index in enumerate(order):
        token_counts[index] = tokens[position]
    return result, token_counts


@dataclass(eq=False)
class _Job:
    inputs: list
    adapter_names: list[str]
    tenant: str
    future: Future


@dataclass
class BatcherStats:
    """Counters of one batcher, for /metrics and tests."""

    isolated_failures: int = 0  # shared passes that failed and were rerun request by request
    rejected_overloaded: int = 0
    rejected_tenant: int = 0


class Batcher:
    """A worker thread that runs the jobs submitted for one slot in shared forward passes.

    `batch_size`, `wait_s` and the queue bounds come from `ServiceConfig` (`batch_size`,
    `batch_wait_ms`, `max_queued_rows`, `max_queued_rows_per_tenant`), the one place their
    defaults are defined, so they are required here.
    """

    def __init__(self, slot: BaseSlot, *, batch_size: int, wait_s: float, max_queued_rows: int,
                 max_queued_rows_per_tenant: int) -> None:
        self.slot = slot
        self.batch_size = batch_size
        self.wait_s = wait_s
        self.max_queued_rows = max_queued_rows
        self.max_queued_rows_per_tenant = max_queued_rows_per_tenant
        self.stats = BatcherStats()
        self._queues: OrderedDict[str, deque[_Job]] = OrderedDict()  # tenant -> jobs; order = whose turn
        self._tenant_rows: dict[str, int] = {}
        self._rows = 0
        self._seconds_per_row = 0.0  # moving average over passes, for Retry-After
        self._closing = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._work, name=f"batcher-{slot.task}", daemon=True)
        self._thread.start()

    def submit(self, inputs: list, adapter_names: list[str], tenant: str = "") -> Future:
        """Queue rows for the next forward pass; the future yields (outputs, tokens per row).

        Raises:
            TenantOverLimit: `tenant` already has `max_queued_rows_per_tenant` rows waiting.
            Overloaded: `max_queued_rows` rows wait in all, or the batcher is closing.
        """
        job = _Job(list(inputs), list(adapter_names), tenant, Future())
        rows = len(job.inputs)
        with self._cond:
            if self._closing:
                raise Overloaded("the server is shutting down; retry on another replica", retry_after_s=1)
            waiting = self._tenant_rows.get(tenant, 0)
            if waiting and waiting + rows > self.max_queued_rows_per_tenant:
                self.stats.rejected_tenant += 1
                raise TenantOverLimit(
                    f"this API key's tenant already has {waiting} rows waiting for the {self.slot.task} model; "
                    f"the limit is {self.max_queued_rows_per_tenant} (max_queued_rows_per_tenant): wait for "
                    "answers before sending more", retry_after_s=self._drain_s(waiting))
            if self._rows and self._rows + rows > self.max_queued_rows:
                self.stats.rejected_overloaded += 1
                raise Overloaded(f"the server is busy: {self._rows} rows wait for the {self.slot.task} model "
                                 f"(max_queued_rows={self.max_queued_rows}); retry later",
                                 retry_after_s=self._drain_s(self._rows))
            self._queues.setdefault(tenant, deque()).append(job)
            self._tenant_rows[tenant] = waiting + rows
            self._rows += rows
            self._cond.notify_all()
        job.future.add_done_callback(lambda future: future.cancelled() and self._forget(job))
        return job.future

    def queued(self) -> tuple[int, int]:
        """(requests, rows) waiting for a forward pass now."""
        with self._cond:
            return sum(len(jobs) for jobs in self._queues.values()), self._rows

    def close(self) -> None:
        """Stop the worker after the jobs already queued; later submits get Overloaded."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ---- worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            jobs = self._collect()
            if jobs is None:
                return
            self._run(jobs)

    def _collect(self) -> list[_Job] | None:
        """Block for work, let more arrive within `wait_s`, then take jobs in tenant turns (None: closed)."""
        with self._cond:
            while not self._queues and not self._closing:
                self._cond.wait()
            if not self._queues:
                return None
            deadline = time.monotonic() + self.wait_s
            while self._rows < self.batch_size and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            jobs: list[_Job] = []
            rows = 0
            while self._queues and rows < self.batch_size:
                tenant, queue = next(iter(self._queues.items()))
                job = self._pop(tenant, queue)
                jobs.append(job)
                rows += len(job.inputs)
            return jobs

    def _pop(self, tenant: str, queue: deque[_Job]) -> _Job:
        """The next job of `tenant`, whose turn it is; the tenant goes to the back of the line."""
        job = queue.popleft()
        if queue:
            self._queues.move_to_end(tenant)
        else:
            del self._queues[tenant]
        self._uncount(job)
        return job

    def _forget(self, job: _Job) -> None:
        """Drop a cancelled job that still waits (a timed-out request), freeing its place."""
        with self._cond:
            queue = self._queues.get(job.tenant)
            if queue is not None and job in queue:
                queue.remove(job)
                if not queue:
                    del self._queues[job.tenant]
                self._uncount(job)

    def _uncount(self, job: _Job) -> None:
        self._rows -= len(job.inputs)
        left = self._tenant_rows[job.tenant] - len(job.inputs)
        if left:
            self._tenant_rows[job.tenant] = left
        else:
            del self._tenant_rows[job.tenant]

    def _drain_s(self, rows: int) -> float:
        """Seconds until about `rows` queued rows are done, for Retry-After (1 to 60)."""
        return min(RETRY_AFTER_MAX_S, max(1.0, math.ceil(rows * self._seconds_per_row)))

    def _run(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        started = time.perf_counter()
        try:
            self._run_together(jobs)
        except Exception as exc:  # noqa: BLE001 - handed to the requests; the worker must live on
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
            else:
                self._run_alone(jobs, exc)
        rows = sum(len(job.inputs) for job in jobs)
        per_row = (time.perf_counter() - started) / max(rows, 1)
        self._seconds_per_row = per_row if not self._seconds_per_row else 0.8 * self._seconds_per_row + 0.2 * per_row

    def _run_together(self, jobs: list[_Job]) -> None:
        inputs = [row for job in jobs for row in job.inputs]
        names = [name for job in jobs for name in job.adapter_names]
        outputs, tokens = run_rows(self.slot, inputs, names, self.batch_size)
        start = 0
        for job in jobs:
            end = start + len(job.inputs)
            job.future.set_result((outputs[start:end], tokens[start:end]))
            start = end

    def _run_alone(self, jobs: list[_Job], shared_error: Exception) -> None:
        """After a shared pass failed: each job alone, so only the one that fails by itself fails."""
        self.stats.isolated_failures += 1
        log.warning("a forward pass shared by %d requests failed (%s: %s); running them one by one",
                    len(jobs), type(shared_error).__name__, shared_error)
        for job in jobs:
            try:
                outputs, tokens = run_rows(self.slot, job.inputs, job.adapter_names, self.batch_size)
            except Exception as exc:  # noqa: BLE001
                job.future.set_exception(exc)
            else:
                job.future.set_result((outputs, tokens))
