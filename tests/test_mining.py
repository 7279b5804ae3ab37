"""Hard-negative mining: no positive ever becomes a negative, seeded determinism, the embedding
cache (a second run encodes nothing), approximate-index recall, and clear errors on bad input.

Real model (MiniLM at 32 tokens), tiny corpora built in temp folders; nothing is mocked. Encoder
calls are counted by wrapping the model's own `encode`, which still does the work.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DISTRACTORS, TOPICS, write_beir
from retrieval_lora.data import RetrievalDataset, load_beir, load_pairs
from retrieval_lora.embedding_cache import EmbeddingCache, encode_corpus_cached, model_identity
from retrieval_lora.errors import ConfigError, DataError, MiningError
from retrieval_lora.mine import main as mine_main
from retrieval_lora.mining import MiningConfig, load_mining_result, mine_hard_negatives, save_mining_result
from retrieval_lora.mining.index import search_corpus
from retrieval_lora.mining.selection import candidate_window, complete, guarded_best, margin_threshold, pick
from retrieval_lora.models import LoraSettings, attach_lora, load_base


@pytest.fixture(scope="session")
def embedder(base_path: str):
    return load_base("embedder", base_path, max_seq_length=32, device="cpu")


class EncodeCounter:
    """Counts calls of the model's real `encode` (installed on the instance, removed after)."""

    def __init__(self, model) -> None:
        self.model, self.calls, self.texts = model, 0, 0
        self.original = model.encode

    def __enter__(self) -> "EncodeCounter":
        def counted(sentences, *args, **kwargs):
            self.calls += 1
            self.texts += len(sentences)
            return self.original(sentences, *args, **kwargs)
        self.model.encode = counted
        return self

    def __exit__(self, *exc) -> None:
        del self.model.encode


@pytest.fixture
def multi_positive(tmp_path: Path) -> Path:
    """Animal topics where some queries have two positives, one positive has a text twin, plus distractors."""
    corpus = {doc_id: ("", text) for _, _, doc_id, text in TOPICS}
    corpus.update({f"x{i}": ("", text) for i, text in enumerate(DISTRACTORS)})
    corpus["d1b"] = ("", "Elephants have a trunk, a long nose that can lift heavy logs.")
    corpus["d3b"] = ("", "Cheetahs reach more than one hundred kilometres per hour when hunting.")
    corpus["d1copy"] = corpus["d1"]  # a second id with the exact text of a positive
    queries = {query_id: text for query_id, text, _, _ in TOPICS}
    train = [(query_id, doc_id, 1) for query_id, _, doc_id, _ in TOPICS[:8]] + [("q1", "d1b", 1), ("q3", "d3b", 2)]
    return write_beir(tmp_path / "multi", corpus, queries, {"train": train, "test": [("q9", "d9", 1)]})


def config(tmp_path: Path | None = None, **overrides) -> MiningConfig:
    values = dict(negatives=2, rank_start=1, rank_end=8, cache_dir=str(tmp_path / "cache") if tmp_path else "",
                  show_progress=False, batch_size=16)
    values.update(overrides)
    return MiningConfig(**values)


def test_negatives_never_include_a_labelled_positive_or_its_text(embedder, multi_positive: Path) -> None:
    dataset = load_beir(multi_positive)
    # Window from rank 0 and no margin: without the positive exclusion the positives would rank first.
    result = mine_hard_negatives(embedder, dataset, "train", config(rank_start=0, rank_end=12, margin=0.0, negatives=4))
    positives = {q: {d for d, g in docs.items() if g > 0} for q, docs in dataset.split_qrels("train").items()}
    table = result.table()
    assert len(table) == 10  # one row per (query, positive): q1 and q3 have two each
    for row in table:
        assert not set(row["negative_ids"]) & positives[row["query_id"]]
        texts = {dataset.corpus[d].full_text for d in positives[row["query_id"]]}
        assert not texts & {row[f"negative_{i}"] for i in range(1, 5)}
        assert "d1copy" not in row["negative_ids"]
    assert result.stats["candidates"]["labelled_positives_in_search_results"] >= 10


def test_training_rows_have_only_text_columns_in_order(embedder, tiny_beir: Path) -> None:
    result = mine_hard_negatives(embedder, load_beir(tiny_beir), "train", config(negatives=3))
    assert result.training_rows().column_names == ["query", "positive", "negative_1", "negative_2", "negative_3"]
    assert result.scores.column_names == ["query_id", "positive_id", "negative_ids", "positive_score",
                                          "negative_scores"]
    for row in result.table():
        assert row["positive_score"] >= max(row["negative_scores"]) * 0.95 - 1e-6  # the margin guard held
        assert row["negative_scores"] == sorted(row["negative_scores"], reverse=True)


def test_mining_is_deterministic_for_a_fixed_seed(embedder, multi_positive: Path, tmp_path: Path) -> None:
    dataset = load_beir(multi_positive)
    settings = dict(sampling="random", rank_start=0, rank_end=14, negatives=2, margin=0.0)
    first = mine_hard_negatives(embedder, dataset, "train", config(seed=7, **settings))
    second = mine_hard_negatives(embedder, dataset, "train", config(seed=7, **settings))
    other = mine_hard_negatives(embedder, dataset, "train", config(tmp_path, seed=8, **settings))
    assert first.table().to_list() == second.table().to_list()
    assert first.scores["negative_ids"] != other.scores["negative_ids"]


def test_second_run_hits_the_cache_and_encodes_nothing(embedder, tiny_beir: Path, tmp_path: Path) -> None:
    dataset = load_beir(tiny_beir)
    with EncodeCounter(embedder) as cold:
        first = mine_hard_negatives(embedder, dataset, "train", config(tmp_path))
    with EncodeCounter(embedder) as warm:
        second = mine_hard_negatives(embedder, dataset, "train", config(tmp_path))
    assert cold.calls == 2 and cold.texts == 18 + 8  # corpus and queries, each once
    assert warm.calls == 0
    assert (first.stats["cache"]["corpus"], second.stats["cache"]["corpus"]) == ("miss", "hit")
    assert second.stats["cache"]["queries"] == "hit"
    assert first.table().to_list() == second.table().to_list()  # float16 round trip on miss and hit alike
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


def test_cache_key_changes_with_max_length_and_adapter(base_path: str, tiny_beir: Path, tmp_path: Path) -> None:
    dataset = load_beir(tiny_beir)
    cache = EmbeddingCache(tmp_path / "cache")
    model = load_base("embedder", base_path, max_seq_length=32, device="cpu")
    identity = model_identity(model)
    assert encode_corpus_cached(model, dataset, cache, show_progress=False).cache == "miss"
    assert encode_corpus_cached(model, dataset, cache, show_progress=False).cache == "hit"
    model.max_seq_length = 24
    assert encode_corpus_cached(model, dataset, cache, show_progress=False).cache == "miss"
    attach_lora(model, "embedder", LoraSettings(rank=2, alpha=4))
    assert model_identity(model) != identity
    assert encode_corpus_cached(model, dataset, cache, show_progress=False).cache == "miss"


def test_corrupt_cache_entry_is_encoded_again_with_a_warning(embedder, tiny_beir: Path, tmp_path: Path) -> None:
    dataset = load_beir(tiny_beir)
    cache = EmbeddingCache(tmp_path / "cache")
    encode_corpus_cached(embedder, dataset, cache, show_progress=False)
    next((tmp_path / "cache").glob("*.npy")).write_bytes(b"not numpy")
    with pytest.warns(UserWarning, match="unreadable"):
        assert encode_corpus_cached(embedder, dataset, cache, show_progress=False).cache == "miss"


def test_approximate_index_reports_recall(embedder, tiny_beir: Path, tmp_path: Path) -> None:
    for kind in ("ivf", "hnsw"):
        stats = mine_hard_negatives(embedder, load_beir(tiny_beir), "train", config(tmp_path, index=kind)).stats
        assert stats["index"]["kind"] == kind
        assert 0.0 <= stats["index"]["recall"]["recall_at_k"] <= 1.0
    exact = mine_hard_negatives(embedder, load_beir(tiny_beir), "train", config(tmp_path)).stats["index"]
    assert exact["kind"] == "exact" and "recall" not in exact


def _clustered(rows: int, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:300] + 0.1 * rng.standard_normal((300, dim)).astype(np.float32)
    return vectors, queries


def test_ivf_recall_is_measured_against_exact_search() -> None:
    vectors, queries = _clustered(4000)
    common = dict(approximate_above=10**6, ef_search=16, recall_queries=100, seed=0)
    rough = search_corpus(vectors, queries, 50, MiningConfig(index="ivf", nprobe=1, **common)).info["recall"]
    assert 0.0 < rough["recall_at_k"] < 1.0 and rough["queries"] == 100
    full = search_corpus(vectors, queries, 50, MiningConfig(index="ivf", nprobe=10**4, **common))
    assert full.info["recall"]["recall_at_k"] == 1.0


def test_streamed_exact_search_equals_a_flat_index(monkeypatch) -> None:
    import faiss

    from retrieval_lora.mining import index as index_module

    vectors, queries = _clustered(5000)
    flat = faiss.IndexFlatIP(16)
    flat.add(vectors)
    scores, rows = flat.search(queries, 40)
    monkeypatch.setattr(index_module, "INDEX_CHUNK", 777)  # several chunks, the last one short
    streamed_rows, streamed_scores = index_module.exact_search(vectors, queries, 40)
    assert np.array_equal(streamed_rows, rows) and np.allclose(streamed_scores, scores, atol=1e-6)
    assert index_module.exact_search(vectors[:10], queries[:2], 40)[0].shape == (2, 10)  # k capped at the corpus


def test_ivfpq_trains_on_a_sample_reads_memory_mapped_vectors_and_returns_exact_scores(tmp_path: Path) -> None:
    from retrieval_lora.mining.index import exact_search

    rng = np.random.default_rng(0)  # 60 topics in 32 dimensions: structure a product quantizer can use
    vectors = rng.standard_normal((60, 32)).astype(np.float32)[rng.integers(0, 60, 12000)]
    vectors += 0.5 * rng.standard_normal(vectors.shape).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:300] + 0.05 * rng.standard_normal((300, 32)).astype(np.float32)
    path = tmp_path / "vectors.npy"
    np.save(path, vectors.astype(np.float16))  # as the embedding cache stores them
    mapped = np.load(path, mmap_mode="r")
    stored = mapped.astype(np.float32)
    settings = dict(index="ivfpq", pq_bytes=8, train_sample=10000, nprobe=8, recall_queries=300, seed=0)
    coarse = search_corpus(mapped, queries, 20, MiningConfig(refine=1, **settings))
    refined = search_corpus(mapped, queries, 20, MiningConfig(refine=8, **settings))
    params = refined.info["params"]
    assert params["train_sample"] == 10000 and params["bytes_per_document"] == 16 and params["nlist"] == 256
    assert coarse.info["recall"]["recall_at_k"] < 0.8 < 0.99 < refined.info["recall"]["recall_at_k"]
    # scores are exact inner products of the stored vectors, whatever the compressed codes said
    found = refined.indices >= 0
    exact = np.einsum("qd,qkd->qk", queries, stored[np.where(found, refined.indices, 0)])
    assert found.all() and np.allclose(refined.scores, exact, atol=1e-5)
    assert (np.diff(refined.scores, axis=1) <= 1e-7).all()  # best first
    truth, _ = exact_search(stored, queries, 20)
    assert np.mean([len(set(a) & set(b)) / 20 for a, b in zip(truth, refined.indices)]) == pytest.approx(
        refined.info["recall"]["recall_at_k"])


def test_ivfpq_settings_are_checked() -> None:
    vectors, queries = _clustered(500, dim=24)
    with pytest.raises(MiningError, match=r"pq_bytes=16 does not divide the embedding dimension 24.*\[8, 24\]"):
        search_corpus(vectors, queries, 5, MiningConfig(index="ivfpq", pq_bytes=16))
    with pytest.raises(ConfigError, match="refine=0"):
        MiningConfig(refine=0)
    with pytest.raises(ConfigError, match="nlist=-1"):
        MiningConfig(nlist=-1)


def test_auto_index_compresses_above_compress_above() -> None:
    from retrieval_lora.mining.index import choose_index

    assert choose_index("auto", 10, 100, 1000)[0] == "exact"
    assert choose_index("auto", 500, 100, 1000)[0] == "hnsw"
    assert choose_index("auto", 5000, 100, 1000) == ("ivfpq", "auto: 5000 documents > compress_above=1000")
    assert choose_index("ivfpq", 10, 100, 1000) == ("ivfpq", "asked for")


def test_query_whose_positives_are_all_missing_is_skipped_and_counted(embedder, tiny_beir: Path) -> None:
    loaded = load_beir(tiny_beir)
    qrels = {"train": {**loaded.qrels["train"], "q9": {"gone": 1}, "q10": {"gone": 1, "d10": 1}}}
    dataset = RetrievalDataset(loaded.root, loaded.corpus, loaded.queries, qrels)  # bypasses load-time checks
    stats = mine_hard_negatives(embedder, dataset, "train", config()).stats
    assert stats["queries"]["skipped"]["all_positives_missing_from_corpus"] == 1
    assert stats["queries"]["mined"] == 9 and stats["rows"]["written"] == 9
    assert stats["rows"]["dropped"]["positive_missing_from_corpus"] == 2


def test_bad_inputs_are_clear_errors(embedder, tiny_beir: Path) -> None:
    dataset = load_beir(tiny_beir)
    with pytest.raises(MiningError, match="rank_end=50 is larger than the corpus of 18 documents"):
        mine_hard_negatives(embedder, dataset, "train", config(rank_end=50))
    empty = RetrievalDataset(dataset.root, {}, dataset.queries, dataset.qrels)
    with pytest.raises(MiningError, match="corpus is empty"):
        mine_hard_negatives(embedder, empty, "train", config())
    with pytest.raises(DataError, match="split 'validation' not found"):
        mine_hard_negatives(embedder, dataset, "validation", config())
    with pytest.raises(MiningError, match="kept 2 negatives"):  # a margin so strict that nothing survives
        mine_hard_negatives(embedder, dataset, "train", config(margin=0.01, rank_start=0))
    with pytest.raises(ConfigError, match="fewer than negatives=5"):
        MiningConfig(negatives=5, rank_start=10, rank_end=12)
    with pytest.raises(ConfigError, match="sampling='best'"):
        MiningConfig(sampling="best")
    with pytest.raises(ConfigError, match="short_rows='keep': must be one of drop, fill"):
        MiningConfig(short_rows="keep")
    with pytest.raises(ConfigError, match="fill_depth=100: must be above rank_end=100"):
        MiningConfig(short_rows="fill", fill_depth=100)


def test_cross_encoder_guard_runs_and_is_counted(embedder, base_path: str, tiny_beir: Path) -> None:
    cross_encoder = load_base("reranker", base_path, max_seq_length=32, device="cpu")  # untrained head: any scores
    stats = mine_hard_negatives(embedder, load_beir(tiny_beir), "train", config(rank_end=12, margin=1.0),
                                cross_encoder=cross_encoder).stats
    candidates = stats["candidates"]
    assert candidates["in_window"] == candidates["removed_by_margin"] + candidates["removed_by_cross_encoder"] \
        + candidates["kept"]
    assert "cross_encoder" in stats["seconds"]


def test_window_margin_and_pick_on_plain_arrays() -> None:
    indices = np.array([[5, 0, 1, 2, 3, 4]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]], dtype=np.float32)
    window = candidate_window(indices, scores, [np.array([0, 2])], documents=6, rank_start=1, rank_end=3)
    assert window.indices.tolist() == [[1, 3]]  # ranking without positives: 5, 1, 3, 4 -> ranks 1..2
    assert window.positives_in_results == 2
    assert margin_threshold(np.array([0.8, -0.5]), 0.9).tolist() == pytest.approx([0.72, -0.55])
    keep = np.array([[True, False, True, True]])
    order, enough = pick(keep, 2, "top", np.random.default_rng(0))
    assert order.tolist() == [[0, 2]] and enough.tolist() == [True]
    order, enough = pick(keep, 4, "random", np.random.default_rng(0))
    assert not enough[0]


def test_saved_result_round_trips_and_trains_from_rows(embedder, tiny_beir: Path, tmp_path: Path) -> None:
    result = mine_hard_negatives(embedder, load_beir(tiny_beir), "train", config())
    folder = save_mining_result(result, tmp_path / "mined")
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "rows", "scores", "stats.json"]
    loaded = load_mining_result(folder)
    assert loaded.table().to_list() == result.table().to_list()
    assert load_pairs(folder / "rows").column_names == ["query", "positive", "negative_1", "negative_2"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["config"]["negatives"] == 2 and manifest["model_identity"] == result.stats["cache"]["model_identity"]
    with pytest.raises(MiningError, match="not a complete mining result"):
        load_mining_result(tmp_path / "nowhere")


def test_cli_writes_the_folder_and_reuses_the_cache(base_path: str, tiny_beir: Path, tmp_path: Path, capsys) -> None:
    args = ["--data", str(tiny_beir), "--base", base_path, "--max-seq-length", "32", "--output", str(tmp_path / "out"),
            "--negatives", "2", "--rank-start", "1", "--rank-end", "8", "--cache-dir", str(tmp_path / "cache"),
            "--no-show-progress"]
    assert mine_main(args) == 0
    assert "cache: corpus miss" in capsys.readouterr().out
    assert mine_main(args) == 0
    out = capsys.readouterr().out
    assert "cache: corpus hit" in out and "rows written: 8 of 8" in out
    assert (tmp_path / "out" / "rows").is_dir()


# A margin of 0.5 leaves half of the multi-positive rows without 2 guarded candidates in ranks 1..3.
SHORT = dict(negatives=2, rank_start=1, rank_end=4, margin=0.5)


def test_short_rows_are_dropped_and_counted_by_default(embedder, multi_positive: Path) -> None:
    assert MiningConfig().short_rows == "drop"
    stats = mine_hard_negatives(embedder, load_beir(multi_positive), "train", config(**SHORT)).stats
    assert stats["rows"]["written"] == 5 and stats["rows"]["dropped"]["too_few_negatives"] == 5
    assert stats["rows"]["filled"] == 0 and stats["queries"]["recovered_by_fill"] == 0
    assert stats["queries"]["skipped"]["no_row_with_enough_negatives"] == 3


def test_fill_keeps_short_rows_with_guarded_non_positive_negatives(embedder, multi_positive: Path) -> None:
    dataset = load_beir(multi_positive)
    dropped = mine_hard_negatives(embedder, dataset, "train", config(**SHORT))
    filled = mine_hard_negatives(embedder, dataset, "train", config(**SHORT, short_rows="fill", fill_depth=20))
    stats = filled.stats
    assert stats["rows"]["written"] == 10 and stats["rows"]["filled"] == 5
    assert stats["rows"]["dropped"]["too_few_negatives"] == 0
    assert stats["queries"]["mined"] == 8 and stats["queries"]["recovered_by_fill"] == 3
    assert stats["candidates"]["fill"]["negatives"] > 0 and stats["scores"]["filled_rows"]["positive"]["count"] == 5
    assert filled.training_rows().column_names == ["query", "positive", "negative_1", "negative_2"]
    positives = {q: {d for d, g in docs.items() if g > 0} for q, docs in dataset.split_qrels("train").items()}
    kept = {(row["query_id"], row["positive_id"]): row for row in dropped.table()}
    for row in filled.table():
        ids = row["negative_ids"]
        assert len(set(ids)) == 2 and not set(ids) & positives[row["query_id"]] and "d1copy" not in ids
        texts = {dataset.corpus[d].full_text for d in positives[row["query_id"]]}
        assert not texts & {row["negative_1"], row["negative_2"]}
        limit = float(margin_threshold(np.array([row["positive_score"]]), SHORT["margin"])[0])
        assert max(row["negative_scores"]) <= limit + 1e-6  # the margin guard holds for fill negatives too
        assert row["negative_scores"] == sorted(row["negative_scores"], reverse=True)
        if (row["query_id"], row["positive_id"]) in kept:  # rows that had enough are unchanged
            assert ids == kept[row["query_id"], row["positive_id"]]["negative_ids"]


def test_fill_with_a_shallow_ranking_still_drops_what_it_cannot_complete(embedder, multi_positive: Path) -> None:
    stats = mine_hard_negatives(embedder, load_beir(multi_positive), "train",
                                config(**SHORT, short_rows="fill", fill_depth=5)).stats
    rows = stats["rows"]
    assert 0 <= rows["filled"] < 5 and rows["written"] == 5 + rows["filled"]
    assert rows["dropped"]["too_few_negatives"] == 5 - rows["filled"]


def test_fill_runs_the_cross_encoder_guard_on_fill_candidates(embedder, cross_encoder_base: str,
                                                             multi_positive: Path) -> None:
    # A cross-encoder whose seeded random head scores arbitrarily, but the same each run (the base's own
    # reranker, under the cosine prior, would agree with the embedder and remove nothing).
    cross_encoder = load_base("reranker", cross_encoder_base, max_seq_length=32, device="cpu")
    settings = dict(negatives=3, rank_start=1, rank_end=4, margin=1.0, short_rows="fill", fill_depth=20)
    stats = mine_hard_negatives(embedder, load_beir(multi_positive), "train", config(**settings),
                                cross_encoder=cross_encoder).stats
    rows, fill = stats["rows"], stats["candidates"]["fill"]
    assert rows["written"] + rows["dropped"]["too_few_negatives"] == 10
    assert fill["removed_by_cross_encoder"] > 0  # fill candidates went through the cross-encoder too
    assert fill["negatives"] >= rows["filled"]


def test_guarded_best_and_complete_on_plain_arrays() -> None:
    # One query's ranks past the window: corpus rows 7, 8, 9, 6 with falling scores, then nothing.
    beyond = candidate_window(np.array([[7, 8, 9, 6, -1]]), np.array([[0.6, 0.5, 0.4, 0.3, -np.inf]], dtype=np.float32),
                              [np.array([9])], documents=10, rank_start=0, rank_end=5)
    rows, scores, found = guarded_best(beyond, np.array([0, 0]), np.array([0.55, 0.35], dtype=np.float32), 2)
    assert rows.tolist() == [[8, 6], [6, -1]]  # 9 is a positive; 7 (and 8, 6 for the second row) too close
    assert found.tolist() == [[True, True], [True, False]] and scores[1, 1] == -np.inf
    own = np.array([[1, 2, 3], [4, 5, 6]])
    assert complete(own, np.array([1, 3]), np.array([[10, 11, 12], [13, 14, 15]])).tolist() == [[1, 10, 11], [4, 5, 6]]
