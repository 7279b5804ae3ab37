"""Cache keys and result storage for the flow's tasks.

A step's key is a digest of what determines its output: data and rows fingerprints and the
resolved stage config, never file paths or model objects (Prefect hashes task inputs, and an
unhashable model would silently switch caching off). The flow computes each key once and
passes it to the task as `key`; the same key names the step's output folder, so a cached
result and the files it points to always belong together.

Results are persisted under `<workdir>/prefect-results/<stage>-<key>` (JSON, readable without
Prefect, except the evaluation's pickled comparison). Prefect finds them there on the next run
whatever API server is used (the temporary one or `prefect server`), which is what makes a
rerun after a crash skip the finished steps. Delete a work folder as a whole: results and the
files they point to live side by side (`CachedSteps` recomputes a step whose files vanished).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger

# Bump when a task's output layout changes, so old cached results are not read back.
CACHE_VERSION = 3  # 3: the rows step also writes a reranker's dev_first_stage.json
KEY_CHARS = 16


def plain(value: Any) -> Any:
    """`value` with dataclasses turned into dicts, ready for a stable JSON dump."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def step_key(stage: str, *parts: Any) -> str:
    """A short stable digest of `stage` and `parts` (fingerprints, config dicts, settings)."""
    text = json.dumps([CACHE_VERSION, stage, *map(plain, parts)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_CHARS]


def key_parameter(stage: str) -> Callable[[Any, dict[str, Any]], str]:
    """A Prefect `cache_key_fn` that reads the task's `key` parameter (computed by `step_key`)."""

    def cache_key(_context: Any, parameters: dict[str, Any]) -> str:
        return f"{stage}-{parameters['key']}"

    return cache_key


def result_storage(workdir: str | Path) -> Path:
    """The folder holding the persisted task results of runs that use `workdir`."""
    return Path(workdir).resolve() / "prefect-results"


class CachedSteps:
    """Runs cached steps with results persisted under the work folder, recording their states."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.states: dict[str, str] = {}

    def run(self, label: str, step: Any, check: str | None = None, **parameters: Any) -> Any:
        """Run `step` and return its result; its final state (Completed, Cached) goes to `states`.

        `check` names a path in the result: a cached result whose files were deleted since is
        recomputed, rather than handing later steps a path that no longer exists.
        """
        step = step.with_options(result_storage=result_storage(self.work))
        state = step(**parameters, return_state=True)
        result = state.result()
        if state.name == "Cached" and check and not Path(result[check]).exists():
            get_run_logger().warning(f"{label}: the cached result's {result[check]} is gone; recomputing")
            state = step.with_options(refresh_cache=True)(**parameters, return_state=True)
            result = state.result()
        self.states[label] = state.name
        return result

    def folder(self, label: str, key: str) -> str:
        return str(self.work / label / key)
