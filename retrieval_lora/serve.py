"""`python -m retrieval_lora.serve`: serve registry adapters over HTTP for RAG systems.

Loads the base once per task (embedder, reranker), then the adapters of the registry on first
use (or at start with --preload). Endpoints: POST /v1/embeddings (OpenAI-compatible),
POST /v1/rerank (Cohere/Jina-compatible), GET /v1/models, GET /health (alive), GET /ready (bases
loaded), GET /metrics (Prometheus). `model` is an adapter name (its promoted version, followed
live), NAME@N (pinned) or the base's name. The server listens at once and loads in the
background: /ready answers 503 until the bases and --preload adapters are in memory.
"""

from __future__ import annotations

import argparse
import logging
import threading

from retrieval_lora.cli import build_parser as build_config_parser
from retrieval_lora.cli import config_from_args, run_cli
from retrieval_lora.registry import Registry
from retrieval_lora.serving.app import create_app
from retrieval_lora.serving.auth import KeyRing
from retrieval_lora.serving.config import MIXED_LORA, ServeConfig
from retrieval_lora.serving.service import RetrievalService
from retrieval_lora.serving.sources import RegistrySource

EPILOG = """examples:
  python -m retrieval_lora.serve                                   # $RETRIEVAL_LORA_REGISTRY or ./registry
                                                                   # on 127.0.0.1:8000, no keys
  python -m retrieval_lora.serve --host 0.0.0.0 --keys keys.yaml --registry /srv/registry
  python -m retrieval_lora.serve --preload scifact,scifact-rerank --max-documents 200

call it:
  curl -s localhost:8000/v1/embeddings -H 'Authorization: Bearer KEY' -H 'Content-Type: application/json' \\
       -d '{"model": "scifact", "input": ["what causes scurvy"]}'
"""


def build_parser() -> argparse.ArgumentParser:
    """The serve command line: one flag per `ServeConfig` field, with that field's default and help."""
    return build_config_parser(ServeConfig, __doc__, prog="python -m retrieval_lora.serve", epilog=EPILOG,
                               choices={"mixed_lora": MIXED_LORA})


def build_service(config: ServeConfig, *, start: bool = True) -> RetrievalService:
    """The service for `config` (a `ServeConfig` is its `ServiceConfig`), serving the registry at
    `config.registry_dir`; with `start`, the bases of `config.tasks` and the `config.preload`
    adapters are loaded before it returns (the server itself loads them in the background).

    Raises:
        AdapterError, ServingError, InvalidRequest: a base or preloaded adapter cannot be loaded.
    """
    service = RetrievalService(RegistrySource(Registry(config.registry_dir)), config)
    if start:
        service.start(config.task_list, config.preload_list)
    return service


def main(argv: list[str] | None = None) -> int:
    import torch
    import uvicorn

    config: ServeConfig = config_from_args(ServeConfig, build_parser().parse_args(argv))
    keys = KeyRing(config.keys) if config.keys else None
    if keys is None:
        print("warning: no --keys file: every client on this machine may use every model", flush=True)
    torch.set_num_threads(config.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    service = build_service(config, start=False)
    server = uvicorn.Server(uvicorn.Config(create_app(service, keys, config.limits), host=config.host,
                                           port=config.port, log_level="warning"))
    failure: list[BaseException] = []
    loader = threading.Thread(target=_start, args=(service, config, server, failure), name="load-bases", daemon=True)
    print(f"Serving base {service.base_name!r} and the adapters of {config.registry_dir} on "
          f"http://{config.host}:{config.port} (torch threads: {config.threads}); loading, see /ready", flush=True)
    loader.start()
    try:
        server.run()
    finally:
        service.close()
    if failure:
        raise failure[0]
    return 0


def _start(service: RetrievalService, config: ServeConfig, server, failure: list[BaseException]) -> None:
    """Load the bases and preloaded adapters; on failure stop the server (main raises the error)."""
    try:
        service.start(config.task_list, config.preload_list)
        logging.getLogger(__name__).info("ready: bases %s, preloaded %s", config.task_list, config.preload_list or "none")
    except BaseException as exc:  # noqa: BLE001 - reported by main once the server stopped
        failure.append(exc)
        server.should_exit = True


if __name__ == "__main__":
    run_cli(main)
