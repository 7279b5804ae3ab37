"""Mining hard negatives for every (query, positive) pair of a split.

Reads top to bottom as check -> plan -> encode -> search -> select -> assemble:

    check:    settings against the corpus (empty corpus, window wider than the corpus)
    plan:     one row per (query, labelled positive present in the corpus); queries whose
              positives are all missing are skipped and counted
    encode:   each distinct corpus text and each query once, through the embedding cache
    search:   FAISS top-k (exact, IVF, HNSW or IVF-PQ; recall reported for approximate ones)
    select:   rank window without positives -> margin guard -> optional cross-encoder guard
              -> `top` or seeded `random` choice; rows left with too few negatives are dropped,
              or (`short_rows="fill"`) completed from the guarded ranks past the window
    assemble: text rows for training, ids and scores beside them, statistics

How this differs from `sentence_transformers.util.mine_hard_negatives`: the margin is applied
per (query, positive) row against that row's positive, not against the weakest positive of
the query, so one weak positive of a multi-positive query (NFCorpus has up to 1,363) does not
wipe out every candidate of that query; the rank window is counted before the filters, so a
filter never pulls easier candidates into it; documents with identical texts are one
candidate (and a text duplicate of a positive is a positive); every dropped row and query is
counted with its reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasets import Dataset
from sentence_transformers import CrossEncoder, SentenceTransformer

from retrieval_lora.config import config_to_dict
from retrieval_lora.data.beir import RetrievalDataset
from retrieval_lora.data.fingerprint import corpus_fingerprint, dataset_fingerprint
from retrieval_lora.embedding_cache import (
    CorpusEmbeddings, EmbeddingCache, encode_corpus_cached, encode_texts_cached, model_identity, texts_fingerprint,
)
from retrieval_lora.errors import MiningError
from retrieval_lora.manifest import build_manifest
from retrieval_lora.mining.config import MiningConfig
from retrieval_lora.mining.cross_encoder_filter import cross_encoder_drops
from retrieval_lora.mining.index import SearchResult, search_corpus
from retrieval_lora.mining.result import MiningResult
from retrieval_lora.mining.selection import Window, candidate_window, complete, guarded_best, margin_threshold, pick
from retrieval_lora.mining.stats import score_distributions
from retrieval_lora.models import load_base

PAIR_CHUNK = 16384  # rows per chunk when scoring (query, positive) pairs: bounds temporary memory


@dataclass
class _Plan:
    """The rows to mine: per query its text and positive ids; what was skipped before encoding."""

    query_ids: list[str]
    query_texts: list[str]
    positive_ids: list[list[str]]
    skipped_queries: dict[str, int]
    missing_positives: int
    labelled_queries: int


def _check(dataset: RetrievalDataset, config: MiningConfig) -> None:
    documents = len(dataset.corpus)
    if documents == 0:
        raise MiningError(f"{dataset.root}: the corpus is empty; there is nothing to mine negatives from")
    if config.rank_end > documents:
        raise MiningError(f"rank_end={config.rank_end} is larger than the corpus of {documents} documents "
                          f"({dataset.root}); use --rank-end {documents} or less (and a smaller --rank-start)")


def _plan(dataset: RetrievalDataset, split: str) -> _Plan:
    qrels = dataset.split_qrels(split)
    plan = _Plan([], [], [], {"all_positives_missing_from_corpus": 0}, 0, 0)
    for query_id in sorted(qrels):
        labelled = sorted(doc_id for doc_id, grade in qrels[query_id].items() if grade > 0)
        if not labelled:
            continue
        plan.labelled_queries += 1
        present = [doc_id for doc_id in labelled if doc_id in dataset.corpus]
        plan.missing_positives += len(labelled) - len(present)
        if not present:
            plan.skipped_queries["all_positives_missing_from_corpus"] += 1
            continue
        plan.query_ids.append(query_id)
        plan.query_texts.append(dataset.queries[query_id])
        plan.positive_ids.append(present)
    if not plan.query_ids:
        raise MiningError(f"{dataset.root}: no query of split {split!r} has a relevant document in the corpus "
                          f"({plan.missing_positives} labelled positives are missing from corpus.jsonl)")
    return plan


@dataclass
class _Rows:
    """One entry per (query, distinct positive text): its query index, positive corpus row and id."""

    positive_rows: list[np.ndarray]
    query: np.ndarray
    positive: np.ndarray
    positive_id: list[str]
    duplicate_positives: int


def _rows_of(plan: _Plan, corpus: CorpusEmbeddings) -> _Rows:
    """Per query its distinct positive corpus rows; per training row its query, positive row and id."""
    row_of = corpus.row_of()
    rows = _Rows([], np.empty(0), np.empty(0), [], 0)
    row_query, row_positive = [], []
    for q, ids in enumerate(plan.positive_ids):
        seen: dict[int, str] = {}
        for doc_id in ids:
            if row_of[doc_id] in seen:
                rows.duplicate_positives += 1  # same text as an earlier positive: one row is enough
                continue
            seen[row_of[doc_id]] = doc_id
        rows.positive_rows.append(np.fromiter(seen, dtype=np.int64))
        row_query += [q] * len(seen)
        row_positive += list(seen)
        rows.positive_id += list(seen.values())
    rows.query, rows.positive = np.asarray(row_query, dtype=np.int64), np.asarray(row_positive, dtype=np.int64)
    return rows


def _pair_scores(queries: np.ndarray, query_at: np.ndarray, docs: np.ndarray, doc_at: np.ndarray) -> np.ndarray:
    out = np.empty(len(query_at), dtype=np.float32)
    for start in range(0, len(query_at), PAIR_CHUNK):
        end = start + PAIR_CHUNK
        out[start:end] = np.einsum("ij,ij->i", queries[query_at[start:end]], docs[doc_at[start:end]])
    return out


def _load_cross_encoder(config: MiningConfig, given: CrossEncoder | None) -> CrossEncoder | None:
    if given is not None or not config.cross_encoder:
        return given
    return load_base("reranker", config.cross_encoder)


@dataclass
class _Selection:
    """Per row (rows x window): which candidates each guard removed, which survived, and the pick;
    per row (rows x negatives) the chosen corpus rows and scores, and which rows were filled."""

    window: Window
    positive_scores: np.ndarray
    candidate_scores: np.ndarray
    in_window: np.ndarray
    margin_drop: np.ndarray
    ce_drop: np.ndarray
    keep: np.ndarray
    order: np.ndarray | None = None
    enough: np.ndarray | None = None
    negatives: np.ndarray | None = None
    negative_scores: np.ndarray | None = None
    filled: np.ndarray | None = None
    fill_negatives: int = 0
    fill_ce_drop: int = 0


def _encode(model: SentenceTransformer, dataset: RetrievalDataset, plan: _Plan, cache: EmbeddingCache | None,
            identity: str, config: MiningConfig, seconds: dict[str, float]) -> tuple[CorpusEmbeddings, np.ndarray, str]:
    tick = time.perf_counter()
    corpus = encode_corpus_cached(model, dataset, cache, identity=identity, batch_size=config.batch_size,
                                  show_progress=config.show_progress)
    seconds["encode_corpus"] = time.perf_counter() - tick
    tick = time.perf_counter()
    queries, status = encode_texts_cached(
        model, plan.query_texts, cache, content=f"queries:{texts_fingerprint(plan.query_texts)}", identity=identity,
        batch_size=config.batch_size, show_progress=config.show_progress,
        description=f"Encoding {len(plan.query_texts)} queries")
    seconds["encode_queries"] = time.perf_counter() - tick
    return corpus, queries, status


def _select(search: SearchResult, rows: _Rows, corpus: CorpusEmbeddings, queries: np.ndarray, plan: _Plan,
            config: MiningConfig, cross_encoder: CrossEncoder | None, seconds: dict[str, float]) -> _Selection:
    """Window -> margin guard -> optional cross-encoder guard -> pick -> fill short rows (if asked), timed."""
    tick = time.perf_counter()
    window = candidate_window(search.indices, search.scores, rows.positive_rows, len(corpus.vectors),
                              config.rank_start, config.rank_end)
    positive_scores = _pair_scores(queries, rows.query, corpus.vectors, rows.positive)
    candidate_scores = window.scores[rows.query]
    in_window = window.indices[rows.query] >= 0
    margin_drop = in_window & (candidate_scores > margin_threshold(positive_scores, config.margin)[:, None])
    chosen = _Selection(window, positive_scores, candidate_scores, in_window, margin_drop,
                        np.zeros_like(in_window), in_window & ~margin_drop)
    seconds["select"] = time.perf_counter() - tick
    if cross_encoder is not None:
        tick = time.perf_counter()
        chosen.ce_drop = cross_encoder_drops(cross_encoder, plan.query_texts, corpus.texts, window.indices, rows.query,
                                             rows.positive, chosen.keep, config.margin, config.batch_size,
                                             config.show_progress)
        chosen.keep &= ~chosen.ce_drop
        seconds["cross_encoder"] = time.perf_counter() - tick
    tick = time.perf_counter()
    chosen.order, chosen.enough = pick(chosen.keep, config.negatives, config.sampling,
                                       np.random.default_rng(config.seed))
    chosen.negatives = np.take_along_axis(window.indices[rows.query], chosen.order, axis=1)
    chosen.negative_scores = np.take_along_axis(candidate_scores, chosen.order, axis=1)
    chosen.filled = np.zeros(len(rows.query), dtype=bool)
    seconds["select"] += time.perf_counter() - tick
    if config.short_rows == "fill" and not chosen.enough.all():
        tick = time.perf_counter()
        _fill(chosen, search, rows, corpus, plan, config, cross_encoder)
        seconds["fill"] = time.perf_counter() - tick
    return chosen


def _fill_end(config: MiningConfig, documents: int) -> int:
    """End of the ranks fill candidates come from (the window's end when rows are dropped instead)."""
    return max(config.rank_end, min(config.fill_depth, documents)) if config.short_rows == "fill" else config.rank_end


def _fill(chosen: _Selection, search: SearchResult, rows: _Rows, corpus: CorpusEmbeddings, plan: _Plan,
          config: MiningConfig, cross_encoder: CrossEncoder | None) -> None:
    """Complete each short row: all its own survivors, then the best-ranked candidates past the window
    that pass the same margin (and cross-encoder) guard. A fill candidate the cross-encoder rejects
    is not replaced: that row stays short and is dropped."""
    short, count = np.flatnonzero(~chosen.enough), config.negatives
    beyond = candidate_window(search.indices, search.scores, rows.positive_rows, len(corpus.vectors),
                              config.rank_end, _fill_end(config, len(corpus.vectors)))
    thresholds = margin_threshold(chosen.positive_scores[short], config.margin)
    extra, extra_scores, found = guarded_best(beyond, rows.query[short], thresholds, count)
    keep = chosen.keep[short]
    have = keep.sum(axis=1)
    needed = np.arange(count)[None, :] < (count - have)[:, None]
    if cross_encoder is not None:
        rejected = cross_encoder_drops(cross_encoder, [plan.query_texts[q] for q in rows.query[short]], corpus.texts,
                                       extra, np.arange(len(short)), rows.positive[short], found & needed,
                                       config.margin, config.batch_size, config.show_progress)
        found &= ~rejected
        chosen.fill_ce_drop = int(rejected.sum())
    whole = (found | ~needed).all(axis=1)
    own = np.argsort(~keep, axis=1, kind="stable")[:, :count]  # every survivor of a short row, in rank order
    own_rows = np.take_along_axis(chosen.window.indices[rows.query[short]], own, axis=1)
    own_scores = np.take_along_axis(chosen.candidate_scores[short], own, axis=1)
    taken = short[whole]
    chosen.negatives[taken] = complete(own_rows, have, extra)[whole]
    chosen.negative_scores[taken] = complete(own_scores, have, extra_scores)[whole]
    chosen.enough[taken] = chosen.filled[taken] = True
    chosen.fill_negatives = int((count - have[whole]).sum())


def _stats(split: str, plan: _Plan, rows: _Rows, corpus: CorpusEmbeddings, chosen: _Selection,
           chosen_scores: np.ndarray, search: SearchResult, cache: dict[str, Any], seconds: dict[str, float]) -> dict:
    enough, filled = chosen.enough, chosen.filled
    written_queries = len(set(rows.query[enough].tolist()))
    recovered = written_queries - len(set(rows.query[enough & ~filled].tolist()))
    return {
        "split": split,
        "corpus": {"documents": len(corpus.ids), "distinct_texts": len(corpus.texts)},
        "queries": {"labelled": plan.labelled_queries, "mined": written_queries, "recovered_by_fill": recovered,
                    "skipped": {**plan.skipped_queries,
                                "no_row_with_enough_negatives": len(plan.query_ids) - written_queries}},
        "rows": {"possible": int(len(rows.query)) + rows.duplicate_positives + plan.missing_positives,
                 "written": int(enough.sum()), "filled": int(filled.sum()),
                 "dropped": {"positive_missing_from_corpus": plan.missing_positives,
                             "duplicate_positive_text": rows.duplicate_positives,
                             "too_few_negatives": int((~enough).sum())}},
        "candidates": {"counted_per": "(query, positive) row", "in_window": int(chosen.in_window.sum()),
                       "removed_by_margin": int(chosen.margin_drop.sum()),
                       "removed_by_cross_encoder": int(chosen.ce_drop.sum()), "kept": int(chosen.keep.sum()),
                       "labelled_positives_in_search_results": chosen.window.positives_in_results,
                       "queries_with_short_window": chosen.window.short_queries,
                       "fill": {"negatives": chosen.fill_negatives, "removed_by_cross_encoder": chosen.fill_ce_drop}},
        "scores": {**score_distributions(chosen.positive_scores[enough], chosen_scores),
                   "filled_rows": score_distributions(chosen.positive_scores[filled], chosen.negative_scores[filled])},
        "index": search.info,
        "cache": cache,
        "seconds": {name: round(value, 3) for name, value in seconds.items()},
    }


def mine_hard_negatives(model: SentenceTransformer, dataset: RetrievalDataset, split: str, config: MiningConfig,
                        *, cross_encoder: CrossEncoder | None = None) -> MiningResult:
    """Mine `config.negatives` hard negatives for each (query, positive) pair of `split`.

    Args:
        model: the embedder that ranks the corpus (usually the frozen base; any adapter on it
            is part of the embedding cache key).
        dataset: corpus, queries and qrels; positives are the qrels of `split` with grade > 0.
        split: the qrels split to mine for (usually "train").
        config: window, margin, sampling, index, cache (see `MiningConfig`).
        cross_encoder: an already loaded cross-encoder for the optional false-negative guard
            (overrides `config.cross_encoder`).

    Returns:
        MiningResult whose `rows` (query, positive, negative_1..N, text only) go to training
        as they are, `scores` holds ids and scores row by row, and `stats` records score
        distributions, candidates removed per filter (counted per row), skipped queries and
        dropped rows with reasons, rows completed by `short_rows="fill"` (`rows.filled`, the
        queries only they brought back: `queries.recovered_by_fill`, their scores:
        `scores.filled_rows`), the index (with recall when approximate) and timings.

    Raises:
        MiningError: empty corpus, `rank_end` larger than the corpus, no minable query, or no
            row that kept enough negatives.
        DataError: `split` does not exist in the dataset.
    """
    started, seconds = time.perf_counter(), {}
    _check(dataset, config)
    plan = _plan(dataset, split)
    cache = EmbeddingCache(config.cache_dir, config.cache_dtype) if config.cache_dir else None
    identity = model_identity(model)
    corpus, queries, query_cache = _encode(model, dataset, plan, cache, identity, config, seconds)

    rows = _rows_of(plan, corpus)
    depth = min(len(corpus.vectors), _fill_end(config, len(corpus.vectors))
                + max(len(positives) for positives in rows.positive_rows))
    search = search_corpus(corpus.vectors, queries, depth, config)
    seconds["search"] = search.info["build_seconds"] + search.info["search_seconds"]
    chosen = _select(search, rows, corpus, queries, plan, config, _load_cross_encoder(config, cross_encoder), seconds)
    enough = chosen.enough
    if not enough.any():
        raise MiningError(f"no (query, positive) row of split {split!r} kept {config.negatives} negatives: "
                          f"{int(chosen.in_window.sum())} window candidates, {int(chosen.margin_drop.sum())} removed "
                          f"by the margin, {int(chosen.ce_drop.sum())} by the cross-encoder; widen "
                          "--rank-start/--rank-end, lower --margin, ask for fewer --negatives or --short-rows fill")

    tick = time.perf_counter()
    negatives, negative_scores = chosen.negatives[enough], chosen.negative_scores[enough]
    texts, scores = _assemble(plan, corpus, rows.query[enough], rows.positive[enough],
                              [rows.positive_id[i] for i in np.flatnonzero(enough)],
                              chosen.positive_scores[enough], negatives, negative_scores)
    seconds["select"] += time.perf_counter() - tick
    seconds["total"] = time.perf_counter() - started
    cache_info = {"corpus": corpus.cache, "queries": query_cache, "model_identity": identity,
                  "folder": str(cache.folder) if cache else None}
    stats = _stats(split, plan, rows, corpus, chosen, negative_scores, search, cache_info, seconds)
    manifest = build_manifest("mined-negatives", config_to_dict(config), split=split,
                              model_identity=identity, corpus_fingerprint=corpus_fingerprint(dataset),
                              dataset_fingerprint=dataset_fingerprint(dataset), dataset=str(dataset.root))
    return MiningResult(texts, scores, stats, manifest)


def _assemble(plan: _Plan, corpus: CorpusEmbeddings, row_query: np.ndarray, row_positive: np.ndarray,
              positive_ids: list[str], positive_scores: np.ndarray, chosen: np.ndarray,
              chosen_scores: np.ndarray) -> tuple[Dataset, Dataset]:
    """Text rows for training and the aligned ids/scores. Lists hold references to the corpus
    strings, so no text is copied per row before the arrow conversion."""
    texts, first_ids = corpus.texts, corpus.first_ids
    columns = {"query": [plan.query_texts[q] for q in row_query], "positive": [texts[p] for p in row_positive]}
    for slot in range(chosen.shape[1]):
        columns[f"negative_{slot + 1}"] = [texts[r] for r in chosen[:, slot]]
    scores = {"query_id": [plan.query_ids[q] for q in row_query], "positive_id": positive_ids,
              "negative_ids": [[first_ids[r] for r in row] for row in chosen],
              "positive_score": positive_scores.tolist(), "negative_scores": chosen_scores.tolist()}
    return Dataset.from_dict(columns), Dataset.from_dict(scores)
