"""A lean Llama decoder layer over a flat token batch: fused projections, one attention call per group.

Computes what Hugging Face's `LlamaDecoderLayer` computes (same math and dtype handling: RMSNorm in
float32, rotary embedding, grouped-query attention, SiLU-gated MLP), but on a flat [T, H] token tensor
with q/k/v and gate/up fused into one matrix each, so a decode step costs 4 matrix products per layer
and a few element-wise ops rather than 7 products and the module machinery around them (measured on
SmolLM2-135M, one thread: 71 ms -> see docs/benchmarks.md). Attention is delegated to an `Attention`
(the slot KV cache while serving, plain causal attention for cache-free traces).
"""

from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F
from transformers import LlamaConfig

from serve_apps.engine.quant import LowBitWeight, project, quantize

PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class Attention(Protocol):
    """Attends each token's query to its sequence's keys; stores the new keys/values where it keeps any."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (rotary applied) -> attention output [T, Hq * D]."""
        ...


class Rotary:
    """cos/sin tables of the model's rotary embedding (its rope type and scaling), per token position."""

    def __init__(self, config: LlamaConfig) -> None:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self._embedding = LlamaRotaryEmbedding(config)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] long -> (cos, sin) [T, 1, D] in `dtype`, broadcastable over heads."""
        probe = torch.empty(0, dtype=dtype)
        cos, sin = self._embedding(probe, position_ids=positions.view(1, -1))
        return cos[0].unsqueeze(1), sin[0].unsqueeze(1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalised in float32, cast back, then scaled (as `LlamaRMSNorm`)."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by position (the rotate-half form Llama checkpoints use)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    """One Llama decoder layer with fused q/k/v and gate/up weights."""

    def __init__(self, config: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        hidden, inter = config.hidden_size, config.intermediate_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or hidden // self.num_heads
        self.eps = config.rms_norm_eps
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.input_layernorm = nn.Parameter(torch.empty(hidden))
        self.qkv_proj = nn.Parameter(torch.empty(q_size + 2 * kv_size, hidden))
        self.o_proj = nn.Parameter(torch.empty(hidden, q_size))
        self.post_attention_layernorm = nn.Parameter(torch.empty(hidden))
        self.gate_up_proj = nn.Parameter(torch.empty(2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(hidden, inter))
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ValueError("Llama checkpoints with projection biases are not supported")
        self.low_bit: dict[str, LowBitWeight] = {}  # packed copies for small batches (see quant.py)
        self.low_bit_max_rows = 0

    def quantize(self, kind: str, max_rows: int) -> None:
        """Keep int4/int8 copies of the projections, used for calls of at most `max_rows` tokens."""
        packed = {name: quantize(getattr(self, name), kind) for name in PROJECTIONS}  # type: ignore[arg-type]
        self.low_bit = {name: low for name, low in packed.items() if low is not None}
        self.low_bit_max_rows = max_rows

    def _project(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return project(x, getattr(self, name), self.low_bit.get(name), self.low_bit_max_rows)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attention: Attention) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        tokens = x.shape[0]
        qkv = self._project(rms_norm(x, self.input_layernorm, self.eps), "qkv_proj")
        rotated = self.split[0] + self.split[1]  # q and k sit side by side: one rotary call for both
        qk = apply_rotary(qkv[:, :rotated].view(tokens, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, rotated:].view(tokens, self.num_kv_heads, self.head_dim)
        x = x + self._project(attention.attend(self.layer_idx, q, k, v), "o_proj")
        gate, up = self._project(rms_norm(x, self.post_attention_layernorm, self.eps), "gate_up_proj").chunk(2, dim=-1)
        return x + self._project(F.silu(gate) * up, "down_proj")


def fuse_layer_tensors(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One layer's Hugging Face tensors (names relative to the layer) -> this layer's parameters."""
    return {
        "input_layernorm": hf["input_layernorm.weight"],
        "qkv_proj": torch.cat(
            [hf["self_attn.q_proj.weight"], hf["self_attn.k_proj.weight"], hf["self_attn.v_proj.weight"]]
        ),
        "o_proj": hf["self_attn.o_proj.weight"],
        "post_attention_layernorm": hf["post_attention_layernorm.weight"],
        "gate_up_proj": torch.cat([hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"]]),
        "down_proj": hf["mlp.down_proj.weight"],
    }


class CausalAttention:
    """Plain causal attention over one sequence held entirely in the batch (no cache): for traces."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            is_causal=True,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1).reshape(q.shape[0], -1)
