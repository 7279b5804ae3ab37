"""BM25 runs with bm25s (Snowball stemming via PyStemmer), the index built once per corpus and cached.

The lexical baseline every evaluation compares with: a keyword index costs no training, and on
some corpora (SciFact) it is as good as a dense embedder. Defaults follow Pyserini's "flat" BEIR
baseline (title and text as one field, k1 = 0.9, b = 0.4, Lucene's BM25 variant, English stop
words, Porter-style stemming): bm25s reproduces its published figures within half a point
(evals/results/baselines_*.md says by how much on each dataset).

    settings = BM25Settings()
    runs = bm25_runs(dataset, ["dev", "test"], settings, k=100, cache_dir="data/cache/embeddings")

Only documents that share a term with the query are returned (as in Lucene), so a query with no
known term has an empty ranking (it scores 0). The cache entry (`bm25-<digest>/`) is keyed by the
corpus fingerprint, every setting and the bm25s version; it is built aside and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from retrieval_lora.data.beir import RetrievalDataset
from retrieval_lora.data.fingerprint import corpus_fingerprint
from retrieval_lora.errors import ConfigError
from retrieval_lora.evaluation.runs import Run

BM25_METHODS = ("lucene", "robertson", "atire", "bm25l", "bm25+")
CACHE_FORMAT = 1


@dataclass(frozen=True)
class BM25Settings:
    """How the BM25 index is built and queried (defaults: Pyserini's flat BEIR baseline)."""

    k1: float = 0.9
    b: float = 0.4
    method: str = "lucene"
    stemmer: str = "english"  # a PyStemmer (Snowball) algorithm name; "" for no stemming
    stopwords: str = "en"  # bm25s' stop-word list name; "" for none

    def __post_init__(self) -> None:
        problems = []
        if self.k1 < 0 or not 0 <= self.b <= 1:
            problems.append(f"k1={self.k1}, b={self.b}: need k1 >= 0 and 0 <= b <= 1 (Pyserini: 0.9, 0.4)")
        if self.method not in BM25_METHODS:
            problems.append(f"method={self.method!r}: must be one of {', '.join(BM25_METHODS)}")
        if problems:
            raise ConfigError("invalid BM25 settings: " + "; ".join(problems))

    def describe(self) -> str:
        return (f"bm25s {self.method}, k1={self.k1}, b={self.b}, stemmer {self.stemmer or 'none'}, "
                f"stop words {self.stopwords or 'none'}")


class BM25Index:
    """A bm25s index over a corpus, with the document ids in index order and the query tokenizer."""

    def __init__(self, retriever, doc_ids: list[str], settings: BM25Settings) -> None:
        self.retriever, self.doc_ids, self.settings = retriever, doc_ids, settings
        self._stem = _stemmer(settings.stemmer)

    def tokenize(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        return bm25s.tokenize(texts, stopwords=self.settings.stopwords or None, stemmer=self._stem,
                              return_ids=False, show_progress=False)

    def search(self, query_ids: list[str], texts: list[str], k: int, *, exclude_self: bool = False) -> Run:
        """The top `k` documents per query (only those sharing a term with it), query id -> {doc id: score}."""
        if not query_ids:
            return {}
        depth = min(k + int(exclude_self), len(self.doc_ids))
        positions, scores = self.retriever.retrieve(self.tokenize(texts), k=depth, show_progress=False, n_threads=1)
        run: Run = {}
        for row, query_id in enumerate(query_ids):
            hits = [(self.doc_ids[int(p)], float(s)) for p, s in zip(positions[row], scores[row]) if s > 0]
            if exclude_self:
                hits = [(doc_id, score) for doc_id, score in hits if doc_id != query_id]
            run[query_id] = dict(hits[:k])
        return run


def _stemmer(name: str):
    if not name:
        return None
    import Stemmer

    try:
        return Stemmer.Stemmer(name).stemWords
    except KeyError as exc:
        raise ConfigError(f"BM25 stemmer {name!r} is not a PyStemmer algorithm; use one of "
                          f"{', '.join(Stemmer.algorithms())}, or '' for none") from exc


def cache_key(dataset: RetrievalDataset, settings: BM25Settings) -> str:
    """The digest naming a corpus's index under `settings` (and this bm25s version)."""
    import bm25s

    payload = json.dumps({"format": CACHE_FORMAT, "corpus": corpus_fingerprint(dataset),
                          "bm25s": bm25s.__version__, **dataclasses.asdict(settings)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def build_bm25_index(dataset: RetrievalDataset, settings: BM25Settings = BM25Settings(),
                     cache_dir: str | Path | None = None) -> BM25Index:
    """The BM25 index of `dataset`'s corpus (title and text as one field): read from `cache_dir` when an
    entry for this corpus and these settings exists, else built (and stored there, if given)."""
    import bm25s

    folder = Path(cache_dir) / f"bm25-{cache_key(dataset, settings)}" if cache_dir else None
    if folder is not None and (folder / "doc_ids.json").is_file():
        doc_ids = json.loads((folder / "doc_ids.json").read_text())
        return BM25Index(bm25s.BM25.load(str(folder), show_progress=False), doc_ids, settings)
    doc_ids = sorted(dataset.corpus)
    index = BM25Index(bm25s.BM25(k1=settings.k1, b=settings.b, method=settings.method), doc_ids, settings)
    index.retriever.index(index.tokenize([dataset.corpus[d].full_text for d in doc_ids]), show_progress=False)
    if folder is not None:
        _store(index, folder)
    return index


def _store(index: BM25Index, folder: Path) -> None:
    """Save aside, then rename into place; doc_ids.json (what a reader checks) is written before the rename."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        index.retriever.save(str(staging), show_progress=False)
        (staging / "doc_ids.json").write_text(json.dumps(index.doc_ids))
        (staging / "settings.json").write_text(json.dumps(dataclasses.asdict(index.settings), sort_keys=True))
        os.replace(staging, folder)
    except OSError:
        if folder.is_dir():  # another process stored the same entry first: keep theirs
            shutil.rmtree(staging, ignore_errors=True)
            return
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def bm25_runs(dataset: RetrievalDataset, splits: list[str], settings: BM25Settings = BM25Settings(), *,
              k: int = 100, cache_dir: str | Path | None = None, exclude_self: bool = False) -> dict[str, Run]:
    """BM25's top `k` for every labelled query of each split, split -> run, from one (cached) index.

    Raises:
        DataError: a split does not exist. ConfigError: unknown stemmer or bad settings.
    """
    index = build_bm25_index(dataset, settings, cache_dir)
    runs = {}
    for split in splits:
        queries = dataset.split_queries(split)
        runs[split] = index.search(list(queries), list(queries.values()), k, exclude_self=exclude_self)
    return runs
