"""Data layer: loading, validation errors with file:line, fingerprints, pairs, demo dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from conftest import write_beir
from retrieval_lora.data import dataset_fingerprint, load_beir, load_pairs, pairs_fingerprint, pairs_from_qrels
from retrieval_lora.data.demo import load_demo
from retrieval_lora.errors import DataError


def test_loads_a_valid_folder(tiny_beir: Path) -> None:
    dataset = load_beir(tiny_beir)
    assert len(dataset.corpus) == 18 and len(dataset.queries) == 12
    assert dataset.splits == ["dev", "test", "train"]
    assert dataset.split_qrels("test") == {"q11": {"d11": 1}, "q12": {"d12": 1}}
    assert list(dataset.split_queries("dev")) == ["q10", "q9"]


def _corrupt_line(path: Path, lineno: int, replacement: str) -> None:
    lines = path.read_text().splitlines()
    lines[lineno - 1] = replacement
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(("file", "line", "replacement", "message"), [
    ("corpus.jsonl", 3, '{"_id": "d3", "text": "unclosed', "corpus.jsonl:3: not valid JSON"),
    ("corpus.jsonl", 2, '{"_id": "d2", "title": "t"}', "corpus.jsonl:2: missing field 'text'"),
    ("corpus.jsonl", 4, '{"_id": "d1", "text": "again"}', "corpus.jsonl:4: duplicate document id 'd1' (first on line 1)"),
    ("corpus.jsonl", 5, '{"_id": "d5", "title": " ", "text": ""}', "corpus.jsonl:5: document 'd5' has an empty title and text"),
    ("queries.jsonl", 2, '{"_id": "q2", "text": "   "}', "queries.jsonl:2: query 'q2' has an empty text"),
    ("queries.jsonl", 6, '[1, 2]', "queries.jsonl:6: each line must be a JSON object"),
    ("qrels/train.tsv", 3, "nope\td2\t1", "train.tsv:3: query id 'nope' is not in queries.jsonl"),
    ("qrels/train.tsv", 4, "q3\tghost\t1", "train.tsv:4: corpus id 'ghost' is not in corpus.jsonl"),
    ("qrels/train.tsv", 5, "q4\td4", "train.tsv:5: expected 3 tab-separated columns"),
    ("qrels/train.tsv", 5, "q4\td4\thigh", "train.tsv:5: score 'high' is not a number"),
])
def test_each_bad_input_names_file_and_line(tiny_beir: Path, file: str, line: int, replacement: str,
                                            message: str) -> None:
    _corrupt_line(tiny_beir / file, line, replacement)
    with pytest.raises(DataError) as error:
        load_beir(tiny_beir)
    assert message in str(error.value)
    assert "fix them and load again" in str(error.value)


def test_all_problems_are_reported_at_once(tiny_beir: Path) -> None:
    _corrupt_line(tiny_beir / "corpus.jsonl", 2, "{bad")
    _corrupt_line(tiny_beir / "corpus.jsonl", 5, "{worse")
    with pytest.raises(DataError, match="2 problem") as error:
        load_beir(tiny_beir)
    assert "corpus.jsonl:2" in str(error.value) and "corpus.jsonl:5" in str(error.value)


def test_missing_files_and_split(tiny_beir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_beir(tmp_path / "nowhere")
    dataset = load_beir(tiny_beir)
    with pytest.raises(DataError, match=r"split 'validation' not found .*available splits: dev, test, train"):
        dataset.split_qrels("validation")
    (tiny_beir / "queries.jsonl").unlink()
    with pytest.raises(DataError, match="queries.jsonl not found"):
        load_beir(tiny_beir)


def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    root = write_beir(tmp_path / "empty", {}, {"q": "text"}, {"test": []})
    with pytest.raises(DataError, match="the corpus is empty"):
        load_beir(root)


def test_fingerprint_ignores_line_order_but_not_content(tiny_beir: Path) -> None:
    original = dataset_fingerprint(load_beir(tiny_beir))
    corpus = tiny_beir / "corpus.jsonl"
    corpus.write_text("".join(reversed(corpus.read_text().splitlines(keepends=True))))
    assert dataset_fingerprint(load_beir(tiny_beir)) == original
    _corrupt_line(corpus, 1, json.dumps({"_id": "x5", "title": "", "text": "A cello has four strings."}))
    assert dataset_fingerprint(load_beir(tiny_beir)) != original


def test_pairs_from_qrels_and_jsonl(tiny_beir: Path, tmp_path: Path) -> None:
    pairs = pairs_from_qrels(load_beir(tiny_beir), "train")
    assert pairs.column_names == ["query", "positive"] and len(pairs) == 8
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"anchor": "a", "positive": "b", "negatives": ["c", "d"]}\n{"query": "e", "pos": "f", "negative_1": "g", "negative_2": "h"}\n')
    rows = load_pairs(path)
    assert rows[1] == {"query": "e", "positive": "f", "negative_1": "g", "negative_2": "h"}
    assert pairs_fingerprint(rows) != pairs_fingerprint(pairs)


@pytest.mark.parametrize(("content", "message"), [
    ('{"query": "a"}\n', "pairs.jsonl:1: missing field 'positive'"),
    ('{"query": "a", "positive": "b"}\n{"query": "", "positive": "b"}\n', "pairs.jsonl:2: field 'query' must be a non-empty string"),
    ('{"query": "a", "positive": "b"}\n{"query": "c", "positive": "d", "negative": "e"}\n', "pairs.jsonl:2: has columns"),
    ('not json\n', "pairs.jsonl:1: not valid JSON"),
])
def test_bad_pairs_jsonl(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_pairs(path)


def test_pairs_saved_dataset(tmp_path: Path) -> None:
    Dataset.from_dict({"query": ["a", "b"], "positive": ["c", "d"]}).save_to_disk(str(tmp_path / "ok"))
    assert len(load_pairs(tmp_path / "ok")) == 2
    Dataset.from_dict({"query": ["a"], "answer": ["c"]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"missing column\(s\) \['positive'\]"):
        load_pairs(tmp_path / "bad")
    with pytest.raises(DataError, match="not found"):
        load_pairs(tmp_path / "missing.jsonl")


def test_demo_dataset_is_large_split_by_package_and_deterministic(tmp_path: Path) -> None:
    dataset = load_demo(tmp_path)
    assert len(dataset.corpus) >= 2000
    assert sum(len(dataset.split_qrels(s)) for s in ("train", "dev", "test")) >= 500
    packages = {split: {qid.removeprefix("q:").split(".")[0] for qid in dataset.split_qrels(split)}
                for split in ("train", "dev", "test")}
    assert not packages["train"] & packages["test"] and not packages["train"] & packages["dev"]
    assert not packages["dev"] & packages["test"]
    for split in ("train", "test"):  # every query's text is the docstring, never found verbatim in its document
        for query_id, docs in dataset.split_qrels(split).items():
            assert dataset.queries[query_id] not in dataset.corpus[next(iter(docs))].text
    rebuilt = load_demo(tmp_path / "again")
    assert dataset_fingerprint(rebuilt) == dataset_fingerprint(dataset)
