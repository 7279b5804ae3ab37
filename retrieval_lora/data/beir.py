"""Loading and validating a BEIR-format dataset folder.

Layout: `corpus.jsonl` (`_id`, `title`, `text`), `queries.jsonl` (`_id`, `text`) and
`qrels/<split>.tsv` with the header `query-id<TAB>corpus-id<TAB>score` (score > 0 = relevant).

Every problem found is reported with its file and line, all at once (up to a cap), in one
`DataError`; nothing half-loaded is ever returned.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from retrieval_lora.errors import DataError

MAX_REPORTED_PROBLEMS = 20

Qrels = dict[str, dict[str, int]]
"""query id -> {document id -> relevance grade}: the shape ranx and pytrec_eval use."""


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


class _Problems:
    """Collects file:line problems so that all of them are reported in one error."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self, what: str) -> None:
        if not self.items:
            return
        shown = self.items[:MAX_REPORTED_PROBLEMS]
        more = len(self.items) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        raise DataError(f"{what}: {len(self.items)} problem(s) found; fix them and load again:\n  "
                        + "\n  ".join(shown) + tail)


def read_jsonl(path: Path, problems: _Problems) -> list[tuple[int, dict]]:
    """Parse a JSONL file into (line number, object) pairs; bad lines go to `problems`."""
    if not path.is_file():
        raise DataError(f"{path} not found; a BEIR folder needs corpus.jsonl, queries.jsonl and qrels/<split>.tsv")
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.add(f"{path}:{lineno}", f"not valid JSON ({exc.msg} at column {exc.colno})")
                continue
            if not isinstance(obj, dict):
                problems.add(f"{path}:{lineno}", "each line must be a JSON object")
                continue
            rows.append((lineno, obj))
    return rows


def _string_field(obj: dict, name: str, where: str, problems: _Problems, required: bool = True) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            problems.add(where, f"missing field {name!r}")
        return None if required else ""
    if not isinstance(value, (str, int)):
        problems.add(where, f"field {name!r} must be a string, got {type(value).__name__}")
        return None
    return str(value)


def load_corpus(path: Path) -> dict[str, Document]:
    """Load `corpus.jsonl`. Each line needs `_id` and a non-empty `title` or `text`."""
    problems = _Problems()
    corpus: dict[str, Document] = {}
    first_line: dict[str, int] = {}
    for lineno, obj in read_jsonl(path, problems):
        where = f"{path}:{lineno}"
        doc_id = _string_field(obj, "_id", where, problems)
        text = _string_field(obj, "text", where, problems)
        title = _string_field(obj, "title", where, problems, required=False)
        if doc_id is None or text is None or title is None:
            continue
        if doc_id in corpus:
            problems.add(where, f"duplicate document id {doc_id!r} (first on line {first_line[doc_id]})")
            continue
        if not (title.strip() or text.strip()):
            problems.add(where, f"document {doc_id!r} has an empty title and text; remove it or add its text")
            continue
        corpus[doc_id] = Document(title=title, text=text)
        first_line[doc_id] = lineno
    if not corpus and not problems.items:
        problems.add(str(path), "the corpus is empty; add at least one document")
    problems.raise_if_any(f"corpus {path}")
    return corpus


def load_queries(path: Path) -> dict[str, str]:
    """Load `queries.jsonl`. Each line needs `_id` and a non-empty `text`."""
    problems = _Problems()
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


def load_qrels(path: Path, queries: dict[str, str], corpus: dict[str, Document]) -> Qrels:
    """Load one `qrels/<split>.tsv`, checking every id against the queries and the corpus."""
    problems = _Problems()
    qrels: Qrels = {}
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            parts = line.rstrip("\n").split("\t")
            where = f"{path}:{lineno}"
            if lineno == 1 and parts[0] in ("query-id", "query_id", "qid"):
                continue
            if not line.strip():
                continue
            if len(parts) != 3:
                problems.add(where, f"expected 3 tab-separated columns (query-id, corpus-id, score), got {len(parts)}")
                continue
            query_id, doc_id, score = parts
            try:
                grade = int(float(score))
            except ValueError:
                problems.add(where, f"score {score!r} is not a number")
                continue
            if query_id not in queries:
                problems.add(where, f"query id {query_id!r} is not in queries.jsonl")
                continue
            if doc_id not in corpus:
                problems.add(where, f"corpus id {doc_id!r} is not in corpus.jsonl")
                continue
            qrels.setdefault(query_id, {})[doc_id] = grade
    if not qrels and not problems.items:
        problems.add(str(path), "no relevance labels; add lines 'query-id<TAB>corpus-id<TAB>score'")
    problems.raise_if_any(f"qrels {path}")
    return qrels


def load_beir(root: str | Path) -> RetrievalDataset:
    """Load and validate a BEIR folder: corpus, queries and every `qrels/*.tsv` split.

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
    qrels = {path.stem: load_qrels(path, queries, corpus) for path in split_files}
    return RetrievalDataset(root=root, corpus=corpus, queries=queries, qrels=qrels)
