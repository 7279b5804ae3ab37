"""Micro-batching: requests that arrive together for one base share its forward passes.

Each `BaseSlot` gets one `Batcher` with one worker thread. A request submits its rows (with
the PEFT adapter name of each row) and gets a `concurrent.futures.Future`. The worker takes
every job waiting in the queue, waits up to `wait_s` for more while the batch is short of
`batch_size` rows, then runs them all through `run_rows`: rows are sorted by length (less
padding, as sentence-transformers does), cut into chunks of `batch_size`, and each chunk is one
mixed-adapter forward pass. Results go back to each job in its own order.

`run_rows` is also what the in-process Python API calls directly, so both paths compute the
same thing the same way.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from retrieval_lora.serving.pool import BaseSlot


def _length(row: object) -> int:
    return sum(len(part) for part in row) if isinstance(row, tuple) else len(str(row))


def run_rows(slot: BaseSlot, inputs: list, adapter_names: list[str], batch_size: int) -> tuple[np.ndarray, list[int]]:
    """Run `inputs` (row i through adapter `adapter_names[i]`) in length-sorted chunks.

    Returns (outputs in input order, tokens per row), as `BaseSlot.run` does for one chunk.
    """
    order = sorted(range(len(inputs)), key=lambda i: -_length(inputs[i]))
    outputs: list[np.ndarray] = []
    tokens: list[int] = []
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
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


@dataclass
class _Job:
    inputs: list
    adapter_names: list[str]
    future: Future


class Batcher:
    """A worker thread that runs the jobs submitted for one slot in shared forward passes.

    `batch_size` and `wait_s` come from `ServiceConfig` (`batch_size`, `batch_wait_ms`), the one
    place their defaults are defined, so they are required here.
    """

    def __init__(self, slot: BaseSlot, *, batch_size: int, wait_s: float) -> None:
        self.slot = slot
        self.batch_size = batch_size
        self.wait_s = wait_s
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"batcher-{slot.task}", daemon=True)
        self._thread.start()

    def submit(self, inputs: list, adapter_names: list[str]) -> Future:
        """Queue rows for the next forward pass; the future yields (outputs, tokens per row)."""
        future: Future = Future()
        self._queue.put(_Job(list(inputs), list(adapter_names), future))
        return future

    def close(self) -> None:
        """Stop the worker after the jobs already queued."""
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            jobs = self._collect()
            if jobs is None:
                return
            self._run(jobs)

    def _collect(self) -> list[_Job] | None:
        """Block for one job, then gather what else arrives within `wait_s` (None: closing)."""
        first = self._queue.get()
        if first is None:
            return None
        jobs, rows = [first], len(first.inputs)
        deadline = time.monotonic() + self.wait_s
        while rows < self.batch_size:
            try:
                job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:  # closing: finish this batch first, then stop
                self._queue.put(None)
                break
            jobs.append(job)
            rows += len(job.inputs)
        return jobs

    def _run(self, jobs: list[_Job]) -> None:
        jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        inputs = [row for job in jobs for row in job.inputs]
        names = [name for job in jobs for name in job.adapter_names]
        try:
            outputs, tokens = run_rows(self.slot, inputs, names, self.batch_size)
        except BaseException as exc:  # hand every failure to the requests; the worker must live on
            for job in jobs:
                job.future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            end = start + len(job.inputs)
            job.future.set_result((outputs[start:end], tokens[start:end]))
            start = end
