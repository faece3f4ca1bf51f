"""The cache-free forward of one stage over a whole token history (what an auditor re-executes), and the
fixed random projection that the audit's commitments rotate a stage's output by.

No KV cache, no batching: position ids 0..T-1 and SDPA's causal mask (attention_mask=None), so the
result depends only on the stage's weights and its input, never on what else the stage is serving.
"""

import math

import torch

from serve_apps.engine.stage_model import StageModel

PROJECTION_SEED = 0x5EED  # every process builds the same matrix: commitments compare across processes


def projection(hidden_size: int, dims: int, seed: int = PROJECTION_SEED) -> torch.Tensor:
    """[hidden_size, dims] Gaussian matrix, scaled so a projected unit vector has unit variance."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(hidden_size, dims, generator=generator, dtype=torch.float32) / math.sqrt(hidden_size)


@torch.inference_mode()
def trace_forward(model: StageModel, inputs: torch.Tensor) -> torch.Tensor:
    """Token ids [1, T] (first stage) or hidden states [1, T, H] in; hidden states [1, T, H] out
    (final-normed on the last stage)."""
    return model.forward_full(inputs[0]).unsqueeze(0)
