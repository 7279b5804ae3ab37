"""Training examples: (query, positive[, negative_1..N]) rows as a `datasets.Dataset`.

Three sources give the same columns:
- a BEIR split (`pairs_from_qrels`): one row per (query, relevant document);
- a JSONL file: one object per line with `query` and `positive` (aliases `anchor`, `pos`)
  and optionally `negative` or `negative_1`, `negative_2`, ... (or a list under `negatives`);
- a dataset saved with `Dataset.save_to_disk`, with the same columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from retrieval_lora.data.beir import RetrievalDataset
from retrieval_lora.data.lines import Problems, read_jsonl
from retrieval_lora.errors import DataError

if TYPE_CHECKING:  # `datasets` (pyarrow, pandas) loads on first use, not when a command checks its data
    from datasets import Dataset

QUERY_ALIASES = ("query", "anchor", "question")
POSITIVE_ALIASES = ("positive", "pos", "document")


def pairs_from_qrels(dataset: RetrievalDataset, split: str) -> Dataset:
    """One (query, positive) row per relevant (grade > 0) pair of `split`, in a stable order."""
    qrels = dataset.split_qrels(split)
    queries, positives = [], []
    for query_id in sorted(qrels):
        for doc_id, grade in sorted(qrels[query_id].items()):
            if grade > 0:
                queries.append(dataset.queries[query_id])
                positives.append(dataset.corpus[doc_id].full_text)
    if not queries:
        raise DataError(f"{dataset.root}: split {split!r} has no relevant (score > 0) pairs to train on")
    from datasets import Dataset

    return Dataset.from_dict({"query": queries, "positive": positives})


def _first_present(obj: dict, names: tuple[str, ...]) -> str | None:
    return next((name for name in names if name in obj), None)


def _row_from_json(obj: dict, where: str, problems: Problems) -> dict[str, str] | None:
    query_key, positive_key = _first_present(obj, QUERY_ALIASES), _first_present(obj, POSITIVE_ALIASES)
    if query_key is None or positive_key is None:
        missing = "query" if query_key is None else "positive"
        problems.add(where, f"missing field {missing!r} (accepted names: "
                            f"{QUERY_ALIASES if missing == 'query' else POSITIVE_ALIASES})")
        return None
    row = {"query": obj[query_key], "positive": obj[positive_key]}
    negatives = obj.get("negatives")
    if isinstance(negatives, list):
        row.update({f"negative_{i}": text for i, text in enumerate(negatives, start=1)})
    elif "negative" in obj:
        row["negative_1"] = obj["negative"]
    row.update({key: value for key, value in obj.items() if key.startswith("negative_")})
    for key, value in row.items():
        if not isinstance(value, str) or not value.strip():
            problems.add(where, f"field {key!r} must be a non-empty string")
            return None
    return row


def load_pairs_jsonl(path: str | Path) -> Dataset:
    """Load training rows from JSONL. All rows must have the same number of negatives.

    Raises:
        DataError: missing file, bad JSON, missing/empty fields, or ragged negatives, with file:line.
    """
    path = Path(path)
    problems = Problems()
    rows: list[dict[str, str]] = []
    columns: tuple[str, ...] | None = None
    for lineno, obj in read_jsonl(path, problems):
        where = f"{path}:{lineno}"
        row = _row_from_json(obj, where, problems)
        if row is None:
            continue
        if columns is None:
            columns = tuple(sorted(row))
        elif tuple(sorted(row)) != columns:
            problems.add(where, f"has columns {sorted(row)} but earlier lines have {list(columns)}; "
                                "give every line the same number of negatives")
            continue
        rows.append(row)
    if not rows and not problems.items:
        problems.add(str(path), "no training rows; add lines like {\"query\": ..., \"positive\": ...}")
    problems.raise_if_any(f"training pairs {path}")
    from datasets import Dataset

    return Dataset.from_list(rows)


def load_pairs_from_disk(path: str | Path) -> Dataset:
    """Load a dataset saved with `save_to_disk` that has `query` and `positive` columns."""
    path = Path(path)
    try:
        from datasets import Dataset, load_from_disk

        dataset = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{path}: cannot be read as a saved `datasets` dataset ({exc})") from exc
    if not isinstance(dataset, Dataset):
        raise DataError(f"{path}: holds a DatasetDict; save a single split (e.g. dataset['train'])")
    missing = {"query", "positive"} - set(dataset.column_names)
    if missing:
        raise DataError(f"{path}: missing column(s) {sorted(missing)}; found {dataset.column_names}")
    for index, row in enumerate(dataset):
        for key, value in row.items():
            if key in ("query", "positive") or key.startswith("negative_"):
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{path}: row {index}, column {key!r} is empty; every text must be non-empty")
    return dataset


def load_pairs(path: str | Path) -> Dataset:
    """Load training rows from a `.jsonl` file or a saved dataset folder (see module docstring)."""
    path = Path(path)
    if path.is_dir():
        return load_pairs_from_disk(path)
    if not path.exists():
        raise DataError(f"training pairs {path} not found; give a .jsonl file or a saved dataset folder")
    return load_pairs_jsonl(path)
