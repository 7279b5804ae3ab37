"""Library messages a user can do nothing about, silenced once for every entry point and flow.

- bitsandbytes logs at import, on CPUs with AVX512-BF16, that it could not fetch an optional
  kernel from a hub ("Failed to load CPU gemm_4bit_forward from kernels-community"). It is
  printed even when nothing uses 4-bit weights, and it does not matter here: we keep 4-bit
  layers out of that kernel's packed layout (`retrieval_lora.models.keep_4bit_layout`).
- sentence-transformers calls a transformers property deprecated in 5.x
  (`is_gradient_checkpointing`), which warns once per training run.
"""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_library_noise() -> None:
    """Install the filters (idempotent: a second call adds nothing)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessages) for f in logger.filters):
        logger.addFilter(_DropMessages("kernels-community"))
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
