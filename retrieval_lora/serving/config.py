"""Settings of the adapter server: where adapters come from, how requests are batched, limits.

Each serving default lives here once:
- `ServiceConfig`: the engine (base, batching, adapters in memory), read by `RetrievalService`,
  so by the Python API (`Embedder`, `Reranker`) and the server alike; the pool, slots and
  batchers below it take these values as required arguments and define no defaults.
- `ServeConfig(ServiceConfig)`: the schema of `python -m retrieval_lora.serve` (one flag per
  field, or a YAML/TOML file via `--config`): the engine settings plus registry, address,
  keys, preloading and `Limits`.
- `Limits` bounds what one HTTP request may ask for. The limits apply to the HTTP API only:
  the in-process Python API encodes whatever it is given.
- The registry folder default is `registry.registry_root` (`$RETRIEVAL_LORA_REGISTRY`, else
  `./registry`), as for every other entry point.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval_lora.config import field
from retrieval_lora.errors import ConfigError
from retrieval_lora.models import DEFAULT_BASE
from retrieval_lora.registry import DEFAULT_REGISTRY, REGISTRY_ENV, registry_root
from retrieval_lora.serving.errors import InvalidRequest

MIXED_LORA = ("grouped", "peft")  # how a forward pass mixes adapters (see pool.py)


@dataclass
class Limits:
    """Per-request bounds; each violation is a 400 (413 for the body) whose message names the setting to raise."""

    max_inputs: int = field(256, "most texts in one /v1/embeddings request")
    max_documents: int = field(1000, "most documents in one /v1/rerank request")
    max_input_chars: int = field(20000, "longest text (input, query or document) in characters; longer ones are "
                                        "refused, not cut. The model itself reads at most max_seq_length tokens")
    max_body_bytes: int = field(16_000_000, "largest request body in bytes, counted while it is read, chunked or "
                                            "not (413 above it)")
    request_timeout_s: float = field(30.0, "longest a request may wait for and run its forward passes before it "
                                           "is answered 503 (code timeout) and its queued rows are dropped")

    def __post_init__(self) -> None:
        bad = [f"{name}={getattr(self, name)}" for name in ("max_inputs", "max_documents", "max_input_chars",
                                                             "max_body_bytes") if getattr(self, name) < 1]
        if self.request_timeout_s <= 0:
            bad.append(f"request_timeout_s={self.request_timeout_s}")
        if bad:
            raise ConfigError(f"limits must be >= 1 (request_timeout_s > 0): {', '.join(bad)}")

    def check_inputs(self, texts: list[str]) -> None:
        """Raise InvalidRequest if an embeddings request has no text, too many, an empty or too long one."""
        if not texts:
            raise InvalidRequest("'input' is empty: send a string or a non-empty list of strings", code="empty_input")
        if len(texts) > self.max_inputs:
            raise InvalidRequest(f"'input' has {len(texts)} texts; this server accepts at most {self.max_inputs} "
                                 "per request (max_inputs): split the batch", code="too_many_inputs")
        self._check_texts(texts, "input")

    def check_rerank(self, query: str, documents: list[str]) -> None:
        """Raise InvalidRequest if a rerank request has no documents, too many, or an empty or too long text."""
        if not documents:
            raise InvalidRequest("'documents' is empty: send at least one document", code="empty_input")
        if len(documents) > self.max_documents:
            raise InvalidRequest(f"'documents' has {len(documents)} entries; this server reranks at most "
                                 f"{self.max_documents} per request (max_documents): split them or pre-filter "
                                 "with /v1/embeddings", code="too_many_documents")
        self._check_texts([query], "query")
        self._check_texts(documents, "documents")

    def _check_texts(self, texts: list[str], what: str) -> None:
        for index, text in enumerate(texts):
            where = what if what == "query" else f"{what}[{index}]"
            if not text.strip():  # as OpenAI: an empty text has no meaning to embed
                raise InvalidRequest(f"'{where}' is empty or only whitespace: send text, or leave it out",
                                     code="empty_input")
            if len(text) > self.max_input_chars:
                raise InvalidRequest(f"'{where}' has {len(text)} characters; the limit is {self.max_input_chars} "
                                     "(max_input_chars): shorten or chunk it", code="input_too_long")


@dataclass
class ServiceConfig:
    """How `RetrievalService` loads bases and batches requests; the defaults of every serving path."""

    base: str = field(DEFAULT_BASE, "base model served as itself and loaded at start (path, hub id or the default alias)")
    base_name: str | None = field(None, "model name clients use for the base; empty: the base's alias or folder name")
    device: str | None = field(None, "torch device (cpu, cuda, ...); empty: sentence-transformers' choice")
    max_seq_length: int | None = field(None, "truncate inputs to this many tokens; empty: the base's own limit")
    batch_size: int = field(32, "most rows (texts or query-document pairs) in one forward pass")
    batch_wait_ms: float = field(2.0, "how long the batcher waits for more requests before a forward pass")
    max_loaded_adapters: int = field(64, "most adapters in memory per base (a hard cap): the least recently used "
                                         "idle one is unloaded before another loads")
    adapter_wait_s: float = field(10.0, "how long a request for an adapter not in memory waits for a place when "
                                        "all max_loaded_adapters are in use by requests in flight (then 503)")
    max_queued_rows: int = field(2048, "most rows (texts or query-document pairs) waiting per base for a forward "
                                       "pass; requests beyond it get 503 with Retry-After")
    max_queued_rows_per_tenant: int = field(512, "most rows one tenant (API key's tenant) may have waiting per "
                                                 "base; beyond it 429 with Retry-After, while other tenants are served")
    mixed_lora: str = field("grouped", "how a pass mixes adapters: 'grouped' (rows grouped per adapter, LoRA added in "
                                       "place; measured faster) or 'peft' (PEFT's adapter_names path)")

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ConfigError("invalid serve settings: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        """Every invalid setting as `name=value: fix` (a subclass adds its own after these)."""
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size}: must be >= 1")
        if self.batch_wait_ms < 0:
            problems.append(f"batch_wait_ms={self.batch_wait_ms}: must be >= 0")
        if self.mixed_lora not in MIXED_LORA:
            problems.append(f"mixed_lora={self.mixed_lora!r}: use 'grouped' or 'peft'")
        for name in ("max_loaded_adapters", "max_queued_rows", "max_queued_rows_per_tenant"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)}: must be >= 1")
        if self.adapter_wait_s < 0:
            problems.append(f"adapter_wait_s={self.adapter_wait_s}: must be >= 0")
        return problems


def service_config(config: ServiceConfig | None = None, **settings: Any) -> ServiceConfig:
    """`config` (default `ServiceConfig()`) with the fields named in `settings` replaced.

    This is how the Python API's keyword arguments (`Embedder(..., batch_size=64)`) become a
    config without restating any default.

    Raises:
        ConfigError: a name that is not a `ServiceConfig` field (the message lists them), or an invalid value.
    """
    names = [f.name for f in dataclasses.fields(ServiceConfig)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise ConfigError(f"unknown serving settings {unknown}; the settings are {', '.join(names)}")
    config = config if config is not None else ServiceConfig()
    return dataclasses.replace(config, **settings) if settings else config


@dataclass
class ServeConfig(ServiceConfig):
    """Everything `python -m retrieval_lora.serve` needs; defaults serve the local registry on loopback."""

    registry: str | None = field(None, f"adapter registry folder (adapters are served from here); empty: "
                                       f"${REGISTRY_ENV}, else ./{DEFAULT_REGISTRY}")
    keys: str | None = field(None, "YAML/TOML file of API keys -> allowed models (required unless host is loopback)")
    host: str = field("127.0.0.1", "address to listen on")
    port: int = field(8000, "port to listen on")
    preload: str = field("", "comma-separated adapter specs (name or name@N) to load at start instead of on first use")
    tasks: str = field("embedder,reranker", "which base models to load at start: embedder, reranker or both")
    threads: int = field(1, "torch CPU threads for forward passes. 1 was measured fastest on a machine shared "
                            "with other busy processes (torch's own default, one per core, ran 10-20x slower "
                            "there); on a machine of its own give the server the cores it may use")
    # prefix "": the limits keep their flat flags (--max-documents, not --limits-max-documents).
    # Written as metadata so it holds whether or not `config.field` takes `prefix=` itself.
    limits: Limits = dataclasses.field(default_factory=Limits, metadata={"help": "per-request limits", "prefix": ""})

    def __post_init__(self) -> None:
        if isinstance(self.limits, dict):  # from a YAML/TOML file
            self.limits = Limits(**self.limits)
        super().__post_init__()

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.threads < 1:
            problems.append(f"threads={self.threads}: must be >= 1")
        if set(self.task_list) - {"embedder", "reranker"}:
            problems.append(f"tasks={self.tasks!r}: use embedder, reranker or both (comma-separated)")
        if self.keys is None and not _is_loopback(self.host):
            problems.append(f"host={self.host!r} is reachable from other machines, so --keys FILE is required "
                            "(without keys every client may use every adapter)")
        return problems

    @property
    def registry_dir(self) -> Path:
        """The registry folder served: `registry`, else `$RETRIEVAL_LORA_REGISTRY`, else `./registry`."""
        return registry_root(self.registry)

    @property
    def task_list(self) -> list[str]:
        return [task.strip() for task in self.tasks.split(",") if task.strip()]

    @property
    def preload_list(self) -> list[str]:
        return [spec.strip() for spec in self.preload.split(",") if spec.strip()]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
