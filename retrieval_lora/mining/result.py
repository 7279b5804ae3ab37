"""The product of mining, and its folder on disk.

Layout of a saved result (written to a temporary folder, then renamed into place):

    <path>/rows/        datasets folder: query, positive, negative_1..N (text only, training-ready;
                        `retrieval_lora.data.load_pairs` and `--train-pairs <path>/rows` read it)
    <path>/scores/      datasets folder, aligned row by row with rows/: query_id, positive_id,
                        negative_ids, positive_score, negative_scores
    <path>/stats.json   score distributions, candidates removed per filter, skipped queries and
                        rows with reasons, index (and its recall when approximate), timings
    <path>/manifest.json  resolved config, fingerprints, model identity, library versions, commit

Why rows and scores are separate: sentence-transformers' ranking losses read the first column
as the query, the second as the positive and EVERY further column as a negative, so an id or
score column next to the texts would silently become a "negative". `rows` can therefore be
handed to training as is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, concatenate_datasets, load_from_disk

from retrieval_lora.errors import MiningError
from retrieval_lora.manifest import replace_dir_atomic, staging_dir, write_json_atomic


@dataclass
class MiningResult:
    """Mined training rows, their ids and scores, and what happened on the way.

    Attributes:
        rows: query, positive, negative_1..N: text columns only, ready for training.
        scores: query_id, positive_id, negative_ids, positive_score, negative_scores, row-aligned.
        stats: JSON-ready statistics (see `mine_hard_negatives`).
        manifest: config, fingerprints and versions that produced the result.
    """

    rows: Dataset
    scores: Dataset
    stats: dict[str, Any]
    manifest: dict[str, Any] = field(default_factory=dict)

    def training_rows(self) -> Dataset:
        """The rows to train on: (query, positive, negative_1..N), no other column."""
        return self.rows

    def table(self) -> Dataset:
        """Rows and scores side by side, for inspection (never for training)."""
        return concatenate_datasets([self.rows, self.scores], axis=1)


def save_mining_result(result: MiningResult, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `result` to the folder `path` atomically (layout in the module docstring); `extra`: more JSON
    files (name -> content) published in the same rename, so the folder never appears without them."""
    target = Path(path)
    staging = staging_dir(target)
    result.rows.save_to_disk(str(staging / "rows"))
    result.scores.save_to_disk(str(staging / "scores"))
    write_json_atomic(staging / "stats.json", result.stats)
    write_json_atomic(staging / "manifest.json", result.manifest)
    for name, content in (extra or {}).items():
        write_json_atomic(staging / name, content)
    replace_dir_atomic(staging, target)
    return target


def load_mining_result(path: str | Path) -> MiningResult:
    """Read a folder written by `save_mining_result`.

    Raises:
        MiningError: the folder is missing or incomplete.
    """
    path = Path(path)
    needed = [path / "rows", path / "scores", path / "stats.json", path / "manifest.json"]
    missing = [p.name for p in needed if not p.exists()]
    if missing:
        raise MiningError(f"{path} is not a complete mining result (missing {', '.join(missing)}); "
                          "run `python -m retrieval_lora.mine --output` to write one")
    return MiningResult(load_from_disk(str(path / "rows")), load_from_disk(str(path / "scores")),
                        json.loads((path / "stats.json").read_text()), json.loads((path / "manifest.json").read_text()))
