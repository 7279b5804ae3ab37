"""Recipes several benchmarks train or mine with, each written once.

Peers, sentence-transformers as its documentation shows it: train_peer ("peer-full": full fine-tuning,
MNRL, lr 2e-5; "peer-lora": r=16, alpha=32, dropout 0.1, all linear layers, lr 2e-4, attached with
peft.get_peft_model, which is what its `add_adapter` does: that refuses peft 0.21 under transformers
5.24) and peer_inputs + mine_peer + add_window_flags (`util.mine_hard_negatives(use_faiss=True)`, `top` sampling, n-tuple
output, with our window, margin (relative_margin = 1 - margin) and count).
Ours: train_ours, `train_adapter` with the benchmarks' settings. The training benchmark's scratch
folder, whose rows several benchmarks read: training_work, mine_rows, reranker_rows, negatives_per_row.
"""

from __future__ import annotations

from pathlib import Path


def training_work(work: str, dataset: str, *needed: str) -> Path:
    """<work>/<dataset>, where evals/bench_training.py keeps its rows, first stage and variants. Exits with
    status 1, naming the run that makes them, if it lacks any of `needed` (paths in it)."""
    folder = Path(work) / dataset
    missing = [name for name in needed if not (folder / name).exists()]
    if missing:
        print(f"{folder}: no {' or '.join(missing)}; run `python evals/bench_training.py --dataset {dataset}` first")
        raise SystemExit(1)
    return folder

PEER_LR = {"peer-full": 2e-5, "peer-lora": 2e-4}


def train_peer(variant: str, rows, out: Path, *, base: str, seed: int, epochs: float, batch_size: int,
               callbacks=(), device: str = "cpu", precision: str = "fp32") -> tuple[object, dict]:
    """Train `variant` ("peer-full" or "peer-lora") on `rows` into <out>/model on `device`, in `precision`
    ("fp32", "bf16" or "fp16"); (model, sizes)."""
    import transformers
    from peft import LoraConfig, TaskType, get_peft_model
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    from retrieval_lora.models import resolve_base

    transformers.set_seed(seed)
    model = SentenceTransformer(resolve_base(base), device=device)
    if variant == "peer-lora":
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear",
                          task_type=TaskType.FEATURE_EXTRACTION)
        model[0].model = get_peft_model(model[0].model, lora)
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "checkpoints"), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        learning_rate=PEER_LR[variant], warmup_steps=0.1, seed=seed, batch_sampler=BatchSamplers.NO_DUPLICATES,
        save_strategy="no", report_to="none", use_cpu=not device.startswith("cuda"), logging_steps=10,
        bf16=precision == "bf16", fp16=precision == "fp16")
    SentenceTransformerTrainer(model=model, args=training_args, train_dataset=rows,
                               loss=MultipleNegativesRankingLoss(model), callbacks=list(callbacks)).train()
    model.save(str(out / "model"))
    size = sum(p.stat().st_size for p in (out / "model").rglob("*") if p.is_file())
    return model, {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                   "total": sum(p.numel() for p in model.parameters()), "artifact_bytes": size}


def train_ours(rows, dataset, out: Path, *, callbacks=(), **settings):
    """Our adapter trained on `rows` (None: the split's labelled pairs) into `out`; `settings`: TrainConfig
    fields over the benchmarks' own defaults (no dev split, no intermediate checkpoint). (TrainResult, TrainConfig)."""
    from retrieval_lora.training import TrainConfig, train_adapter

    config = TrainConfig(**({"dev_split": "", "checkpoint_steps": 10_000} | settings))
    return train_adapter(config, dataset, out, rows=rows, callbacks=list(callbacks)), config


def add_window_flags(parser, negatives: int) -> None:
    """--negatives (default `negatives`), --rank-start, --rank-end, --margin: the mining settings ours and the
    peer share in a comparison."""
    parser.add_argument("--negatives", type=int, default=negatives, help="mined negatives per row")
    parser.add_argument("--rank-start", type=int, default=10, help="first rank of the candidate window")
    parser.add_argument("--rank-end", type=int, default=100, help="end of the candidate window (exclusive)")
    parser.add_argument("--margin", type=float, default=0.95, help="drop candidates above margin x the positive's score")


def peer_inputs(dataset, split: str = "train"):
    """(pairs, corpus) as the peer takes them: the split's (query, positive) rows (a Dataset) and the corpus texts."""
    from retrieval_lora.data import pairs_from_qrels

    return pairs_from_qrels(dataset, split), [dataset.corpus[d].full_text for d in sorted(dataset.corpus)]


def mine_peer(pairs, corpus: list[str], model, *, rank_start: int, rank_end: int, margin: float, negatives: int,
              batch_size: int, **options):
    """The peer's rows for `pairs` against `corpus` (peer_inputs); `options`: more of its keyword
    arguments (verbose, output_scores, cache_folder)."""
    from sentence_transformers.util import mine_hard_negatives

    return mine_hard_negatives(pairs, model, anchor_column_name="query", positive_column_name="positive",
                               corpus=corpus, range_min=rank_start, range_max=rank_end,
                               relative_margin=round(1 - margin, 6), num_negatives=negatives,
                               sampling_strategy="top", output_format="n-tuple", batch_size=batch_size,
                               use_faiss=True, **options)


def mine_rows(base, dataset, negatives: int, seed: int, cap: int):
    """Mine the training split with `negatives` per row; the seeded shuffle and cap every variant shares."""
    from retrieval_lora.mining import MiningConfig, mine_hard_negatives

    result = mine_hard_negatives(base, dataset, "train", MiningConfig(negatives=negatives, seed=seed))
    rows = result.training_rows().shuffle(seed=seed)
    if cap and len(rows) > cap:
        rows = rows.select(range(cap))
    return result, rows


def negatives_per_row(rows) -> int:
    return sum(name.startswith("negative_") for name in rows.column_names)


def reranker_rows(work: Path, dataset, negatives: int, seed: int, cap: int, base: str):
    """The shared rows (1 negative), or the same split mined with `negatives` per row (kept as rows-neg<N>[-cap<C>])."""
    from datasets import load_from_disk

    if negatives <= 1:
        return load_from_disk(str(work / "rows"))
    path = work / (f"rows-neg{negatives}" + (f"-cap{cap}" if cap else ""))
    if not path.is_dir():
        from retrieval_lora.models import load_base

        _, rows = mine_rows(load_base("embedder", base), dataset, negatives, seed, cap)
        rows.save_to_disk(str(path))
    return load_from_disk(str(path))
