"""TREC run files: `query_id Q0 doc_id rank score tag`, one line per retrieved document."""

from __future__ import annotations

from pathlib import Path

from retrieval_lora.data.beir import RetrievalDataset
from retrieval_lora.errors import EvaluationError
from retrieval_lora.evaluation.runs import Run, check_run_ids, ranked
from retrieval_lora.manifest import write_text_atomic


def read_trec_run(path: str | Path, dataset: RetrievalDataset | None = None) -> Run:
    """Read a TREC run file: one `query_id Q0 doc_id rank score tag` line per retrieved document.

    With `dataset`, every query and document id must exist in it.

    Raises:
        EvaluationError: missing file, a malformed line (file:line named), or unknown ids.
    """
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"run file {path} does not exist; give a TREC run (query Q0 doc rank score tag)")
    run: Run = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 6:
                raise ValueError(f"{len(parts)} fields")
            run.setdefault(parts[0], {})[parts[2]] = float(parts[4])
        except ValueError as exc:
            raise EvaluationError(f"{path}:{number}: not a TREC run line ({exc}): expected 6 fields "
                                  f"'query_id Q0 doc_id rank score tag', got {line.strip()[:80]!r}") from exc
    if not run:
        raise EvaluationError(f"run file {path} is empty")
    if dataset is not None:
        check_run_ids(run, dataset, f"run file {path}")
    return run


def write_trec_run(run: Run, path: str | Path, tag: str = "retrieval-lora") -> Path:
    """Write `run` as a TREC run file (best first per query), atomically.

    Scores are written in full (shortest round-trip form): rounded ones could tie or swap two
    documents, and the file would no longer reproduce the metrics computed from `run`.
    """
    lines = [f"{query_id} Q0 {doc_id} {rank} {float(score)!r} {tag}"
             for query_id in sorted(run) for rank, (doc_id, score) in enumerate(ranked(run[query_id]), start=1)]
    write_text_atomic(Path(path), "\n".join(lines) + "\n")
    return Path(path)
