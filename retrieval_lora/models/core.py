"""The heavy half of `retrieval_lora.models`: loading bases, attaching, saving, loading and merging adapters."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field as dc_field
from pathlib import Path
from typing import Any, Union

import torch
from peft import PeftModel, get_peft_model
from sentence_transformers import CrossEncoder, SentenceTransformer

from retrieval_lora.errors import AdapterError
from retrieval_lora.models.prior import DEFAULT_SCALE, PRIOR_KEY, cosine_prior, install_cosine_prior, pooling_of
from retrieval_lora.models.settings import DEFAULT_BASE, LoraSettings, check_task, resolve_base
from retrieval_lora.manifest import library_versions, replace_dir_atomic, staging_dir, write_json_atomic

RetrievalModel = Union[SentenceTransformer, CrossEncoder]
METADATA_FILE = "retrieval_lora.json"
ADAPTER_FORMAT_VERSION = 2  # 2: a reranker records its cosine prior


HEAD_MODULES = ["classifier", "score"]  # scoring-head names of transformers' sequence classifiers


def _quantization_config():
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    # The scoring head stays in full precision: it is trained in full (modules_to_save), and a
    # 4-bit copy of a freshly initialized head would lose its quantization state when copied.
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=compute, llm_int8_skip_modules=HEAD_MODULES)


def has_trained_head(base: str) -> bool:
    """Whether `base` was saved as a one-logit sequence classifier with its scoring head (a cross-encoder).

    A bi-encoder (the packaged all-MiniLM-L6-v2: architecture `BertModel`) has no head: loaded as a
    reranker it scores with a new one (zero, under the cosine prior of `models.prior`). Reads only the base's config and, for a local
    folder, the names of its saved weights (a config that claims a head the weights lack counts as
    none); a hub id needs its config cached or reachable.

    Raises:
        AdapterError: the base's config cannot be read.
    """
    from transformers import AutoConfig

    path = resolve_base(base)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read the config of base model {base!r} ({exc}); give a local model folder, a "
                           f"hub id reachable from here, or {DEFAULT_BASE!r} for the packaged default") from exc
    classifier = any(name.endswith("ForSequenceClassification") for name in config.architectures or [])
    if not classifier or config.num_labels != 1:
        return False
    names = _saved_weight_names(Path(path)) if Path(path).is_dir() else None
    return names is None or any(name.split(".")[0] in HEAD_MODULES for name in names)


def _saved_weight_names(folder: Path) -> list[str] | None:
    """The tensor names saved in `folder` (safetensors, single or sharded); None when not safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return list(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}))
    single = folder / "model.safetensors"
    if not single.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(single), framework="np") as handle:
        return list(handle.keys())


def load_base(task: str, base: str = DEFAULT_BASE, *, qlora: bool = False, max_seq_length: int | None = None,
              device: str | None = None) -> RetrievalModel:
    """Load the frozen base model for `task`.

    Args:
        task: "embedder" (SentenceTransformer) or "reranker" (CrossEncoder, one relevance score).
        base: a local folder, a hub id, or `DEFAULT_BASE`.
        qlora: load the weights in 4-bit NF4 with double quantization (bitsandbytes).
        max_seq_length: truncate inputs to this many tokens (default: the model's own limit).
        device: "cpu", "cuda", ... (default: sentence-transformers' choice).

    Raises:
        ConfigError: unknown task. AdapterError: the base cannot be found or loaded.
    """
    check_task(task)
    kwargs: dict[str, Any] = {"device": device}
    if qlora:
        kwargs["model_kwargs"] = {"quantization_config": _quantization_config()}
    path = resolve_base(base)
    try:
        if task == "embedder":
            model = SentenceTransformer(path, **kwargs)
        else:
            head = has_trained_head(path) if Path(path).is_dir() else None  # a hub id's is read after loading
            with _quiet_about_a_new_head(quiet=head is False):
                model = CrossEncoder(path, num_labels=1, **kwargs)
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot load base model {base!r} ({exc}); give a local model folder, a hub id "
                           f"reachable from here, or {DEFAULT_BASE!r} for the packaged default") from exc
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    if task == "reranker":
        _setup_cosine_prior(model, base, path, head)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if qlora:
        keep_4bit_layout(model)
    return model


@contextmanager
def _quiet_about_a_new_head(quiet: bool) -> Iterator[None]:
    """Silence transformers' load report (a table of MISSING classifier weights) when `quiet`: a local
    bi-encoder loaded as a reranker, whose new head is expected, and ours to initialize."""
    from transformers.utils import logging as hf_logging

    if not quiet:
        yield
        return
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _setup_cosine_prior(model: CrossEncoder, base: str, path: str, head: bool | None) -> None:
    """Give a reranker the cosine prior (`retrieval_lora.models.prior`) when its config records one (a
    merged export) or its base has no trained head (a bi-encoder whose pooling the prior can repeat).
    `head`: `has_trained_head` of the base when already read (None: read it here)."""
    recorded = getattr(model[0].model.config, PRIOR_KEY, None)
    if recorded:
        install_cosine_prior(model, recorded, zero_head=False)
        return
    if head if head is not None else has_trained_head(base):
        return
    pooling = pooling_of(_local_folder(path))
    if pooling is not None:
        install_cosine_prior(model, {"scale": DEFAULT_SCALE, "pooling": pooling}, zero_head=True)


def _local_folder(path: str) -> str | None:
    """`path` itself when it is a folder, else the cached snapshot of that hub id (None when none is cached)."""
    if Path(path).is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached: pooling_of(None) answers "mean"
        return None


def keep_4bit_layout(model: torch.nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of `model` in its portable NF4 layout; returns how many.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a `Linear4bit` weight IN PLACE the first
    time the layer runs in eval mode without grad (`packing_format_for_cpu`: another nibble order,
    bfloat16 absmax, double quantization undone). Afterwards `dequantize_4bit` of that weight reads
    garbage (what `merged_for_inference` and peft's merge read), and a training step that follows an
    evaluation takes the packed path with autograd and fails. Its only inverse runs on save or on a
    move to a GPU. We own these layers from loading to the end, so the switch is turned off per
    layer here, so every CPU computes what a CPU without AVX512-BF16 computes (the packed layout
    only speeds up 4-bit inference, and we score 4-bit models through `merged_for_inference`'s
    dense copies). A layout packed before we got the model is converted back with bitsandbytes'
    own inverse, which is close but not exact (the packing kept absmax in bfloat16).
    """
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:  # no bitsandbytes: no 4-bit layers either
        return 0
    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
        state = layer.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
    return len(layers)


def transformer_of(model: RetrievalModel) -> torch.nn.Module:
    """The transformers model inside the first module (a PeftModel once an adapter is on)."""
    return model[0].model


def attach_lora(model: RetrievalModel, task: str, settings: LoraSettings) -> PeftModel:
    """Wrap the model's transformer in a trainable LoRA adapter named "default", in place."""
    check_task(task)
    if isinstance(transformer_of(model), PeftModel):
        raise AdapterError("this model already carries an adapter; load a fresh base to attach a new one")
    peft_model = get_peft_model(transformer_of(model), settings.peft_config(task))
    model[0].model = peft_model
    return peft_model


def trainable_parameters(model: RetrievalModel) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit weights are counted as their unpacked size."""
    inner = transformer_of(model)
    if isinstance(inner, PeftModel):
        return inner.get_nb_trainable_parameters()
    total = sum(p.numel() for p in inner.parameters())
    return sum(p.numel() for p in inner.parameters() if p.requires_grad), total


def base_fingerprint(model: RetrievalModel) -> str:
    """Identity of the base encoder: architecture sizes plus a hash of its token embeddings.

    Independent of where the base was loaded from and of 4-bit loading (embeddings are never
    quantized), so an adapter can be matched to its base on any machine.
    """
    inner = transformer_of(model)
    config = inner.config
    hasher = hashlib.sha256()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size"):
        hasher.update(f"{key}={getattr(config, key, None)};".encode())
    weights = inner.get_input_embeddings().weight.detach().to("cpu", torch.float32).contiguous()
    hasher.update(weights.numpy().tobytes())
    return hasher.hexdigest()[:16]


@dataclass
class AdapterMetadata:
    """What `retrieval_lora.json` records beside the PEFT files of an adapter."""

    task: str
    base_model: str
    base_fingerprint: str
    dataset_fingerprint: str | None = None
    qlora: bool = False
    config: dict[str, Any] = dc_field(default_factory=dict)
    metrics: dict[str, Any] = dc_field(default_factory=dict)
    libraries: dict[str, str] = dc_field(default_factory=library_versions)
    cosine_prior: dict[str, Any] | None = None  # a reranker's, as `save_adapter` found it on the model
    format_version: int = ADAPTER_FORMAT_VERSION


def read_adapter_metadata(path: str | Path) -> AdapterMetadata:
    """Read and check `retrieval_lora.json` of an adapter folder.

    Raises:
        AdapterError: the folder, the metadata or the PEFT files are missing or unreadable.
    """
    path = Path(path)
    meta_path = path / METADATA_FILE
    if not path.is_dir():
        raise AdapterError(f"adapter folder {path} does not exist")
    for required in (meta_path, path / "adapter_config.json", path / "adapter_model.safetensors"):
        if not required.is_file():
            raise AdapterError(f"{path} is not a complete retrieval-lora adapter: {required.name} is missing; "
                               "re-run training or restore the folder from the registry")
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
        known = set(AdapterMetadata.__dataclass_fields__)
        return AdapterMetadata(**{k: v for k, v in raw.items() if k in known})
    except (json.JSONDecodeError, TypeError) as exc:
        raise AdapterError(f"{meta_path} is corrupt ({exc}); re-run training to rewrite the adapter") from exc


def save_adapter(model: RetrievalModel, path: str | Path, metadata: AdapterMetadata) -> Path:
    """Write the adapter (PEFT files + metadata) to `path` atomically, replacing what was there.

    For a reranker the trained scoring head is inside `adapter_model.safetensors`.
    """
    inner = transformer_of(model)
    if not isinstance(inner, PeftModel):
        raise AdapterError("this model has no adapter to save; call attach_lora or load_adapter first")
    target = Path(path)
    if isinstance(model, CrossEncoder):
        metadata = dataclasses.replace(metadata, cosine_prior=cosine_prior(model))
    staging = staging_dir(target)
    inner.save_pretrained(str(staging))
    (staging / "README.md").unlink(missing_ok=True)  # peft's model card template says nothing true about us
    write_json_atomic(staging / METADATA_FILE, asdict(metadata))
    replace_dir_atomic(staging, target)
    return target


def load_adapter(model: RetrievalModel, path: str | Path, task: str, *, adapter_name: str = "default") -> AdapterMetadata:
    """Put the adapter at `path` onto `model` (a base from `load_base`) in place.

    A second call with another `adapter_name` adds a further adapter beside the first (used by
    serving for mixed-adapter batches); the last one loaded is not automatically active.

    Raises:
        AdapterError: incomplete or corrupt folder, or trained for another task or base.
    """
    metadata = read_adapter_metadata(path)
    if metadata.task != task:
        raise AdapterError(f"adapter {path} was trained for task {metadata.task!r}, not {task!r}; "
                           f"load it with --task {metadata.task}")
    fingerprint = base_fingerprint(model)
    if metadata.base_fingerprint != fingerprint:
        raise AdapterError(f"adapter {path} was trained on base {metadata.base_model!r} "
                           f"(fingerprint {metadata.base_fingerprint}), but the loaded base has fingerprint "
                           f"{fingerprint}; load the base it was trained on")
    if task == "reranker" and metadata.cosine_prior != cosine_prior(model):
        raise AdapterError(f"adapter {path} was trained with cosine prior {metadata.cosine_prior}, but this base "
                           f"scores with {cosine_prior(model)} (retrieval_lora.models.prior); an adapter saved before "
                           "the prior existed (format 1) must be retrained on this version")
    inner = transformer_of(model)
    try:
        if isinstance(inner, PeftModel):
            inner.load_adapter(str(path), adapter_name=adapter_name)
        else:
            model[0].model = PeftModel.from_pretrained(inner, str(path), adapter_name=adapter_name)
    except Exception as exc:  # safetensors/peft raise many types for a damaged file
        raise AdapterError(f"adapter {path} cannot be loaded ({type(exc).__name__}: {exc}); the files are "
                           "corrupt or incomplete: re-run training or restore it from the registry") from exc
    model.eval()
    return metadata


def load_adapter_weights(model: RetrievalModel, folder: str | Path) -> None:
    """Copy the adapter weights saved in `folder` (a PEFT folder or a trainer checkpoint) into the
    adapter already attached to `model`. Used to resume training and to restore the best checkpoint.

    Raises:
        AdapterError: the folder has no adapter weights, or they do not fit the attached adapter.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(folder) / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterError(f"{folder} holds no adapter_model.safetensors; it is not a complete checkpoint")
    inner = transformer_of(model)
    if not isinstance(inner, PeftModel):
        raise AdapterError("attach an adapter (attach_lora) before loading adapter weights into it")
    result = set_peft_model_state_dict(inner, load_file(str(weights)))
    if result.unexpected_keys:
        raise AdapterError(f"{weights} does not fit this adapter (unexpected {result.unexpected_keys[:3]}...); "
                           "it was saved with other LoRA settings")


def merge_adapter(model: RetrievalModel) -> RetrievalModel:
    """Fold the active adapter into the base weights, in place, leaving a plain model."""
    inner = transformer_of(model)
    if not isinstance(inner, PeftModel):
        raise AdapterError("this model has no adapter to merge")
    if _is_quantized(inner):
        raise AdapterError("cannot merge into a 4-bit base; load the base without --qlora, load the adapter, then merge")
    model[0].model = inner.merge_and_unload()
    return model


@contextmanager
def merged_for_inference(model: RetrievalModel) -> Iterator[RetrievalModel]:
    """Within the block, the active adapter is folded into the base weights; after it, taken out.

    Outputs match the unmerged adapter (to float rounding); only the speed differs. A 4-bit base
    cannot take a merge in place (re-quantizing the merged weights would change the outputs), so
    its linear layers are swapped for dense float copies (dequantized NF4 weights + the LoRA
    update) for the block: a float copy of those weights in memory, 4-bit matmuls avoided. A
    model without an adapter or with an adapter already merged is left as it is. Do not switch
    adapters or call `disable_adapter` inside the block.
    """
    inner = transformer_of(model)
    if not isinstance(inner, PeftModel) or _any_merged(inner):
        yield model
        return
    if _is_quantized(inner):
        swapped = _swap_in_dense_layers(inner)
        try:
            yield model
        finally:
            for parent, name, original in swapped:
                setattr(parent, name, original)
        return
    inner.merge_adapter()
    try:
        yield model
    finally:
        inner.unmerge_adapter()


def _swap_in_dense_layers(inner: PeftModel) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """Replace each 4-bit linear layer (LoRA-wrapped or not) by a dense one computing the same function.

    Returns (parent, attribute, original module) triples to put back.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_bnb_weight

    dtype = inner.get_input_embeddings().weight.dtype  # the float dtype the rest of the model runs in
    swapped = []
    for parent in list(inner.modules()):
        if isinstance(parent, LoraLayer):
            continue  # its base layer is replaced together with it, one level up
        for name, child in list(parent.named_children()):
            lora = isinstance(child, LoraLayer)
            base = child.get_base_layer() if lora else child
            if type(getattr(base, "weight", None)).__name__ != "Params4bit":
                continue
            with torch.no_grad():
                weight = dequantize_bnb_weight(base.weight).to(dtype)
                if lora and not child.disable_adapters:
                    for adapter in child.active_adapters:
                        if adapter in child.lora_A:
                            weight += child.get_delta_weight(adapter).to(dtype)
                dense = torch.nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                                        device=weight.device, dtype=dtype)
                dense.weight.copy_(weight)
                if base.bias is not None:
                    dense.bias.copy_(base.bias)
            dense.requires_grad_(False)
            dense.train(child.training)
            setattr(parent, name, dense)
            swapped.append((parent, name, child))
    return swapped


def _is_quantized(inner: torch.nn.Module) -> bool:
    return getattr(getattr(inner, "config", None), "quantization_config", None) is not None


def _any_merged(inner: PeftModel) -> bool:
    return any(getattr(module, "merged", False) for module in inner.modules() if hasattr(module, "merged_adapters"))


def save_merged(model: RetrievalModel, path: str | Path) -> Path:
    """Merge the adapter and save a standalone sentence-transformers folder to `path` atomically."""
    merge_adapter(model)
    target = Path(path)
    staging = staging_dir(target)
    model.save(str(staging))
    replace_dir_atomic(staging, target)
    return target
