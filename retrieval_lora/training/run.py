"""The heavy half of `retrieval_lora.training`: trainer setup, the training loop, saving (see the package docstring)."""

from __future__ import annotations

import dataclasses
import json
import random
import time
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

from retrieval_lora.config import save_config
from retrieval_lora.data import RetrievalDataset, dataset_fingerprint, load_pairs, pairs_fingerprint, pairs_from_qrels
from retrieval_lora.errors import TrainingError
from retrieval_lora.manifest import write_json_atomic
from retrieval_lora.models import (
    AdapterMetadata, RetrievalModel, attach_lora, base_fingerprint, cached_views, cosine_prior, has_trained_head,
    install_length_buckets, load_adapter_weights, load_base, save_adapter, trainable_parameters,
)
from retrieval_lora.training.config import (
    CHECKPOINT_FILES, DEV_METRIC, WARM_START_SCALE, TrainConfig, json_ready, weight_settings,
)
from retrieval_lora.training.distributed import WholeGlobalBatches, per_device_batch, process_device, uses_cuda, world
from retrieval_lora.training.teacher import margin_similarity

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

    def add_model_card_callback(self, default_args_dict: dict[str, Any]) -> None:
        """No model card: an adapter is described by its retrieval_lora.json. The card's widget examples
        would also cost an eval-mode forward pass and a progress bar before the first step."""


class EmbedderTrainer(_AdapterCheckpoints, SentenceTransformerTrainer):
    """SentenceTransformerTrainer that resumes and restores the best checkpoint of an adapter."""


class RerankerTrainer(_AdapterCheckpoints, CrossEncoderTrainer):
    """CrossEncoderTrainer that resumes and restores the best checkpoint of an adapter."""


class _FinalCheckpoint(TrainerCallback):
    """Checkpoint (and evaluate, when a dev split is set) at the last step too, so the final
    weights compete for 'best' and a resumed run always has the end state; a periodic evaluation
    less than half an interval before it is skipped."""

    def __init__(self, evaluate: bool) -> None:
        self.evaluate = evaluate

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True
            control.should_evaluate = self.evaluate
        elif control.should_evaluate and state.max_steps - state.global_step < args.eval_steps / 2:
            # The final evaluation follows within half an interval and judges nearly the same weights
            # (the demo reranker: steps 50 and 53, 2 x 130 s); the checkpoint is still written.
            control.should_evaluate = False
        return control


class ProgressLog(TrainerCallback):
    """Training progress as log lines, for logs that are not a terminal (Prefect's run logs): step of
    steps, latest loss, ETA at most every `every_s` seconds and at the end, and each dev evaluation.

    `logger` is any `logging.Logger`-like object (Prefect's run logger is one).
    """

    def __init__(self, logger: Any, every_s: float = 30.0) -> None:
        self.logger, self.every_s = logger, every_s
        self.started = self.last = 0.0
        self.loss: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = self.last = time.monotonic()
        self.logger.info(f"training: {state.max_steps} steps, batch {args.per_device_train_batch_size}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        self.loss = logs.get("loss", self.loss)
        dev = {key: value for key, value in logs.items() if key.startswith("eval_") and "ndcg@10" in key}
        if dev:
            self.logger.info(f"training step {state.global_step}: dev {', '.join(f'{k[5:]} {v:.4f}' for k, v in dev.items())}")
        now = time.monotonic()
        if now - self.last >= self.every_s or state.global_step >= state.max_steps:
            self.last = now
            elapsed = now - self.started
            eta = elapsed / max(1, state.global_step) * (state.max_steps - state.global_step)
            loss = f"{self.loss:.4f}" if self.loss is not None else "-"
            self.logger.info(f"training step {state.global_step}/{state.max_steps}: loss {loss}, "
                             f"{elapsed:.0f}s elapsed, ETA {eta:.0f}s")


def last_complete_checkpoint(checkpoints: Path, processes: int = 1) -> Path | None:
    """The highest-step `checkpoint-N` folder that holds every file a resume needs, if any; written by
    `processes` processes, that includes each one's RNG state (rng_state_<rank>.pth), which every
    process writes itself, so a checkpoint some rank did not finish is never resumed from."""
    needed = CHECKPOINT_FILES + (tuple(f"rng_state_{rank}.pth" for rank in range(processes)) if processes > 1 else ())
    complete = [path for path in checkpoints.glob("checkpoint-*")
                if path.name.split("-")[-1].isdigit() and all((path / name).is_file() for name in needed)]
    return max(complete, key=lambda path: int(path.name.split("-")[-1]), default=None)


def _check_resumable(config: TrainConfig, run_dir: Path, splits: list[str]) -> Path:
    processes, folder = world().size, run_dir / "checkpoints"
    newest = last_complete_checkpoint(folder)  # every file rank 0 writes
    if newest is None:
        raise TrainingError(f"--resume: no complete checkpoint under {folder}; "
                            "start without --resume (checkpoints are written every --checkpoint-steps steps of the "
                            "labelled stage; a reranker's warm start before it writes none)")
    state = yaml.safe_load((newest / "trainer_state.json").read_text()) or {}
    written_per_process, per_process = state.get("train_batch_size"), per_device_batch(config.resolved_batch_size, processes)
    if written_per_process and written_per_process != per_process:
        raise TrainingError(f"--resume: {newest.name} was written with {written_per_process} rows per process per "
                            f"step, this run has {processes} process(es) of {per_process}; resume with the interrupted "
                            f"run's number of processes ({config.resolved_batch_size // written_per_process})")
    checkpoint = last_complete_checkpoint(folder, processes)
    if checkpoint is None:
        raise TrainingError(f"--resume: no checkpoint under {folder} holds the RNG state of all {processes} processes "
                            "(a rank failed before writing its share); start without --resume")
    saved_path = run_dir / "config.yaml"
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        current = weight_settings(config, splits)  # what a resumed run may not change: all that shapes the weights
        differing = sorted(k for k in current if saved.get(k, current[k]) != current[k])
        if differing:
            raise TrainingError(f"--resume: settings {differing} differ from the interrupted run ({saved_path}); "
                                "resume with the same settings, or start a new run in another --output")
    return checkpoint


def _setup_rows(config: TrainConfig, dataset: RetrievalDataset) -> Dataset:
    """Rows when the caller brings none: `train_pairs` as given, else the train split's labelled pairs
    (in-batch negatives only; `retrieval_lora.pipeline.build_rows` adds mined ones)."""
    return load_pairs(config.train_pairs) if config.train_pairs else pairs_from_qrels(dataset, config.train_split)


def _setup_model(config: TrainConfig) -> RetrievalModel:
    transformers.set_seed(config.seed)  # also seeds a reranker's new scoring head (the same on every rank)
    model = load_base(config.task, config.base, qlora=config.qlora, max_seq_length=config.max_seq_length,
                      device=process_device(config.device))
    if config.attention_dropout >= 0:
        set_attention_dropout(model, config.attention_dropout)
    attach_lora(model, config.task, config.lora)
    if config.task == "reranker":
        install_length_buckets(model)  # the losses' pairs run in passes of similar length (models.buckets)
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
    """The labelled stage's loss. The reranker's pointwise and LambdaLoss read raw logits whatever
    activation the base is configured with (a cross-encoder's Sigmoid saturates them); the listwise
    losses keep sentence-transformers' own scaled Sigmoid, which their softmax is designed around."""
    name = config.resolved_loss
    raw = torch.nn.Identity()
    # With several processes, each one's queries are ranked against the documents of the whole global
    # batch (gathered from every process), as one process with that batch would rank them.
    gather = world().distributed
    if name == "mnrl":
        return embedder_losses.MultipleNegativesRankingLoss(model, gather_across_devices=gather)
    if name == "cached-mnrl":
        return embedder_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch_size,
                                                                  gather_across_devices=gather)
    if name == "margin-mse":
        return embedder_losses.MarginMSELoss(model, similarity_fct=margin_similarity)
    if name == "cached-listwise":
        return reranker_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=config.mini_batch_size)
    if name == "listwise":
        return reranker_losses.MultipleNegativesRankingLoss(model)
    if name == "lambda":
        # mini_batch_size -1: the whole step's pairs in one call, which the length buckets split into passes
        return reranker_losses.LambdaLoss(model, activation_fn=raw, mini_batch_size=-1)
    return reranker_losses.BinaryCrossEntropyLoss(model, activation_fn=raw)


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


def _document_columns(rows: Dataset) -> list[str]:
    return ["positive", *(c for c in rows.column_names if c.startswith("negative"))]


def _warm_start_rows(rows: Dataset) -> Dataset:
    """The warm start's (query, positive, negative_1..N) texts: `rows` as they are, or, when they carry
    no negative, each row's negative is the next row's positive (MarginMSE needs one to compare with)."""
    if len(_document_columns(rows)) > 1:
        return rows.select_columns(["query", *_document_columns(rows)])
    positives = rows["positive"]
    return Dataset.from_dict({"query": rows["query"], "positive": positives,
                              "negative_1": positives[1:] + positives[:1]})


def teacher_scores(config: TrainConfig, rows: Dataset) -> list[list[float]]:
    """The frozen first-stage embedder's (`config.miner or config.base`) cosine score of each row's
    documents, per row [positive, negative_1, ...] (the columns `_warm_start_rows` gives); each
    distinct text is encoded once, with a progress bar."""
    teacher = load_base("embedder", config.miner or config.base, max_seq_length=config.max_seq_length,
                        device=process_device(config.device))
    columns = _document_columns(rows)
    texts = sorted(set(rows["query"]) | {text for column in columns for text in rows[column]})
    vectors = teacher.encode(texts, batch_size=64, convert_to_tensor=True, normalize_embeddings=True,
                             show_progress_bar=world().is_main)
    at = {text: i for i, text in enumerate(texts)}
    queries = vectors[[at[text] for text in rows["query"]]]
    scores = torch.stack([(queries * vectors[[at[text] for text in rows[column]]]).sum(dim=1) for column in columns],
                         dim=1)
    return scores.float().cpu().tolist()


def _warm_start(config: TrainConfig, model: RetrievalModel, rows: Dataset, teacher: list[list[float]] | None,
                run_dir: Path) -> dict[str, Any]:
    """Train the new scoring head and LoRA to reproduce the teacher's score margins between each row's
    positive and its negatives (MarginMSELoss on raw logits, targets `WARM_START_SCALE` x cosine), for
    `config.warm_start_epochs` passes, no checkpoints. Returns what the adapter's metadata records."""
    texts = _warm_start_rows(rows)
    if teacher is None or len(teacher) != len(texts) or len(teacher[0]) != len(_document_columns(texts)):
        teacher = teacher_scores(config, texts)
    data = texts.add_column("label", [[WARM_START_SCALE * score for score in row] for row in teacher])
    data = data.shuffle(seed=config.seed)
    args = CrossEncoderTrainingArguments(**_common_args(config, run_dir / "warm_start", config.warm_start_epochs),
                                         save_strategy="no")
    trainer = RerankerTrainer(model=model, args=args, train_dataset=data, loss=warm_start_loss(model))
    trainer.train()
    trend = loss_trend(trainer.state.log_history)
    return {"teacher": config.miner or config.base, "steps": trainer.state.global_step, "rows": len(data),
            "epochs": config.warm_start_epochs, "scale": WARM_START_SCALE,
            "loss": dataclasses.asdict(trend) | {"fell": trend.fell} if trend else None}


def warm_start_loss(model: RetrievalModel) -> torch.nn.Module:
    """MarginMSELoss on raw logits: (logit of the positive - logit of each negative) regressed onto the
    teacher's margins; the base's configured activation (a Sigmoid) never enters the loss."""
    return reranker_losses.MarginMSELoss(model, activation_fn=torch.nn.Identity())


def _stage_steps(config: TrainConfig, rows: int, base_has_head: bool, prior: bool = False) -> int:
    """Optimizer steps of the labelled stage: `epochs` passes over `rows`, at least the step budget
    `resolved_min_steps` (-1: as many as the epochs give, the Trainer's own count)."""
    per_epoch = max(1, -(-rows // config.resolved_batch_size))
    wanted = config.resolved_min_steps(base_has_head, prior)
    return wanted if wanted > per_epoch * config.epochs else -1


def _setup_dev_evaluator(config: TrainConfig, dataset: RetrievalDataset):
    """nDCG@10 on the dev split; None to skip. An embedder searches the dev positives plus a seeded
    corpus sample; a reranker reranks its positives among 20 sampled documents (the pipeline passes
    `train_adapter` a better one, over the first stage's candidates, when mining saved them)."""
    split = config.resolved_dev_split(dataset.splits)
    if split is None:
        return None
    qrels = dataset.split_qrels(split)  # a named split that does not exist fails here, naming the ones that do
    queries = dataset.split_queries(split)
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
    return _CachedViewsReranking(samples, at_k=10, name="dev", write_csv=False)


class _CachedViewsReranking(CrossEncoderRerankingEvaluator):
    """The reranking evaluator, scoring under `cached_views`: a cosine-prior reranker encodes each dev
    query and document view once per evaluation (the same queries against 20+ documents each)."""

    def __call__(self, model, *args, **kwargs):
        with cached_views(model):
            return super().__call__(model, *args, **kwargs)


def resolved_precision(config: TrainConfig) -> str:
    """'bf16', 'fp16' or 'fp32': what `config.precision` means on this machine ('auto': bf16 on a GPU that
    has it, fp16 on an older GPU, fp32 on the CPU, where half precision is slower than fp32).

    Raises:
        TrainingError: fp16 asked for without a CUDA device (PyTorch's CPU autocast has no fp16 training).
    """
    cuda = uses_cuda(config.device)
    if config.precision == "auto":
        return ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if config.precision == "fp16" and not cuda:
        raise TrainingError("precision='fp16' needs a CUDA GPU; on the CPU use 'bf16' or 'fp32' (the default there)")
    return config.precision


def _common_args(config: TrainConfig, output_dir: Path, epochs: float) -> dict[str, Any]:
    """Training arguments both stages share (the warm start and the labelled stage)."""
    processes = world().size
    # `batch_size` is the global batch (all processes together), so a run means the same on any number of them.
    per_process = per_device_batch(config.resolved_batch_size, processes)
    return dict(
        output_dir=str(output_dir), num_train_epochs=epochs,
        per_device_train_batch_size=per_process, per_device_eval_batch_size=per_process,
        learning_rate=config.lr,
        warmup_steps=config.warmup_ratio,  # transformers 5 reads a float below 1 as a share of all steps
        lr_scheduler_type=config.schedule, seed=config.seed, data_seed=config.seed, logging_steps=5, report_to="none",
        use_cpu=not uses_cuda(config.device),
        bf16=resolved_precision(config) == "bf16", fp16=resolved_precision(config) == "fp16",
        batch_sampler=WholeGlobalBatches if processes > 1 else BatchSamplers.NO_DUPLICATES,
        activation_checkpointing=config.gradient_checkpointing,
        # A reranker uses every trainable weight (LoRA on each layer, the pooler, the head) in every
        # step; DDP's search for unused ones breaks when a loss runs several forward passes per step.
        ddp_find_unused_parameters=False if config.task == "reranker" else None,
    )


def _setup_trainer(config: TrainConfig, model: RetrievalModel, rows: Dataset, evaluator, workdir: Path,
                   base_has_head: bool, prior: bool = False):
    common = _common_args(config, workdir / "checkpoints", config.epochs)
    common.update(save_strategy="steps", save_steps=config.checkpoint_steps,
                  max_steps=_stage_steps(config, len(rows), base_has_head, prior))
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
                  callbacks: list[TrainerCallback] | None = None,
                  teacher: list[list[float]] | None = None, dev_evaluator=None) -> TrainResult:
    """Train an adapter per `config` on `dataset`; save it to `run_dir / "adapter"`.

    `rows` (columns query, positive[, negative_1..N]): the training rows, usually with mined hard
    negatives from `retrieval_lora.pipeline.build_rows`; None takes `train_pairs` or the train split's
    labelled pairs as they are. `callbacks` are extra transformers TrainerCallbacks of the labelled
    stage (progress hooks, fault injection in tests). `teacher`: for a reranker's warm start, the
    first stage's cosine scores of `rows` (per row [positive, negative_1..N], as mining recorded them);
    None encodes them (`teacher_scores`). A resumed run skips the warm start: its checkpoint holds the
    weights the warm start and the steps before it left. `dev_evaluator`: a sentence-transformers
    evaluator named "dev" with an nDCG@10 primary metric to use instead of the default one (the
    pipeline's for a reranker: `retrieval_lora.evaluation.FirstStageDevReranking`).

    Returns the trained model (best checkpoint's adapter, in eval mode) and the saved folder.

    Raises:
        TrainingError: `resume` without a usable checkpoint, or with changed settings.
    """
    run_dir, here = Path(run_dir), world()
    resume_from = _check_resumable(config, run_dir, dataset.splits) if config.resume else None
    if here.is_main:  # the Trainer writes checkpoints from rank 0 too (each rank adds its RNG state)
        save_config(config, run_dir / "config.yaml")
    rows = _setup_rows(config, dataset) if rows is None else rows
    model = _setup_model(config)
    # A reranker starts scoring sensibly from a trained head (a cross-encoder base) or from the cosine prior (a
    # bi-encoder base, models.prior); only a new head without the prior needs the step budget or a warm start.
    headed = config.task == "reranker" and has_trained_head(config.base)
    prior = config.task == "reranker" and cosine_prior(model) is not None
    warm, warm_file = None, run_dir / "warm_start.json"
    if config.warm_starts(headed or prior):
        if resume_from is None:
            warm = _warm_start(config, model, rows, teacher, run_dir)
            if here.is_main:
                write_json_atomic(warm_file, warm)
        elif warm_file.is_file():
            warm = json.loads(warm_file.read_text(encoding="utf-8"))
    rows = rows.shuffle(seed=config.seed)
    evaluator = dev_evaluator if dev_evaluator is not None else _setup_dev_evaluator(config, dataset)
    trainer = _setup_trainer(config, model, rows, evaluator, run_dir, headed, prior)
    for callback in callbacks or []:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    model.eval()
    history = [entry for entry in trainer.state.log_history
               if "loss" in entry or any(key.startswith("eval_") for key in entry)]
    trend = loss_trend(history)
    if trend is not None and not trend.fell and here.is_main:
        warnings.warn(trend.warning(config.task), stacklevel=2)
    trainable, total = trainable_parameters(model)
    metadata = AdapterMetadata(
        task=config.task, base_model=config.base, base_fingerprint=base_fingerprint(model),
        dataset_fingerprint=pairs_fingerprint(rows) if config.train_pairs else dataset_fingerprint(dataset),
        qlora=config.qlora, config=json_ready(config),
        metrics={"trainable_parameters": trainable, "total_parameters": total,
                 "best_dev_metric": trainer.state.best_metric, "steps": trainer.state.global_step,
                 "warm_start": warm,
                 "training_loss": dataclasses.asdict(trend) | {"fell": trend.fell} if trend else None},
    )
    # Every rank holds the same weights after the last all-reduce; one writes them.
    adapter_dir = save_adapter(model, run_dir / "adapter", metadata) if here.is_main else run_dir / "adapter"
    return TrainResult(model, adapter_dir, metadata, len(rows), trainable, total, history,
                       trainer.state.best_model_checkpoint, str(resume_from) if resume_from else None, trend)
