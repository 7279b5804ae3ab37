"""Data layer: loading, validation errors with file:line, fingerprints, pairs, demo dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import Dataset

from conftest import write_beir
from retrieval_lora.data import (DataWarning, DroppedJudgements, corpus_fingerprint, dataset_fingerprint, load_beir,
                                 load_dataset, load_pairs, pairs_fingerprint, pairs_from_qrels)
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
    ("queries.jsonl", 2, '{"_id": "q2", "text": "   "}', "queries.jsonl:2: query 'q2' has an empty text"),
    ("queries.jsonl", 6, '[1, 2]', "queries.jsonl:6: each line must be a JSON object"),
    ("queries.jsonl", 3, '{"_id": "q3", "text": ""}', "queries.jsonl:3: query 'q3' has an empty text"),
    ("qrels/train.tsv", 5, "q4\td4", "train.tsv:5: expected 3 tab-separated columns"),
    ("qrels/train.tsv", 5, "q4 d4 1", "train.tsv:5: expected 3 tab-separated columns (query-id, corpus-id, score), "
                                     "got 1; separate the columns with tabs, not spaces"),
    ("qrels/train.tsv", 5, "q4\td4\thigh", "train.tsv:5: score 'high' is not a number"),
    ("qrels/train.tsv", 5, "q4\td4\t0.5", "train.tsv:5: score '0.5' is not a whole number"),
    ("qrels/train.tsv", 5, "q4\td4\tnan", "train.tsv:5: score 'nan' is not a whole number"),
    ("qrels/train.tsv", 5, "q4\td4\tinf", "train.tsv:5: score 'inf' is not a whole number"),
    ("qrels/train.tsv", 1, "query\tdocument\trelevance",
     "train.tsv:1: score 'relevance' is not a number; if line 1 is a header, write it as 'query-id<TAB>corpus-id<TAB>score'"),
])
def test_each_bad_input_names_file_and_line(tiny_beir: Path, file: str, line: int, replacement: str,
                                            message: str) -> None:
    _corrupt_line(tiny_beir / file, line, replacement)
    with pytest.raises(DataError) as error:
        load_beir(tiny_beir)
    assert message in str(error.value)
    assert "fix them and load again" in str(error.value)


def _append(path: Path, *lines: str) -> None:
    with path.open("a") as handle:
        handle.write("".join(line + "\n" for line in lines))


def _dataset_warnings(record: pytest.WarningsRecorder) -> list[str]:
    return [str(warning.message) for warning in record if issubclass(warning.category, DataWarning)]


def test_unknown_documents_are_dropped_with_one_counting_warning(tiny_beir: Path) -> None:
    # test.tsv: header, q11, q12 on lines 1-3; four rows naming absent documents follow
    _append(tiny_beir / "qrels" / "test.tsv", "q11\tghost1\t1", "q12\tghost2\t2", "q11\tghost3\t0", "q12\tghost4\t1")
    with pytest.warns(DataWarning) as record:
        dataset = load_beir(tiny_beir)
    messages = _dataset_warnings(record)
    assert len(messages) == 1, messages  # one per file, not one per row; the clean splits say nothing
    message = messages[0]
    assert message.startswith(f"{tiny_beir / 'qrels' / 'test.tsv'}: dropped 4 of 6 judgement(s) (3 relevant): "
                              "4 naming documents not in corpus.jsonl (first: ")
    assert "test.tsv:4: corpus id 'ghost1' is not in corpus.jsonl" in message
    assert "test.tsv:6: corpus id 'ghost3'" in message and "ghost4" not in message and ", ...)" in message
    assert message.endswith("pass strict=True to make this an error")
    assert dataset.split_qrels("test") == {"q11": {"d11": 1}, "q12": {"d12": 1}}
    assert dataset.split_dropped("test") == DroppedJudgements(missing_document=4, missing_document_relevant=3)
    assert dataset.split_dropped("test").relevant == 3 and dataset.split_dropped("test").rows == 4
    assert dataset.dropped_judgements == {"dev": DroppedJudgements(), "train": DroppedJudgements(),
                                          "test": DroppedJudgements(4, 3, 0, 0)}


def test_strict_mode_makes_unknown_ids_errors_with_file_and_line(tiny_beir: Path) -> None:
    _append(tiny_beir / "qrels" / "train.tsv", "q3\tghost\t1", "nope\td2\t1")
    for load in (lambda: load_beir(tiny_beir, strict=True), lambda: load_dataset(str(tiny_beir), strict=True)):
        with pytest.raises(DataError) as error:
            load()
        assert "2 problem(s) found; fix them and load again" in str(error.value)
        assert "train.tsv:10: corpus id 'ghost' is not in corpus.jsonl" in str(error.value)
        assert "train.tsv:11: query id 'nope' is not in queries.jsonl" in str(error.value)


def test_unknown_queries_are_dropped_and_counted_apart_from_documents(tiny_beir: Path) -> None:
    # a row naming both an unknown query and an unknown document counts as a query row: it is never evaluated
    _append(tiny_beir / "qrels" / "dev.tsv", "nobody\td1\t1", "nobody\tghost\t0", "q9\tghost\t1")
    with pytest.warns(DataWarning) as record:
        dataset = load_dataset(str(tiny_beir))
    [message] = _dataset_warnings(record)
    assert ("dropped 3 of 5 judgement(s) (2 relevant): 1 naming documents not in corpus.jsonl, "
            "2 naming queries not in queries.jsonl") in message
    assert "dev.tsv:4: query id 'nobody' is not in queries.jsonl" in message
    assert "dev.tsv:6: corpus id 'ghost' is not in corpus.jsonl" in message
    assert dataset.split_dropped("dev") == DroppedJudgements(missing_document=1, missing_document_relevant=1,
                                                             missing_query=2, missing_query_relevant=1)
    assert "nobody" not in dataset.split_qrels("dev") and dataset.split_qrels("dev")["q9"] == {"d9": 1}
    assert list(dataset.split_queries("dev")) == ["q10", "q9"]


def test_a_split_whose_every_judgement_is_unknown_is_an_error(tiny_beir: Path) -> None:
    (tiny_beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\tghost\t1\nnope\td1\t1\n")
    with pytest.raises(DataError, match=r"test.tsv: all 2 judgement\(s\) name a query or document that is not loaded"):
        load_beir(tiny_beir)


def test_fingerprint_covers_what_was_loaded_and_is_deterministic(tiny_beir: Path, tmp_path: Path) -> None:
    clean = dataset_fingerprint(load_beir(tiny_beir))
    _append(tiny_beir / "qrels" / "test.tsv", "q11\tghost\t1")
    with pytest.warns(DataWarning):
        first = dataset_fingerprint(load_beir(tiny_beir))
    with pytest.warns(DataWarning):
        assert dataset_fingerprint(load_beir(tiny_beir)) == first == clean


def test_qrels_without_a_header_are_read_from_line_one(tiny_beir: Path) -> None:
    path = tiny_beir / "qrels" / "test.tsv"
    path.write_text("q11\td11\t1\nq12\td12\t2\n")
    assert load_beir(tiny_beir).split_qrels("test") == {"q11": {"d11": 1}, "q12": {"d12": 2}}
    path.write_text("query-id\tcorpus-id\tscore\nq11\td11\t1.0\n")  # "1.0" is a whole number: grade 1
    assert load_beir(tiny_beir).split_qrels("test") == {"q11": {"d11": 1}}


def _rewrite_line_endings(root: Path, ending: str, bom: bool = False) -> None:
    for path in [root / "corpus.jsonl", root / "queries.jsonl", *sorted((root / "qrels").glob("*.tsv"))]:
        text = path.read_text().replace("\n", ending)
        path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))


@pytest.mark.parametrize(("ending", "bom"), [("\r\n", False), ("\r\n", True), ("\n", True)])
def test_crlf_and_byte_order_mark_load_exactly_as_lf(tiny_beir: Path, tmp_path: Path, ending: str, bom: bool) -> None:
    _append(tiny_beir / "qrels" / "test.tsv", "q11\tghost\t1")  # the dropped record must match too
    with pytest.warns(DataWarning):
        lf = load_beir(tiny_beir)
    _rewrite_line_endings(tiny_beir, ending, bom)
    assert (b"\r\n" in (tiny_beir / "qrels" / "test.tsv").read_bytes()) == (ending == "\r\n")
    with pytest.warns(DataWarning) as record:
        other = load_beir(tiny_beir)
    assert "test.tsv:4: corpus id 'ghost'" in _dataset_warnings(record)[0]  # same line numbers
    assert (other.corpus, other.queries, other.qrels, other.dropped_judgements) == \
        (lf.corpus, lf.queries, lf.qrels, lf.dropped_judgements)
    texts = [*other.corpus, *other.queries, *other.queries.values(), *(d.text for d in other.corpus.values())]
    assert not any(text.endswith(("\r", "\ufeff")) or text.startswith("\ufeff") for text in texts)
    assert dataset_fingerprint(other) == dataset_fingerprint(lf)


def test_documents_with_empty_text_load_with_one_warning(tmp_path: Path) -> None:
    corpus = {"d1": ("", "A cello has four strings."), "blank": ("", ""), "spaces": ("  ", " "), "titled": ("Cello", "")}
    root = write_beir(tmp_path / "empty-docs", corpus, {"q1": "cello strings"},
                      {"test": [("q1", "d1", 1), ("q1", "blank", 1)]})
    with pytest.warns(DataWarning) as record:
        dataset = load_beir(root)
    [message] = _dataset_warnings(record)
    assert message == (f"{root / 'corpus.jsonl'}: 2 document(s) have an empty title and text "
                       f"(first: {root / 'corpus.jsonl'}:2 'blank', {root / 'corpus.jsonl'}:3 'spaces'); "
                       "they are kept and encoded as empty text; add their text or remove them (and their qrels)")
    assert [dataset.corpus[d].full_text for d in corpus] == ["A cello has four strings.", "", "", "Cello"]
    assert dataset.split_qrels("test") == {"q1": {"d1": 1, "blank": 1}}
    assert pairs_from_qrels(dataset, "test")["positive"] == ["", "A cello has four strings."]
    assert corpus_fingerprint(dataset) != corpus_fingerprint(load_beir(write_beir(
        tmp_path / "fewer", {"d1": corpus["d1"], "titled": corpus["titled"]}, {"q1": "cello strings"},
        {"test": [("q1", "d1", 1)]})))


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
