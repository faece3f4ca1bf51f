"""The cache-free forward of one stage over a whole token history (what a trace and the referee run),
and the activation fingerprint of its output.

No KV cache, no batching: position ids 0..T-1 and SDPA's causal mask (attention_mask=None), so the
result depends only on the stage's weights and its input, never on what else the stage is serving.
The fingerprint is a fixed random projection of the output, small enough to ship: every process builds
the same projection (fixed seed), so two pipelines computing the same activations produce the same
fingerprint up to float noise, and a perturbed stage moves it far.
"""

import math

import torch

from serve_apps.engine.stage_model import StageModel

FINGERPRINT_SEED = 0x5EED


def projection(hidden_size: int, dims: int, seed: int = FINGERPRINT_SEED) -> torch.Tensor:
    """[hidden_size, dims] Gaussian matrix, scaled so a projected unit vector has unit variance."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(hidden_size, dims, generator=generator, dtype=torch.float32) / math.sqrt(hidden_size)


def fingerprint(hidden: torch.Tensor, dims: int) -> tuple[float, ...]:
    """Project every position of `hidden` ([..., H]) onto `dims` fixed directions; flattened."""
    flat = hidden.detach().to(torch.float32).reshape(-1, hidden.shape[-1])
    return tuple(float(x) for x in (flat @ projection(hidden.shape[-1], dims)).flatten())


@torch.inference_mode()
def trace_forward(model: StageModel, inputs: torch.Tensor) -> torch.Tensor:
    """Token ids [1, T] (first stage) or hidden states [1, T, H] in; hidden states [1, T, H] out
    (final-normed on the last stage)."""
    return model.forward_full(inputs[0]).unsqueeze(0)


def stage_trace(model: StageModel, inputs: torch.Tensor, dims: int) -> tuple[torch.Tensor, tuple[float, ...]]:
    """The stage's output (for the next stage) and its fingerprint."""
    out = trace_forward(model, inputs)
    return out, fingerprint(out, dims)
