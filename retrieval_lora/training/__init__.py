"""Training a LoRA or QLoRA adapter for an embedder or a reranker.

Reads top to bottom as setup -> [warm start] -> train -> save:

    setup:  seed -> rows -> base model (+ 4-bit for QLoRA) -> LoRA
    warm start (optional, a reranker): teacher scores -> MarginMSE trainer (no labels, no
            checkpoints)
    train:  rows shuffled -> loss -> dev evaluator -> sentence-transformers' trainer (progress
            bar, warmup + schedule, checkpoints, dev evaluation, best checkpoint)
    save:   adapter folder (PEFT files + retrieval_lora.json), written atomically

Features
- Training rows: given by the caller, usually `retrieval_lora.pipeline.build_rows`: the train
  split's (query, positive) pairs with `negatives` hard negatives each (default 1 for an
  embedder, 4 for a reranker), mined from the frozen base embedder's own ranking (FAISS, ranks
  10-100, margin guard against unlabelled positives; see retrieval_lora.mining), or
  `--train-pairs` as given.
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
  scoring head is trained in full and saved inside the adapter. `lambda` and `bce` read raw
  logits whatever activation the base is configured with (a cross-encoder saved with Sigmoid
  would saturate them); the listwise losses keep sentence-transformers' scaled Sigmoid.
- Reranker start on a base without a trained one-logit head (a bi-encoder such as the packaged
  all-MiniLM-L6-v2; `models.has_trained_head`), whose scoring head is new: a step budget
  (`min_steps`, default 200 for such a base): the labelled stage takes at least that many
  optimizer steps, more passes over a small dataset's rows (the demo's 417 rows: 53 steps an
  epoch, which learned nothing). Optional warm start before it (`warm_start`: "off" by default,
  "auto" = on for such a base, "on"): the head and LoRA first learn to reproduce the frozen
  first-stage embedder's own scores of each row's documents, MarginMSE on raw logits, targets
  10 x the cosine margins between the positive and each negative (the miner's scores recorded
  by mining, else encoded), `warm_start_epochs` passes, no labels. A cross-encoder base keeps
  its own head (never re-initialized) and its `epochs`. Measured in
  evals/results/reranker_default.md. The embedder's budget is 0 (`epochs` as given).
- LoRA on all linear layers of the encoder by default; QLoRA (`qlora=True`) on a frozen
  4-bit NF4 base with double quantization. Gradient checkpointing: on by default with QLoRA
  (without it the 4-bit base peaks above LoRA on the CPU), optional otherwise.
- Dev evaluation every `checkpoint_steps` and at the end, nDCG@10 on `dev_split`: an embedder
  searches the dev positives plus a seeded sample of the corpus; a reranker reranks the first
  stage's top `DEV_RERANK_DEPTH` documents of each dev query (`dev_first_stage`, from
  `retrieval_lora.pipeline.build_rows`), scored with ranx against the split's qrels as the
  evaluation scores (a positive the first stage missed counts as missed); without it, its
  positives among 20 sampled documents.
  A periodic evaluation less than half an interval before the last step is skipped: the final
  one follows at once. The best checkpoint's adapter is the one saved.
- Checkpoints every `checkpoint_steps` under `<run>/checkpoints/`. `resume=True` continues from
  the last complete checkpoint (adapter weights, optimizer, scheduler, RNG states, data
  position) after a crash or kill -9; the result equals an uninterrupted run. Checkpoints are
  of the labelled stage: a resumed run skips the warm start (the checkpoint holds its effect);
  a run killed during the warm start has no checkpoint and starts again.
- The adapter folder `<run>/adapter` appears only after training finished (atomic rename), so
  an interrupted run never leaves an adapter that looks finished.
- A run whose training loss did not fall (`LossTrend`: first vs last logged values) warns that
  the adapter has most likely learned nothing, and records the trend in the adapter metadata.
- Deterministic for a fixed seed on the CPU.
- Mixed precision (`precision`): bf16 on a GPU that supports it, fp16 on an older one, fp32 on
  the CPU (the default "auto"); the saved adapter is fp32.
- Data-parallel under `torchrun --nproc_per_node N` or `accelerate launch` (DDP through the
  Trainer: NCCL on GPUs, gloo on CPUs; `retrieval_lora.training.distributed`): `batch_size` is the
  global batch, split evenly over the processes; the embedder losses gather every process's
  embeddings, so in-batch negatives span the global batch and the run trains what one process
  with the whole batch trains (tests/test_distributed.py: same weights within 0.2%); rank 0
  writes checkpoints (each rank its RNG state), config and adapter; a run resumes only from a
  checkpoint every rank completed, with the same number of processes. Each epoch keeps the
  steps every process can take with a full batch (a partial last step is left out).

Not supported: adapter types other than LoRA; resuming with settings that differ from the
interrupted run (refused with the differing keys named) or with another number of processes;
sharded (FSDP/DeepSpeed) training: a LoRA adapter and a MiniLM/BERT-sized base fit on every device.
"""

from retrieval_lora.lazy import lazy_exports
from retrieval_lora.training.config import (
    CHECKPOINT_FILES, DEFAULT_BATCH_SIZE, DEFAULT_MIN_STEPS, DEFAULT_NEGATIVES, DEV_METRIC, DEV_RERANK_DEPTH, LOSSES,
    PRECISIONS, RESUME_IGNORED, SCHEDULES, WARM_START_SCALE, WARM_STARTS, TrainConfig,
    json_ready, mining_config, weight_settings,
)

__getattr__ = lazy_exports(__name__, {name: ".run" for name in (
    "ProgressLog",
    "TrainResult",
    "LossTrend",
    "loss_trend",
    "EmbedderTrainer",
    "RerankerTrainer",
    "last_complete_checkpoint",
    "set_attention_dropout",
    "train_adapter",
    "teacher_scores",
    "warm_start_loss",
)})

__all__ = ["CHECKPOINT_FILES", "DEFAULT_BATCH_SIZE", "DEFAULT_MIN_STEPS", "DEFAULT_NEGATIVES", "WARM_START_SCALE", "WARM_STARTS", "DEV_METRIC", "DEV_RERANK_DEPTH", "LOSSES", "PRECISIONS", "RESUME_IGNORED", "SCHEDULES", "TrainConfig", "json_ready", "mining_config", "weight_settings"]  # and the lazily loaded names above
