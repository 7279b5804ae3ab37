"""The cosine prior: a reranker made from a bi-encoder starts where its first stage already is.

A cross-encoder loaded from a bi-encoder (the packaged all-MiniLM-L6-v2) has a new, untrained
scoring head, and on a few hundred labelled rows it does not learn to rank before the data runs
out (evals/results/reranker_default.md: 0.4769 nDCG@10 against the first stage's 0.5732 after 200
steps). With the prior, its score of a (query, document) pair is

    score = head(joint encoding of "query [SEP] document") + scale * cos(E(query), E(document))

where E is the same transformer (its LoRA included) used as the bi-encoder it was trained as:
each text encoded on its own and pooled as its sentence-transformers config says (mean tokens for
MiniLM). The head starts at zero, so before any training the reranker ranks exactly as the
frozen embedder does, and training (LambdaLoss on raw logits) moves from there: the LoRA adapts
both views and the head learns what only the joint encoding sees. Cost: two more encoder passes
(query, document) per pair. Scoring many pairs of one model state (an evaluation's reranking) can
drop most of that cost with `cached_views`: each distinct query or document view is encoded once,
and a head that is all zeros (the frozen base reranker) skips the joint pass it adds nothing to.

Installed by `load_base` on a reranker whose base has no trained head, and on a merged folder
whose config records it (`PRIOR_KEY`); a base with its own head (a real cross-encoder) never
gets it. The setting lives in the transformers config, so a merged export keeps it when loaded
with `load_base`; a plain `CrossEncoder(...)` load of that export scores without it.

    model = load_base("reranker")          # cosine_prior(model) == {"scale": 20.0, "pooling": "mean"}
    model.predict([("what is LoRA", "LoRA adds low-rank updates ...")])
"""

from __future__ import annotations

import json
import types
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

PRIOR_KEY = "retrieval_lora_cosine_prior"
DEFAULT_SCALE = 20.0
"""Logit units per unit of cosine: 20, as MultipleNegativesRankingLoss scales cosines, so LambdaLoss's
pairwise terms see score gaps of about 1-4 between a positive and its hard negatives."""
POOLINGS = ("mean", "cls")
VIEWS_ATTR = "_retrieval_lora_prior_views"
MAX_CACHED_VIEWS = 200_000
"""Pooled views kept by `cached_views` before it starts again (about 300 MB of 384-d float32 vectors)."""


def pooling_of(path: str | None) -> str | None:
    """The pooling of the sentence-transformers model at `path` (a folder): "mean" or "cls", or None
    when its Pooling module uses another mode. A folder without a sentence-transformers config is
    mean-pooled, as sentence-transformers wraps a plain transformer (so is `path` None)."""
    folder = Path(path) if path else None
    modules = folder / "modules.json" if folder else None
    if modules is None or not modules.is_file():
        return "mean"
    for module in json.loads(modules.read_text(encoding="utf-8")):
        if module.get("type", "").endswith("Pooling"):
            config = json.loads((folder / module.get("path", "") / "config.json").read_text(encoding="utf-8"))
            mode = config.get("pooling_mode") or next(
                (name for name in ("mean", "cls", "max", "lasttoken", "weightedmean")
                 if config.get(f"pooling_mode_{name}_tokens" if name != "cls" else "pooling_mode_cls_token")), None)
            return mode if mode in POOLINGS else None
    return "mean"


def cosine_prior(model: Any) -> dict[str, Any] | None:
    """The prior's settings ({"scale", "pooling"}) of a CrossEncoder from `load_base`, None when it has none."""
    return getattr(transformers_model(model).config, PRIOR_KEY, None)


@contextmanager
def cached_views(model: Any) -> Iterator[None]:
    """Within the block, scoring without gradients reuses each distinct query and document view.

    For scoring many pairs of one model state, as an evaluation's reranking does (the same
    queries against many documents, the same documents under several first stages): the pooled
    single-text views are kept by their token ids, so each is encoded once, and while the active
    scoring head is all zeros (the frozen base reranker of a base without a head) the joint pass
    is skipped, its logits being zero. Scores are those of the plain forward, to float rounding.
    Do not switch or train adapters inside the block. A model without the prior is left as it is.
    """
    inner = transformers_model(model)
    if getattr(inner.config, PRIOR_KEY, None) is None:
        yield
        return
    setattr(inner, VIEWS_ATTR, {})
    try:
        yield
    finally:
        delattr(inner, VIEWS_ATTR)


def transformers_model(model: Any) -> Any:
    """The transformers model inside a CrossEncoder, under peft's wrapper when it has one: the module
    whose `forward` the prior and the length buckets (`models.buckets`) replace."""
    inner = model[0].model
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # a PeftModel


def install_cosine_prior(model: Any, settings: dict[str, Any], *, zero_head: bool) -> None:
    """Add the prior to `model` (a CrossEncoder whose transformer is not yet wrapped by peft), in place.

    `zero_head`: set the new scoring head's weights to zero, so the first score is the prior alone.
    The transformers model's `forward` is replaced on that instance: peft calls the wrapped
    model's `forward` directly, and its mixed-adapter routing and our grouped LoRA hooks see the
    extra passes as the same rows, so every adapter scores its own rows in all three passes.
    """
    inner = model[0].model
    if settings.get("pooling") not in POOLINGS:
        raise ValueError(f"cosine prior pooling {settings.get('pooling')!r}: must be one of {', '.join(POOLINGS)}")
    setattr(inner.config, PRIOR_KEY, {"scale": float(settings["scale"]), "pooling": settings["pooling"]})
    if zero_head:
        for name in ("classifier", "score"):
            head = getattr(inner, name, None)
            if head is not None:
                for parameter in head.parameters():
                    torch.nn.init.zeros_(parameter)
    tokenizer = model.tokenizer
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    inner.forward = types.MethodType(_forward_with_prior(type(inner).forward, tokenizer.sep_token_id, start, pad),
                                     inner)


def _forward_with_prior(forward, sep: int, cls: int, pad: int):
    def forward_with_prior(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        if token_type_ids is not None:  # not every architecture takes them
            kwargs["token_type_ids"] = token_type_ids
        views = None if torch.is_grad_enabled() else getattr(self, VIEWS_ATTR, None)
        if views is not None and _head_is_zero(self):  # its logits are zero: skip the joint pass
            zeros = torch.zeros((len(input_ids), self.config.num_labels), dtype=self.dtype, device=input_ids.device)
            output = (zeros,) if kwargs.get("return_dict") is False else SequenceClassifierOutput(logits=zeros)
        else:
            output = forward(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        settings = getattr(self.config, PRIOR_KEY)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        (q_ids, q_mask), (d_ids, d_mask) = split_pairs(input_ids, attention_mask, sep, cls, pad)
        queries = _views(self.base_model, q_ids, q_mask, settings["pooling"], views, pad)
        documents = _views(self.base_model, d_ids, d_mask, settings["pooling"], views, pad)
        prior = settings["scale"] * torch.nn.functional.cosine_similarity(queries.float(), documents.float(), dim=-1)
        logits = output.logits if hasattr(output, "logits") else output[0]
        shifted = logits + prior.unsqueeze(-1).to(logits.dtype)
        if hasattr(output, "logits"):
            output.logits = shifted
            return output
        return (shifted, *output[1:])

    return forward_with_prior


def _views(encoder, ids: torch.Tensor, mask: torch.Tensor, pooling: str, cache: dict | None,
           pad: int) -> torch.Tensor:
    """Pooled single-text encodings of a padded batch; with `cache` (token ids -> vector), each distinct
    text is encoded once."""
    if cache is None:
        return _pool(encoder(input_ids=ids, attention_mask=mask).last_hidden_state, mask, pooling)
    keys = [tuple(row[row_mask.bool()].tolist()) for row, row_mask in zip(ids, mask)]
    missing = list(dict.fromkeys(key for key in keys if key not in cache))
    if missing:
        if len(cache) + len(missing) > MAX_CACHED_VIEWS:
            cache.clear()
            missing = list(dict.fromkeys(keys))
        new_ids, new_mask = _padded([ids.new_tensor(key) for key in missing], pad)
        pooled = _pool(encoder(input_ids=new_ids, attention_mask=new_mask).last_hidden_state, new_mask, pooling)
        cache.update(zip(missing, pooled))
    return torch.stack([cache[key] for key in keys])


def _head_is_zero(model: Any) -> bool:
    """Whether the scoring head the model applies now (peft's trained copy, or the original when adapters
    are off) has only zero weights, so that its logits are zero whatever the joint encoding."""
    head = next((getattr(model, name) for name in ("classifier", "score") if hasattr(model, name)), None)
    if head is None:
        return False
    if hasattr(head, "original_module"):  # peft's ModulesToSaveWrapper
        active = [name for name in head.active_adapters if name in head.modules_to_save]
        if head.disable_adapters or not active:
            head = head.original_module
        elif len(active) == 1:
            head = head.modules_to_save[active[0]]
        else:
            return False
    parameters = list(head.parameters())
    return bool(parameters) and not any(bool(p.any()) for p in parameters)


def split_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, sep: int, cls: int, pad: int = 0
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The query and document of each tokenized pair, as two right-padded batches encoded on their own.

    A pair is `[CLS] query [SEP] document [SEP]` (BERT) or `<s> query </s></s> document </s>`
    (RoBERTa, MPNet): the query is everything up to the first separator, the document what follows
    it (after a doubled separator), with the start token put in front. Truncation already happened
    on the pair, so each side is what the joint encoding saw.
    """
    queries, documents = [], []
    for ids, mask in zip(input_ids, attention_mask):
        ids = ids[mask.bool()]
        seps = (ids == sep).nonzero().flatten()
        if len(seps) == 0:
            raise ValueError("a tokenized (query, document) pair holds no separator token; the cosine prior needs "
                             "the tokenizer's pair template ([CLS] query [SEP] document [SEP])")
        end = int(seps[0]) + 1
        start = end + 1 if end < len(ids) and int(ids[end]) == sep else end
        queries.append(ids[:end])
        documents.append(torch.cat([ids.new_tensor([cls]), ids[start:]]))
    return _padded(queries, pad), _padded(documents, pad)


def _padded(rows: list[torch.Tensor], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = rows[0].new_full((len(rows), width), pad)
    mask = rows[0].new_zeros((len(rows), width))
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def _pool(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return states[:, 0]
    weights = mask.unsqueeze(-1).to(states.dtype)
    return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
