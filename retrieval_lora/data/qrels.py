"""Relevance judgements (qrels): one `qrels/<split>.tsv` of a BEIR folder.

Format: an optional header `query-id<TAB>corpus-id<TAB>score`, then one judgement per line;
the score is an integer grade (0 = judged not relevant, 1, 2, ... = relevant; negative
grades, used by some TREC collections for spam, also count as not relevant).

Published BEIR qrels are not always consistent with their own corpus (ArguAna's test qrels
name 5 documents that corpus.jsonl lacks). By default such rows are dropped with one
`DataWarning` per file and counted in a `DroppedJudgements`; with `strict=True` each one is a
file:line problem in the `DataError`, as a malformed line always is.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from retrieval_lora.data.lines import Problems, numbered_lines, warn_places

Qrels = dict[str, dict[str, int]]
"""query id -> {document id -> relevance grade}: the shape ranx and pytrec_eval use."""

HEADER_FIRST_CELLS = ("query-id", "query_id", "qid")


@dataclass(frozen=True)
class DroppedJudgements:
    """Judgements of one split that were dropped at load time because an id they name is not loaded.

    A row whose query is not in queries.jsonl is counted under `missing_query` only (whatever
    its document): that query is never evaluated, so the row changes no metric. A row whose
    query is known but whose document is not in corpus.jsonl is a judgement no retriever can
    satisfy; `missing_document_relevant` (score > 0) is the number an evaluation report should
    state as "relevant judgements unreachable (documents missing from the corpus)", since
    published BEIR scores count them in recall and ideal-DCG while ours cannot.
    """

    missing_document: int = 0
    missing_document_relevant: int = 0
    missing_query: int = 0
    missing_query_relevant: int = 0

    @property
    def rows(self) -> int:
        """All dropped rows, relevant or not."""
        return self.missing_document + self.missing_query

    @property
    def relevant(self) -> int:
        """Dropped rows with score > 0."""
        return self.missing_document_relevant + self.missing_query_relevant


@dataclass(frozen=True)
class _Unknown:
    """A well-formed qrels row naming an id that is not loaded."""

    where: str
    kind: str  # "query" or "document"
    problem: str
    grade: int


def parse_grade(score: str) -> int | None:
    """The integer grade written in `score` ("1", "2", also "1.0"); None if it is not a whole number."""
    try:
        value = float(score)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None  # nan and inf are not integers either


def _grade_problem(score: str, lineno: int) -> str:
    """Why `score` is not a grade, with a hint when line 1 is probably a misspelled header."""
    try:
        float(score)
    except ValueError:
        if lineno == 1:
            return (f"score {score!r} is not a number; if line 1 is a header, write it as "
                    "'query-id<TAB>corpus-id<TAB>score'")
        return f"score {score!r} is not a number"
    return f"score {score!r} is not a whole number; relevance grades are integers (0 = not relevant)"


def _columns_problem(line: str, count: int) -> str:
    hint = "; separate the columns with tabs, not spaces" if count == 1 and len(line.split()) == 3 else ""
    return f"expected 3 tab-separated columns (query-id, corpus-id, score), got {count}{hint}"


def read_qrels_rows(path: Path, problems: Problems) -> Iterator[tuple[int, str, str, int]]:
    """(line number, query id, document id, grade) per well-formed line; malformed lines go to `problems`.

    A first line starting with `query-id` (or `query_id`, `qid`) is the header and skipped; a
    file without a header is read from line 1.
    """
    for lineno, line in numbered_lines(path):
        parts = line.split("\t")
        if lineno == 1 and parts[0] in HEADER_FIRST_CELLS:
            continue
        if len(parts) != 3:
            problems.add(f"{path}:{lineno}", _columns_problem(line, len(parts)))
            continue
        query_id, doc_id, score = parts
        grade = parse_grade(score)
        if grade is None:
            problems.add(f"{path}:{lineno}", _grade_problem(score, lineno))
            continue
        yield lineno, query_id, doc_id, grade


def _unknown(where: str, query_id: str, doc_id: str, grade: int,
             queries: Collection[str], corpus: Collection[str]) -> _Unknown | None:
    """The row's unknown id, query first (a row for an unknown query is never evaluated); None if both are known."""
    if query_id not in queries:
        return _Unknown(where, "query", f"query id {query_id!r} is not in queries.jsonl", grade)
    if doc_id not in corpus:
        return _Unknown(where, "document", f"corpus id {doc_id!r} is not in corpus.jsonl", grade)
    return None


def _count(unknown: list[_Unknown]) -> DroppedJudgements:
    def count(kind: str, relevant_only: bool = False) -> int:
        return sum(row.kind == kind and (row.grade > 0 or not relevant_only) for row in unknown)
    return DroppedJudgements(missing_document=count("document"), missing_document_relevant=count("document", True),
                             missing_query=count("query"), missing_query_relevant=count("query", True))


def _warn_dropped(path: Path, unknown: list[_Unknown], kept: int) -> None:
    """One DataWarning for the whole file: how many rows were dropped, why, and where the first ones are."""
    dropped = _count(unknown)
    reasons = [f"{n} naming {what}" for n, what in ((dropped.missing_document, "documents not in corpus.jsonl"),
                                                     (dropped.missing_query, "queries not in queries.jsonl")) if n]
    finding = (f"dropped {dropped.rows} of {dropped.rows + kept} judgement(s) ({dropped.relevant} relevant): "
               + ", ".join(reasons))
    # stacklevel 5: warn_places <- here <- load_qrels <- load_beir <- whoever loaded the dataset
    warn_places(path, finding, [f"{row.where}: {row.problem}" for row in unknown],
                "pass strict=True to make this an error", stacklevel=5)


def _nothing_left(dropped: int) -> str:
    if dropped:
        return (f"all {dropped} judgement(s) name a query or document that is not loaded; "
                "are these the qrels of this corpus and these queries?")
    return "no relevance labels; add lines 'query-id<TAB>corpus-id<TAB>score'"


def load_qrels(path: Path, queries: Collection[str], corpus: Collection[str],
               strict: bool = False) -> tuple[Qrels, DroppedJudgements]:
    """Load one `qrels/<split>.tsv`, checking every id against the loaded query and document ids.

    Returns:
        (qrels, what was dropped): rows naming an unknown query or document are left out of
        `qrels`, counted, and reported in one DataWarning for the file (unless `strict`).

    Raises:
        DataError: a line is malformed (column count, non-integer score), no judgement is left,
            or, with `strict=True`, any row names an unknown id; each problem as `file:line: ...`.
    """
    problems = Problems()
    qrels: Qrels = {}
    unknown: list[_Unknown] = []
    for lineno, query_id, doc_id, grade in read_qrels_rows(path, problems):
        row = _unknown(f"{path}:{lineno}", query_id, doc_id, grade, queries, corpus)
        if row is None:
            qrels.setdefault(query_id, {})[doc_id] = grade
        elif strict:
            problems.add(row.where, row.problem)
        else:
            unknown.append(row)
    if not qrels and not problems.items:
        problems.add(str(path), _nothing_left(len(unknown)))
    problems.raise_if_any(f"qrels {path}")
    _warn_dropped(path, unknown, kept=sum(len(docs) for docs in qrels.values()))
    return qrels, _count(unknown)
