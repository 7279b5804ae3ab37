"""Loading and validating a BEIR-format dataset folder.

Layout: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`) and
`qrels/<split>.tsv` with the header `query-id<TAB>corpus-id<TAB>score` (score > 0 = relevant).
LF and CRLF line endings both work, as does a UTF-8 byte-order mark.

What is wrong is reported with its file and line. Malformed lines are problems, all reported
at once (up to a cap) in one `DataError`; nothing half-loaded is ever returned. What a
published dataset really contains and a careful user can live with loads, with one
`DataWarning` per file: qrels rows naming an unknown query or document are dropped and
counted (`RetrievalDataset.dropped_judgements`; `strict=True` makes them errors again), and
documents with an empty title and text are kept (see `load_corpus`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from retrieval_lora.data.lines import Problems, read_jsonl, warn_places
from retrieval_lora.data.qrels import DroppedJudgements, Qrels, load_qrels
from retrieval_lora.errors import DataError

__all__ = ["Document", "DroppedJudgements", "Qrels", "RetrievalDataset", "load_beir", "load_corpus",
           "load_queries"]


@dataclass(frozen=True)
class Document:
    """One corpus entry. `full_text` is what models see: title and text joined by a space."""

    title: str
    text: str

    @property
    def full_text(self) -> str:
        return f"{self.title} {self.text}".strip()


@dataclass(frozen=True)
class RetrievalDataset:
    """A corpus, its queries and relevance labels per split, validated against each other."""

    root: Path
    corpus: dict[str, Document]
    queries: dict[str, str]
    qrels: dict[str, Qrels] = field(default_factory=dict)
    dropped_judgements: dict[str, DroppedJudgements] = field(default_factory=dict)
    """split -> qrels rows `load_beir` dropped for naming an unknown id (one entry per split it loaded)."""

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def splits(self) -> list[str]:
        return sorted(self.qrels)

    def split_qrels(self, split: str) -> Qrels:
        """The qrels of `split`. Raises DataError naming the available splits if it is missing."""
        if split not in self.qrels:
            raise DataError(
                f"{self.root}: split {split!r} not found (no qrels/{split}.tsv); "
                f"available splits: {', '.join(self.splits) or 'none'}"
            )
        return self.qrels[split]

    def split_queries(self, split: str) -> dict[str, str]:
        """Texts of the queries that have at least one relevant document in `split`."""
        qrels = self.split_qrels(split)
        return {qid: self.queries[qid] for qid in sorted(qrels) if any(g > 0 for g in qrels[qid].values())}

    def split_dropped(self, split: str) -> DroppedJudgements:
        """What was dropped from `split` at load time; all zeros if nothing was (or the dataset was built in code).

        Raises DataError naming the available splits if `split` is missing.
        """
        self.split_qrels(split)
        return self.dropped_judgements.get(split, DroppedJudgements())


def _string_field(obj: dict, name: str, where: str, problems: Problems, required: bool = True) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            problems.add(where, f"missing field {name!r}")
        return None if required else ""
    if not isinstance(value, (str, int)):
        problems.add(where, f"field {name!r} must be a string, got {type(value).__name__}")
        return None
    return str(value)


def _document(obj: dict, where: str, problems: Problems) -> tuple[str, Document] | None:
    """(id, document) from one corpus line; None (with the reason in `problems`) if malformed."""
    doc_id = _string_field(obj, "_id", where, problems)
    text = _string_field(obj, "text", where, problems)
    title = _string_field(obj, "title", where, problems, required=False)
    if doc_id is None or text is None or title is None:
        return None
    return doc_id, Document(title=title, text=text)


def load_corpus(path: Path) -> dict[str, Document]:
    """Load `corpus.jsonl`: id -> Document. Each line needs `_id` and `text` (may be ""); `title` is optional.

    A document whose title and text are both empty (or blank) is KEPT and models see it as
    "": published corpora contain such entries, qrels may judge them, and dropping them would
    silently change what the retriever searches. They are reported in one DataWarning.

    Raises:
        DataError: missing file, bad JSON, a missing or non-string field, a duplicate id, or no
            document at all; every problem as `file:line: ...`.
    """
    problems = Problems()
    corpus: dict[str, Document] = {}
    first_line: dict[str, int] = {}
    empty: list[str] = []
    for lineno, obj in read_jsonl(path, problems):
        where = f"{path}:{lineno}"
        parsed = _document(obj, where, problems)
        if parsed is None:
            continue
        doc_id, document = parsed
        if doc_id in corpus:
            problems.add(where, f"duplicate document id {doc_id!r} (first on line {first_line[doc_id]})")
            continue
        if not document.full_text:
            empty.append(f"{where} {doc_id!r}")
        corpus[doc_id] = document
        first_line[doc_id] = lineno
    if not corpus and not problems.items:
        problems.add(str(path), "the corpus is empty; add at least one document")
    problems.raise_if_any(f"corpus {path}")
    warn_places(path, f"{len(empty)} document(s) have an empty title and text", empty,
                "they are kept and encoded as empty text; add their text or remove them (and their qrels)")
    return corpus


def load_queries(path: Path) -> dict[str, str]:
    """Load `queries.jsonl`: id -> text. Each line needs `_id` and a non-empty `text`.

    An empty (or blank) query is an error, not a warning, even outside strict mode: it would
    either be scored (every retriever answers "" arbitrarily, which skews the metrics) or have
    to be dropped with its judgements (which silently changes the evaluation set). Only the
    user can say which is right, so the loader names its file:line and stops.

    Raises:
        DataError: missing file, bad JSON, a missing or non-string field, a duplicate id, or an
            empty text; every problem as `file:line: ...`.
    """
    problems = Problems()
    queries: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, obj in read_jsonl(path, problems):
        where = f"{path}:{lineno}"
        query_id = _string_field(obj, "_id", where, problems)
        text = _string_field(obj, "text", where, problems)
        if query_id is None or text is None:
            continue
        if query_id in queries:
            problems.add(where, f"duplicate query id {query_id!r} (first on line {first_line[query_id]})")
            continue
        if not text.strip():
            problems.add(where, f"query {query_id!r} has an empty text; remove it or write the query")
            continue
        queries[query_id] = text
        first_line[query_id] = lineno
    problems.raise_if_any(f"queries {path}")
    return queries


def load_beir(root: str | Path, strict: bool = False) -> RetrievalDataset:
    """Load and validate a BEIR folder: corpus, queries and every `qrels/*.tsv` split.

    Args:
        root: the folder holding corpus.jsonl, queries.jsonl and qrels/<split>.tsv.
        strict: make qrels rows that name a query or document that is not loaded errors;
            by default they are dropped, counted in `dropped_judgements` and reported in one
            DataWarning per qrels file (published BEIR data has such rows, e.g. ArguAna).

    Returns:
        The dataset; `dropped_judgements` has one entry per split (all zeros when nothing was dropped).

    Raises:
        DataError: the folder or a file is missing, or any line is malformed or inconsistent;
            the message lists each problem as `file:line: what is wrong`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder {root} does not exist; pass a BEIR folder with corpus.jsonl, "
                        "queries.jsonl and qrels/<split>.tsv (or omit --data to use the demo dataset)")
    corpus = load_corpus(root / "corpus.jsonl")
    queries = load_queries(root / "queries.jsonl")
    qrels_dir = root / "qrels"
    split_files = sorted(qrels_dir.glob("*.tsv")) if qrels_dir.is_dir() else []
    if not split_files:
        raise DataError(f"{qrels_dir} has no <split>.tsv files; add at least qrels/train.tsv and qrels/test.tsv")
    loaded = {path.stem: load_qrels(path, queries, corpus, strict=strict) for path in split_files}
    return RetrievalDataset(root=root, corpus=corpus, queries=queries,
                            qrels={split: qrels for split, (qrels, _) in loaded.items()},
                            dropped_judgements={split: dropped for split, (_, dropped) in loaded.items()})
