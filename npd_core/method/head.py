"""The LM head a chunk of positions at a time, so no tokens × vocabulary logits exist at once.

At a 151,936-token vocabulary the float32 logits of one 16 k-token micro-batch take 9.7 GB, yet
the learner's loss and the score stage read them only at response positions and one row at a
time (a log-normaliser, a gather, a top-k). So the decoder runs to its last hidden state and the
head turns ``chunk`` positions into logits at a time: memory O(chunk × V), not O(tokens × V).
With gradients, each chunk is an activation checkpoint: its logits are freed after the forward
and recomputed in the backward, one chunk at a time (one more head matmul per response token,
bar the last chunk's).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from npd_core.models import autocast

# config fields of models whose logits are more than the head's matmul: Gemma's tanh cap (any
# value), Cohere's and Granite's scales (other than 1); those models take the full-logits path
LOGIT_CAPS = ("final_logit_softcapping",)
LOGIT_SCALES = ("logit_scale", "logits_scaling")


def chunkable(model: PreTrainedModel) -> bool:
    """Whether the model's logits are its linear output embedding of its last hidden state and
    nothing more (Qwen2, Llama, Mistral, …), so they may be computed chunk by chunk; any other
    module that returns ``.logits`` is scored from them whole."""
    cfg = model.config
    plain = all(getattr(cfg, name, None) is None for name in LOGIT_CAPS) and all(
        getattr(cfg, name, None) in (None, 1) for name in LOGIT_SCALES
    )
    head = getattr(model, "get_output_embeddings", lambda: None)()
    return plain and isinstance(head, nn.Linear) and hasattr(model, "base_model")


def head_inputs(
    model: PreTrainedModel, inputs: dict[str, torch.Tensor], bf16: bool
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Forward ``inputs`` up to what the logits are computed from, chunk by chunk: the last
    hidden state (B, T, H) and the LM head as a function (c, H) → (c, V), both under bf16
    autocast when asked (as the model's own forward). A model that is not :func:`chunkable`
    gives its full logits (B, T, V) and the identity instead."""
    dev = next(model.parameters()).device
    with autocast(bf16, dev):
        if not chunkable(model):
            return model(**inputs, use_cache=False).logits, lambda z: z
        hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()

    def logits(h: torch.Tensor) -> torch.Tensor:
        with autocast(bf16, dev):
            return head(h)

    return hidden, logits


def chunks(n: int, size: int) -> list[slice]:
    """Slices of ``size`` positions covering ``n``; one empty slice when ``n`` is 0 (an empty
    batch still gets a loss connected to the weights)."""
    return [slice(s, min(s + size, n)) for s in range(0, max(n, 1), size)]


def chunked_rows(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    fn: Callable[[torch.Tensor, slice], torch.Tensor],
    size: int,
) -> torch.Tensor:
    """``fn(head(hidden[s]), s)`` for each chunk ``s`` of ``size`` rows, concatenated.

    ``hidden`` (M, H); ``fn`` maps a chunk's logits (c, V) and its rows to one value per row
    (c,). Returns (M,). Under autograd every chunk but the last is a non-reentrant checkpoint,
    so the backward holds one chunk's logits and their gradient at a time, as the forward does:
    the last chunk keeps its graph, and autograd runs it first (the newest nodes go first), so
    one chunk's recomputation is saved and a batch of one chunk recomputes nothing.
    """
    parts = chunks(hidden.shape[0], size)
    out = []
    for i, s in enumerate(parts):

        def rows(h: torch.Tensor, s: slice = s) -> torch.Tensor:
            return fn(head(h), s)

        if torch.is_grad_enabled() and i < len(parts) - 1:
            out.append(checkpoint(rows, hidden[s], use_reentrant=False, preserve_rng_state=False))
        else:
            out.append(rows(hidden[s]))
    return torch.cat(out)
