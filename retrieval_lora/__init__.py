"""retrieval-lora: specialize embedders and rerankers to your corpus with LoRA/QLoRA adapters.

Stages, each a plain module whose functions take typed inputs and return typed results:
data -> mining -> training -> evaluation -> gate + registry -> serving. `flows/` and the
`python -m retrieval_lora.<stage>` entry points only wire them together.
"""

__version__ = "0.1.0"

from retrieval_lora.noise import quiet_library_noise  # noqa: E402

quiet_library_noise()
