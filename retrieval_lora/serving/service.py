"""The serving engine shared by the HTTP server and the in-process Python API.

`RetrievalService` resolves a model name to a base slot and an adapter version, leases the
version for the duration of the request, and sends the rows through the slot's `Batcher`, so
concurrent requests for different adapters of one base share forward passes. It does not know
about HTTP, keys or request limits (see app.py); it raises `ServingError`s.

Model names: the base's name (`base_name`, default the base alias or folder name) is the bare
base, usable for embedding, and for reranking only when the base is a cross-encoder with a
trained one-logit head (`models.has_trained_head`): a bi-encoder base loaded as a cross-encoder
has an untrained head (zero, under the cosine prior: it would only repeat the embedder's cosine),
so it is refused (400 `no_reranker_head`) and not listed as a reranker; its reranker adapters
bring their trained head. Every other name is an adapter spec resolved by the
adapter source (`name` = promoted now, `name@N` = pinned). The version is resolved once, when
the request starts; the lease keeps that version loaded until its rows are done, so a request
in flight during a promotion finishes on the version it started with.

Every text is checked to be valid Unicode before it is queued (texts.py). Each request carries
a tenant name (the HTTP server passes the API key's tenant; the Python API ""), which the
batcher uses for its per-tenant queues and limits. `truncate=False` refuses (400) a row longer
than the model reads instead of cutting it. Cancelling a returned future (a request that timed
out) drops its rows from the queue.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, InvalidStateError
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from retrieval_lora.errors import AdapterError, RetrievalLoraError
from retrieval_lora.models import DEFAULT_BASE, AdapterMetadata, has_trained_head, read_adapter_metadata
from retrieval_lora.serving.batcher import Batcher
from retrieval_lora.serving.config import ServiceConfig, service_config
from retrieval_lora.serving.errors import InvalidRequest, ServingError
from retrieval_lora.serving.pool import BASE_ADAPTER, AdapterPool, AdapterRef, BaseSlot
from retrieval_lora.serving.sources import AdapterSource
from retrieval_lora.serving.texts import check_texts

log = logging.getLogger(__name__)
TASK_ENDPOINT = {"embedder": "/v1/embeddings", "reranker": "/v1/rerank"}


@dataclass(frozen=True)
class Target:
    """What one request runs on: `model` is the name responses report (`name@version` or the base)."""

    model: str
    task: str
    slot: BaseSlot
    adapter_name: str  # PEFT name, or BASE_ADAPTER


@dataclass
class Embeddings:
    model: str
    vectors: np.ndarray  # (n, dim) float32, unit norm
    tokens: int


@dataclass
class Ranked:
    index: int
    relevance_score: float
    document: str | None = None


@dataclass
class Ranking:
    model: str
    results: list[Ranked]  # best first
    tokens: int


@dataclass
class ModelInfo:
    id: str
    tasks: list[str]
    version: int | None
    base_model: str


def rank_scores(scores: np.ndarray, top_n: int | None = None) -> list[Ranked]:
    """Indices and scores sorted by score, best first (ties: lower index first), cut to `top_n`."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return [Ranked(i, float(scores[i])) for i in order[:top_n]]


class RetrievalService:
    """Embedding and reranking with any adapter of `source` on shared bases.

    Args:
        source: where adapter specs resolve (`RegistrySource`, `FolderSource`); None serves the base only.
        config: the engine settings (default `ServiceConfig()`, where every default is defined).
        **settings: `ServiceConfig` fields to override, e.g. `batch_size=64, max_seq_length=256`.

    Example:
        service = RetrievalService(RegistrySource(Registry()), batch_size=64)
        service.embed("support-faq", ["how do I reset my password"]).vectors
        service.rerank("support-rerank@2", "reset password", ["doc one", "doc two"]).results
        service.close()

    Raises:
        ConfigError (construction): an unknown setting name or an invalid value.
        From every request method: ModelNotFound, InvalidRequest (wrong task for the model),
        ServingError (an adapter that cannot be loaded).
    """

    def __init__(self, source: AdapterSource | None, config: ServiceConfig | None = None, **settings: Any) -> None:
        self.config = config = service_config(config, **settings)
        self.source = source
        self.base = config.base
        self.base_name = config.base_name or (config.base if config.base == DEFAULT_BASE
                                              else Path(config.base).name or config.base)
        self.pool = AdapterPool(config)
        self._batchers: dict[int, Batcher] = {}
        self._metadata: dict[tuple[str, int], AdapterMetadata] = {}
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._base_has_head: bool | None = None

    # ---- requests ------------------------------------------------------------------------
    def embed(self, model: str, texts: list[str], *, truncate: bool = True) -> Embeddings:
        """Unit-norm float32 embeddings of `texts` with `model` (blocks until done)."""
        return self.submit_embed(model, texts, truncate=truncate).result()

    def rerank(self, model: str, query: str, documents: list[str], top_n: int | None = None, *,
               truncate: bool = True) -> Ranking:
        """`documents` ranked by relevance to `query` with `model`, best first (blocks until done)."""
        return self.submit_rerank(model, query, documents, top_n, truncate=truncate).result()

    def submit_embed(self, model: str, texts: list[str], *, tenant: str = "", truncate: bool = True) -> Future:
        """Like `embed`, but returns a Future at once (resolving and loading happen before it returns).

        Raises (at once): InvalidRequest (a text that is not valid Unicode; with `truncate=False` one
        longer than the model reads), ModelNotFound, Overloaded (503), TenantOverLimit (429).
        """
        check_texts(texts, "input")
        return self._submit(model, "embedder", list(texts), self._embeddings, tenant, truncate, "input")

    def submit_rerank(self, model: str, query: str, documents: list[str], top_n: int | None = None, *,
                      tenant: str = "", truncate: bool = True) -> Future:
        """Like `rerank`, but returns a Future of the `Ranking` (raises as `submit_embed`)."""
        check_texts([query], "query")
        check_texts(documents, "documents")
        pairs = [(query, document) for document in documents]
        return self._submit(model, "reranker", pairs, lambda target, out, tokens: Ranking(
            target.model, rank_scores(out, top_n), tokens), tenant, truncate, "documents")

    @contextmanager
    def lease(self, model: str, task: str) -> Iterator[Target]:
        """Resolve `model` for `task` and keep that version loaded while the block runs."""
        target = self.open(model, task)
        try:
            yield target
        finally:
            self.release(target)

    def open(self, model: str, task: str) -> Target:
        """Resolve and lease `model` for `task`; pair with `release`."""
        if model == self.base_name:
            if task == "reranker" and not self.base_reranks():
                raise InvalidRequest(
                    f"model {model!r} has no trained scoring head: it is a bi-encoder, and as a cross-encoder it "
                    f"has an untrained head (it would only repeat the embedder's cosine); rerank with a reranker adapter trained on it "
                    f"(python -m retrieval_lora.train --task reranker) or serve a cross-encoder base (--base)",
                    code="no_reranker_head")
            slot = self.pool.base_slot(task, self.base)
            return Target(self.base_name, task, slot, BASE_ADAPTER)
        if self.source is None:
            raise InvalidRequest(f"model {model!r}: this service has no adapter source; use {self.base_name!r}")
        ref = self.source.resolve(model)
        metadata = self._metadata_of(ref)
        if metadata.task != task:
            raise InvalidRequest(f"model {model!r} is a {metadata.task} adapter; call {TASK_ENDPOINT[metadata.task]} "
                                 f"with it, not {TASK_ENDPOINT[task]}", code="wrong_task")
        try:
            slot = self.pool.slot_for(task, metadata)
            return Target(ref.spec, task, slot, slot.acquire(ref))
        except AdapterError as exc:
            raise ServingError(f"model {ref.spec} cannot be loaded: {exc}", code="adapter_error") from exc

    def release(self, target: Target) -> None:
        if target.adapter_name != BASE_ADAPTER:
            target.slot.release(target.adapter_name)

    # ---- models and health -----------------------------------------------------------------
    def start(self, tasks: list[str], preload: list[str] = ()) -> None:
        """Load the base for each task and the adapters in `preload` now rather than on first use."""
        for task in tasks:
            self.pool.base_slot(task, self.base)
        for spec in preload:
            ref = self.source.resolve(spec) if self.source else None
            if ref is None:
                raise InvalidRequest(f"cannot preload {spec!r}: this service has no adapter source")
            self.release(self.open(spec, self._metadata_of(ref).task))
        self._ready.set()

    def models(self) -> list[ModelInfo]:
        """The base and every adapter name with the version a bare name resolves to now."""
        tasks = ["embedder", "reranker"] if self.base_reranks() else ["embedder"]
        infos = [ModelInfo(self.base_name, tasks, None, self.base)]
        for name in self.source.names() if self.source else []:
            try:
                ref = self.source.current(name)
                if ref is not None:
                    metadata = self._metadata_of(ref)
                    infos.append(ModelInfo(name, [metadata.task], ref.version, metadata.base_model))
            except (RetrievalLoraError, OSError) as exc:  # one damaged entry must not hide the others
                log.warning("leaving %s out of the model list: %s", name, exc)
        return infos

    def base_reranks(self) -> bool:
        """Whether the bare base may rerank: it has a trained one-logit head (read once from its files)."""
        if self._base_has_head is None:
            try:
                self._base_has_head = has_trained_head(self.base)
            except AdapterError as exc:  # the base's config is unreadable: it cannot serve as a reranker
                log.warning("base %s: %s", self.base, exc)
                self._base_has_head = False
        return self._base_has_head

    @property
    def ready(self) -> bool:
        """Whether `start` has loaded every base and preloaded adapter it was given."""
        return self._ready.is_set()

    def health(self) -> dict:
        """Loaded bases with counters (no adapter names: /health needs no key)."""
        return {"status": "ok", "ready": self.ready, "bases": [
            {"task": slot.task, "base": slot.base, "adapters_loaded": len(slot.loaded()),
             "forward_passes": slot.stats.forward_passes, "rows": slot.stats.rows,
             "max_adapters_in_pass": slot.stats.max_adapters_in_pass,
             "passes_by_adapters": dict(slot.stats.passes_by_adapters)} for slot in self.pool.slots()]}

    def batchers(self) -> list[Batcher]:
        """The batchers started so far (one per loaded base that got a request)."""
        with self._lock:
            return list(self._batchers.values())

    def close(self) -> None:
        """Stop the batcher threads (queued requests finish first)."""
        with self._lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.close()

    # ---- internals -------------------------------------------------------------------------
    def _submit(self, model: str, task: str, rows: list, finish, tenant: str, truncate: bool, what: str) -> Future:
        target = self.open(model, task)
        try:
            if not truncate:
                self._check_fits(target, rows, what)
            inner = self._batcher(target.slot).submit(rows, [target.adapter_name] * len(rows), tenant)
        except BaseException:
            self.release(target)
            raise
        result: Future = Future()

        def done(future: Future) -> None:
            self.release(target)
            if result.cancelled():  # the request gave up (timed out); nobody waits for this
                return
            try:
                outputs, tokens = future.result()
                value = finish(target, outputs, int(sum(tokens)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, never lost in the worker
                _settle(result, exception=exc)
            else:
                _settle(result, value=value)

        inner.add_done_callback(done)
        result.add_done_callback(lambda future: future.cancelled() and inner.cancel())
        return result

    @staticmethod
    def _check_fits(target: Target, rows: list, what: str) -> None:
        """With truncate=False: InvalidRequest for the first row longer than the model reads."""
        limit = target.slot.max_tokens
        for index, count in enumerate(target.slot.token_counts(rows)):
            if count > limit:
                row = f"'query' with 'documents[{index}]'" if what == "documents" else f"'{what}[{index}]'"
                raise InvalidRequest(f"{row} is {count} tokens; model {target.model} reads at most {limit} "
                                     "(truncate=false): shorten it, or send truncate=true to cut it",
                                     code="input_too_long")

    @staticmethod
    def _embeddings(target: Target, outputs: np.ndarray, tokens: int) -> Embeddings:
        return Embeddings(target.model, outputs, tokens)

    def _batcher(self, slot: BaseSlot) -> Batcher:
        with self._lock:
            batcher = self._batchers.get(id(slot))
            if batcher is None:
                batcher = self._batchers[id(slot)] = Batcher(
                    slot, batch_size=self.config.batch_size, wait_s=self.config.batch_wait_ms / 1000.0,
                    max_queued_rows=self.config.max_queued_rows,
                    max_queued_rows_per_tenant=self.config.max_queued_rows_per_tenant)
            return batcher

    def _metadata_of(self, ref: AdapterRef) -> AdapterMetadata:
        key = (ref.name, ref.version)
        if key not in self._metadata:  # versions are immutable, so their metadata never goes stale
            try:
                self._metadata[key] = read_adapter_metadata(ref.adapter_dir)
            except AdapterError as exc:
                raise ServingError(f"model {ref.spec} cannot be loaded: {exc}", code="adapter_error") from exc
        return self._metadata[key]


def _settle(future: Future, *, value: Any = None, exception: BaseException | None = None) -> None:
    """Set the outcome unless the future was cancelled meanwhile (a timed-out request)."""
    try:
        future.set_exception(exception) if exception is not None else future.set_result(value)
    except InvalidStateError:
        pass
