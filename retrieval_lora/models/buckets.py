"""Length buckets: a reranker's training forward runs its pairs in passes of similar length.

sentence-transformers' reranker losses tokenize a step's (query, document) pairs in the order
the rows give them (a query's positive, then its negatives, then the next query's) and pad each
forward pass to its longest pair. With documents of uneven length that pads most passes to
near the longest document: on the demo's mined rows (8 rows x 5 pairs a step, passes of 8) the
padded tokens were 1.7x the real ones for the joint pass, and as much for the cosine prior's
document views, whose batches are cut from the same pass. With buckets the loss hands the model
all pairs of the step at once, and the model sorts them by length, runs passes of
`pairs_per_pass` with each pass cut to its own longest pair, and puts the logits back in the
loss's order: 1.13x padding on the same rows, the same scores (to float rounding) and gradients.

Only where gradients are on (training): inference already sorts by length (`CrossEncoder.predict`),
and serving's mixed-adapter batches route adapters by row position, which a reordering would break.
A right-padded batch only (BERT-style tokenizers); a left-padded one runs as it is.

    install_length_buckets(reranker)   # before training; the loss may pass the whole step at once
"""

from __future__ import annotations

import types
from typing import Any

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from retrieval_lora.models.prior import transformers_model

PAIRS_PER_PASS = 8
"""Pairs per forward pass: the pass size sentence-transformers' LambdaLoss used by default (the batch
size of 8); with pairs of one length a pass of 8 x ~120 tokens keeps the CPU's matrix products full."""
INSTALLED_ATTR = "_retrieval_lora_length_buckets"
PLAIN_ONLY = ("labels", "output_hidden_states", "output_attentions", "adapter_names", "inputs_embeds")


def install_length_buckets(model: Any, pairs_per_pass: int = PAIRS_PER_PASS) -> None:
    """Make the training forward of `model` (a CrossEncoder, peft-wrapped or not) run in length buckets,
    in place; a second call changes only `pairs_per_pass`."""
    if pairs_per_pass < 1:
        raise ValueError(f"pairs_per_pass must be at least 1, got {pairs_per_pass}")
    inner = transformers_model(model)
    installed = getattr(inner, INSTALLED_ATTR, None) is not None
    setattr(inner, INSTALLED_ATTR, pairs_per_pass)
    if not installed:  # wrap the class's forward, or the cosine prior's (models.prior) where installed
        inner.forward = types.MethodType(_bucketed(inner.forward), inner)


def _bucketed(plain):
    def forward_in_buckets(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        size = getattr(self, INSTALLED_ATTR)
        types_given = token_type_ids is not None  # passed on only when given: not every architecture takes them
        if (not torch.is_grad_enabled() or input_ids is None or attention_mask is None or len(input_ids) <= size
                or any(kwargs.get(name) not in (None, False) for name in PLAIN_ONLY)
                or not _right_padded(attention_mask)):
            return plain(input_ids=input_ids, attention_mask=attention_mask,
                         **({"token_type_ids": token_type_ids} if types_given else {}), **kwargs)
        lengths = attention_mask.sum(dim=1)
        order = torch.argsort(lengths, descending=True, stable=True)
        parts = []
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            width = int(lengths[rows].max())
            out = plain(input_ids=input_ids[rows, :width], attention_mask=attention_mask[rows, :width],
                        **({"token_type_ids": token_type_ids[rows, :width]} if types_given else {}), **kwargs)
            parts.append(out.logits if hasattr(out, "logits") else out[0])
        logits = torch.cat(parts)[torch.argsort(order)]  # back in the loss's order
        return (logits,) if kwargs.get("return_dict") is False else SequenceClassifierOutput(logits=logits)

    return forward_in_buckets


def _right_padded(mask: torch.Tensor) -> bool:
    """Whether every row of `mask` is ones then zeros (so cutting columns off the right drops only padding)."""
    lengths = mask.sum(dim=1, keepdim=True)
    return bool((mask.bool() == (torch.arange(mask.shape[1], device=mask.device) < lengths)).all())
