"""The cache-free forward of one stage over a whole token history (what a trace and the referee run).

No KV cache, no batching: position ids 0..T-1 and SDPA's causal mask (attention_mask=None), so the
result depends only on the stage's weights and its input, never on what else the stage is serving.
"""

import torch
from torch import nn

from serve_apps.engine.stage_model import StageModel
from serve_apps.verification.fingerprint import fingerprint


@torch.inference_mode()
def trace_forward(model: StageModel, rotary: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Token ids [1, T] (first stage) or hidden states [1, T, H] in; hidden states [1, T, H] out
    (final-normed on the last stage)."""
    hidden = model.embed_tokens(inputs) if model.embed_tokens is not None else inputs
    position_ids = torch.arange(hidden.shape[1], dtype=torch.long).view(1, -1)
    position_embeddings = rotary(hidden, position_ids=position_ids)
    for layer in model.layers:
        out = layer(
            hidden,
            attention_mask=None,
            position_ids=position_ids,
            past_key_values=None,
            position_embeddings=position_embeddings,
        )
        hidden = out[0] if isinstance(out, tuple) else out
    return model.norm(hidden) if model.norm is not None else hidden


def stage_trace(
    model: StageModel, rotary: nn.Module, inputs: torch.Tensor, dims: int
) -> tuple[torch.Tensor, tuple[float, ...]]:
    """The stage's output (for the next stage) and its fingerprint."""
    out = trace_forward(model, rotary, inputs)
    return out, fingerprint(out, dims)
