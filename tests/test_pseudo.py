"""Training without labels: pseudo-queries from the corpus (crop, title, a seq2seq generator) and teacher margins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TOPICS, make_cross_encoder
from retrieval_lora.data import load_beir
from retrieval_lora.data.pseudo import PSEUDO_SPLIT, PseudoSettings, pseudo_queries, with_pseudo_split
from retrieval_lora.errors import ConfigError, DataError
from retrieval_lora.training import TrainConfig


def _titled(tiny_beir: Path) -> Path:
    """The tiny set with a title on every topic document (the distractors keep none)."""
    lines = [json.loads(line) for line in (tiny_beir / "corpus.jsonl").read_text().splitlines()]
    names = {doc_id: text.split()[1] for _, _, doc_id, text in TOPICS}
    with (tiny_beir / "corpus.jsonl").open("w") as handle:
        for doc in lines:
            handle.write(json.dumps(doc | {"title": names.get(doc["_id"], "")}) + "\n")
    return tiny_beir


def test_cropped_queries_are_spans_of_their_document_and_fixed_by_the_seed(tiny_beir: Path) -> None:
    dataset = load_beir(tiny_beir)
    settings = PseudoSettings(method="crop", per_document=2, seed=3, crop_words=(3, 6))
    first = pseudo_queries(dataset, settings, show_progress=False)
    assert first == pseudo_queries(dataset, settings, show_progress=False)  # same seed, same queries
    assert first != pseudo_queries(dataset, PseudoSettings(method="crop", per_document=2, seed=4, crop_words=(3, 6)),
                                   show_progress=False)
    for query_id, (text, doc_id) in first.items():
        assert query_id.startswith(f"{PSEUDO_SPLIT}:{doc_id}:") and 3 <= len(text.split()) <= 6
        assert text in " ".join(dataset.corpus[doc_id].full_text.split())
    sample = pseudo_queries(dataset, PseudoSettings(method="crop", documents=5, seed=3), show_progress=False)
    assert len({doc_id for _, doc_id in sample.values()}) == 5
    with_split = with_pseudo_split(dataset, first)
    assert with_split.qrels[PSEUDO_SPLIT] == {qid: {doc_id: 1} for qid, (_, doc_id) in first.items()}
    assert set(with_split.qrels) == set(dataset.qrels) | {PSEUDO_SPLIT} and dataset.qrels.keys() != with_split.qrels.keys()


def test_titles_become_queries_only_where_documents_have_one(tiny_beir: Path) -> None:
    dataset = load_beir(tiny_beir)
    with pytest.raises(DataError, match="no pseudo-query could be made with method 'title'"):
        pseudo_queries(dataset, PseudoSettings(method="title"), show_progress=False)
    titled = load_beir(_titled(tiny_beir))
    made = pseudo_queries(titled, PseudoSettings(method="title"), show_progress=False)
    assert sorted(doc_id for _, doc_id in made.values()) == sorted(doc_id for _, _, doc_id, _ in TOPICS)
    assert all(text == titled.corpus[doc_id].title for text, doc_id in made.values())


def test_pseudo_query_settings_are_checked_with_the_training_config() -> None:
    with pytest.raises(ConfigError, match="pseudo_queries='generator' needs --generator"):
        TrainConfig(pseudo_queries="generator")
    with pytest.raises(ConfigError, match="must be one of crop, title, generator"):
        TrainConfig(pseudo_queries="llm")
    with pytest.raises(ConfigError, match="teacher is for the embedder"):
        TrainConfig(task="reranker", teacher="x")
    with pytest.raises(ConfigError, match="margin-mse' needs --teacher"):
        TrainConfig(loss="margin-mse")
    assert TrainConfig(teacher="x").resolved_loss == "margin-mse"
    assert TrainConfig(pseudo_queries="crop").resolved_dev_split(["dev", "test"]) is None  # no labels read


def _tiny_generator(folder: Path, base_path: str) -> str:
    """A randomly initialised T5 with the base's WordPiece tokenizer: a seq2seq model made offline."""
    from transformers import AutoTokenizer, T5Config, T5ForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, d_kv=8, num_layers=1, num_heads=2,
                      decoder_start_token_id=tokenizer.pad_token_id, pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return str(folder)


def test_a_seq2seq_generator_writes_queries_that_are_cached(tiny_beir: Path, tmp_path: Path, base_path: str,
                                                            monkeypatch) -> None:
    generator = _tiny_generator(tmp_path / "generator", base_path)
    dataset = load_beir(tiny_beir)
    settings = PseudoSettings(method="generator", generator=generator, per_document=2, batch_size=4,
                              max_input_tokens=32, max_new_tokens=6, seed=1)
    made = pseudo_queries(dataset, settings, cache_dir=str(tmp_path / "cache"), show_progress=False)
    assert {doc_id for _, doc_id in made.values()} <= set(dataset.corpus) and len(made) >= len(dataset.corpus)
    assert all(isinstance(text, str) and text for text, _ in made.values())
    assert made == pseudo_queries(dataset, settings, show_progress=False)  # the seed fixes the sampling
    assert len(list((tmp_path / "cache" / "pseudo-queries").glob("*.json"))) == 1
    import transformers

    def no_loading(*args, **kwargs):
        raise AssertionError("the cached queries should have been read")

    monkeypatch.setattr(transformers.AutoModelForSeq2SeqLM, "from_pretrained", no_loading)
    assert pseudo_queries(dataset, settings, cache_dir=str(tmp_path / "cache"), show_progress=False) == made


def test_training_rows_from_a_generator_without_labels(tiny_beir: Path, tmp_path: Path, base_path: str) -> None:
    """The generator path end to end through the pipeline's rows verb: no train split needed."""
    from retrieval_lora import pipeline

    (tiny_beir / "qrels" / "train.tsv").unlink()  # no training labels at all
    generator = _tiny_generator(tmp_path / "generator", base_path)
    train = TrainConfig(pseudo_queries="generator", generator=generator, pseudo_documents=10, max_seq_length=64)
    data = pipeline.DataConfig(path=str(tiny_beir), cache_dir=str(tmp_path / "cache"))
    dataset = pipeline.load_data(data)
    pipeline.check_splits(dataset, train, pipeline.EvaluationConfig())
    rows = pipeline.build_rows(train, data, dataset, tmp_path / "rows")
    assert rows.mined and rows.rows.column_names == ["query", "positive", "negative_1"]
    assert 0 < len(rows.rows) <= 10 and not set(rows.rows["query"]) & set(dataset.queries.values())


def _topic_rows():
    """Two mined rows of the tiny topics: each query's own document, then two other topics' documents."""
    from datasets import Dataset

    return Dataset.from_dict({"query": ["which animal has a trunk", "fastest land animal"],
                              "positive": [TOPICS[0][3], TOPICS[2][3]],
                              "negative_1": [TOPICS[1][3], TOPICS[3][3]], "negative_2": [TOPICS[4][3], TOPICS[5][3]]})


def test_teacher_margins_are_raw_logit_differences_whatever_the_activation(tiny_beir: Path, tmp_path: Path,
                                                                          base_path: str) -> None:
    from retrieval_lora.training.teacher import load_teacher, teacher_margins

    folder = make_cross_encoder(base_path, tmp_path / "teacher", activation="sigmoid")
    teacher = load_teacher(str(folder))
    assert isinstance(teacher.activation_fn, torch.nn.Sigmoid)
    rows = _topic_rows()
    margins = np.asarray(teacher_margins(teacher, rows, show_progress=False))
    raw = np.asarray(teacher.predict([(q, d) for row in rows for q, d in
                                      [(row["query"], row[c]) for c in ("positive", "negative_1", "negative_2")]],
                                     activation_fn=torch.nn.Identity())).reshape(2, 3)
    np.testing.assert_allclose(margins, raw[:, :1] - raw[:, 1:], atol=1e-5)
    squashed = 1 / (1 + np.exp(-raw))
    assert not np.allclose(margins, squashed[:, :1] - squashed[:, 1:], atol=1e-3)
    one = teacher_margins(teacher, rows.remove_columns("negative_2"), show_progress=False)
    assert isinstance(one[0], float) and one == pytest.approx(list(margins[:, 0]), abs=1e-5)


def test_a_bi_encoder_teacher_gives_its_cosine_gaps_in_the_students_units(base_path: str) -> None:
    """A sentence-transformers embedder as --teacher (a larger bi-encoder to distil, no head): its margins are
    MARGIN_SCALE x (cos(q, positive) - cos(q, negative)) of its own embeddings, not a new head's noise."""
    from retrieval_lora.models import load_base
    from retrieval_lora.training.teacher import MARGIN_SCALE, load_teacher, teacher_margins

    rows = _topic_rows()
    margins = np.asarray(teacher_margins(load_teacher(base_path), rows, show_progress=False))
    embedder = load_base("embedder", base_path)
    queries = embedder.encode(rows["query"], normalize_embeddings=True)
    documents = np.stack([embedder.encode(rows[c], normalize_embeddings=True)
                          for c in ("positive", "negative_1", "negative_2")], axis=1)
    cosines = np.einsum("qd,qkd->qk", queries, documents)
    np.testing.assert_allclose(margins, MARGIN_SCALE * (cosines[:, :1] - cosines[:, 1:]), atol=1e-3)
    assert (margins[:, 0] > 0).all()  # the topic's own document beats another topic's


@pytest.mark.slow
def test_an_embedder_trains_on_cropped_queries_with_teacher_margins(tiny_beir: Path, tmp_path: Path,
                                                                   base_path: str) -> None:
    """No label read: crop queries, mined negatives, margins from a teacher, MarginMSE; the loss falls."""
    from retrieval_lora import pipeline

    teacher = make_cross_encoder(base_path, tmp_path / "teacher", activation="sigmoid")
    train = TrainConfig(pseudo_queries="crop", pseudo_documents=0, teacher=str(teacher), epochs=4, batch_size=4,
                        max_seq_length=64, checkpoint_steps=1000)
    data = pipeline.DataConfig(path=str(tiny_beir), cache_dir=str(tmp_path / "cache"))
    dataset = pipeline.load_data(data)
    rows = pipeline.build_rows(train, data, dataset, tmp_path / "rows")
    assert rows.rows.column_names == ["query", "positive", "negative_1", "label"]
    result = pipeline.train(train, dataset, rows, tmp_path / "run")
    assert result.metadata.config["loss"] == "auto" and result.metadata.config["teacher"] == str(teacher)
    losses = [entry["loss"] for entry in result.history if "loss" in entry]
    assert losses and losses[-1] < losses[0]


def test_hybrid_teacher_margins_are_the_fused_pipelines_gaps_in_the_miners_units(tiny_beir: Path, tmp_path: Path,
                                                                                  base_path: str) -> None:
    """--teacher hybrid: no model, no label; each row's margins are BM25 + base fusion gaps, rescaled."""
    from datasets import load_from_disk

    from retrieval_lora import pipeline
    from retrieval_lora.evaluation.fusion import FusionChoice, fuse_runs
    from retrieval_lora.evaluation.lexical import bm25_runs
    from retrieval_lora.evaluation.runs import retrieve
    from retrieval_lora.models import load_base
    from retrieval_lora.training.teacher import MARGIN_SCALE

    train = TrainConfig(pseudo_queries="crop", pseudo_documents=0, teacher="hybrid", max_seq_length=64)
    assert train.resolved_loss == "margin-mse"
    data = pipeline.DataConfig(path=str(tiny_beir), cache_dir=str(tmp_path / "cache"))
    dataset = pipeline.load_data(data)
    rows = pipeline.build_rows(train, data, dataset, tmp_path / "rows")
    assert rows.rows.column_names == ["query", "positive", "negative_1", "label"]
    scores = load_from_disk(str(rows.path.parent / "scores"))
    info = json.loads((rows.path.parent / "manifest.json").read_text())["hybrid_teacher"]

    pseudo = with_pseudo_split(dataset, pseudo_queries(dataset, train.pseudo_settings(), show_progress=False))
    base = load_base("embedder", base_path, max_seq_length=64)
    fused = fuse_runs([bm25_runs(pseudo, [PSEUDO_SPLIT], k=100)[PSEUDO_SPLIT],
                       retrieve(base, pseudo, PSEUDO_SPLIT, k=100, show_progress=False)],
                      FusionChoice("convex", (0.5, 0.5), None, "test"))
    gaps = np.asarray([fused[r["query_id"]].get(r["positive_id"], 0.0)
                       - fused[r["query_id"]].get(r["negative_ids"][0], 0.0) for r in scores])
    labels = np.asarray(rows.rows["label"])
    np.testing.assert_allclose(labels, info["scale"] * gaps, rtol=1e-3, atol=1e-4)
    own = MARGIN_SCALE * (np.asarray(scores["positive_score"]) - np.asarray([s[0] for s in scores["negative_scores"]]))
    assert labels.mean() == pytest.approx(own.mean(), rel=1e-3)  # the miner's units: same mean margin
    assert not np.allclose(labels, own, atol=1e-2)  # but the hybrid's order of gaps, not the miner's
