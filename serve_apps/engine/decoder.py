"""One lean decoder layer over a flat token batch for every family: fused projections, one attention call.

Computes what Hugging Face's decoder layers compute (same math and dtype handling: RMSNorm in float32,
rotary embedding, grouped-query attention, gated MLP), but on a flat [T, H] token tensor with q/k/v and
gate/up fused into one matrix each, so a decode step costs 4 matrix products per layer and a few
element-wise ops rather than 7 products and the module machinery around them (measured on SmolLM2-135M,
one thread: see docs/benchmarks.md). The families differ only in the switches of their `Architecture`
(serve_apps.engine.architectures): projection biases (added after the projection, so low-bit copies keep
working), per-head q/k norms (Qwen3, Gemma 3), Gemma's (1 + w) norms and the two extra "sandwich" norms,
the activation, the attention form per layer (scale, sliding window, soft-cap) and its rope table, and
partial rotary (Phi). Attention is delegated to an `Attention` (the slot KV cache while serving, plain
causal attention for cache-free traces).
"""

from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from serve_apps.engine.architectures import Architecture, architecture_of
from serve_apps.engine.attention import LLAMA, AttentionForm, attend, window_mask
from serve_apps.engine.quant import LowBitWeight, project, quantize

PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
BIASES = {name: name.removesuffix("_proj") + "_bias" for name in PROJECTIONS}


class Attention(Protocol):
    """Attends each token's query to its sequence's keys; stores the new keys/values where it keeps any."""

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, form: AttentionForm = LLAMA
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D] (rotary applied) -> attention output [T, Hq * D]."""
        ...


Tables = dict[str, tuple[torch.Tensor, torch.Tensor]]


class Rotary:
    """cos/sin tables of the model's rotary embedding per rope key (Gemma 3 has a local and a global one)."""

    def __init__(self, config: PretrainedConfig, arch: Architecture | None = None) -> None:
        arch = arch or architecture_of(config)
        self._inv_freq: dict[str, tuple[torch.Tensor, float]] = {}
        for key, params in arch.rope:
            rope_type = params.get("rope_type", "default")
            layer_type = key if arch.family.rope_per_layer_type else None
            if rope_type == "default":
                dim = int(arch.head_dim * params.get("partial_rotary_factor", 1.0))
                base = float(params["rope_theta"])
                inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
                self._inv_freq[key] = (inv, 1.0)
            else:
                inv, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), layer_type=layer_type)
                self._inv_freq[key] = (inv, float(scaling))

    def to(self, device: torch.device) -> None:
        """Keep the inverse frequencies on the stage's device (the tables are computed there per step)."""
        self._inv_freq = {key: (inv.to(device), scaling) for key, (inv, scaling) in self._inv_freq.items()}

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> Tables:
        """positions [T] long -> per rope key (cos, sin) [T, 1, rotary dim] in `dtype`, broadcastable over heads."""
        out = {}
        for key, (inv, scaling) in self._inv_freq.items():
            freqs = positions.float().view(-1, 1) * inv.view(1, -1)
            emb = torch.cat((freqs, freqs), dim=-1)
            out[key] = ((emb.cos() * scaling).to(dtype).unsqueeze(1), (emb.sin() * scaling).to(dtype).unsqueeze(1))
        return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: normalised in float32, cast back, then scaled (as `LlamaRMSNorm`)."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return weight * normed.to(x.dtype)


def gemma_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm: normalised and scaled by (1 + w) in float32, then cast back (`Gemma2RMSNorm`)."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    return (normed * (1.0 + weight.float())).to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] rotated by position (the rotate-half form these checkpoints use); only the first
    cos.shape[-1] dims rotate where the rotary is partial (Phi's partial_rotary_factor)."""
    dim = cos.shape[-1]
    if dim != x.shape[-1]:
        return torch.cat((apply_rotary(x[..., :dim], cos, sin), x[..., dim:]), dim=-1)
    half = dim // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class DecoderLayer(nn.Module):
    """One decoder layer of any supported family, with fused q/k/v and gate/up weights."""

    def __init__(self, arch: Architecture, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        hidden, inter = arch.hidden_size, arch.intermediate_size
        self.num_heads, self.num_kv_heads, self.head_dim = arch.num_heads, arch.num_kv_heads, arch.head_dim
        self.eps = arch.eps
        self.norm = gemma_rms_norm if arch.gemma_norms else rms_norm
        self.sandwich = arch.gemma_norms  # norms after attention and after the MLP too
        self.activation = (
            F.silu if arch.activation == "silu" else lambda x: F.gelu(x, approximate="tanh")  # noqa: E731
        )
        kind = arch.layers[layer_idx]
        self.rope = kind.rope
        scale = None if arch.scaling == arch.head_dim**-0.5 else arch.scaling  # None: SDPA's own default
        self.form = AttentionForm(scale, kind.sliding_window, arch.attn_softcap)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.input_layernorm = nn.Parameter(torch.empty(hidden))
        self.qkv_proj = nn.Parameter(torch.empty(q_size + 2 * kv_size, hidden))
        self.o_proj = nn.Parameter(torch.empty(hidden, q_size))
        self.post_attention_layernorm = nn.Parameter(torch.empty(hidden))
        self.gate_up_proj = nn.Parameter(torch.empty(2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(hidden, inter))
        sizes = {"qkv_proj": (arch.qkv_bias, q_size + 2 * kv_size), "o_proj": (arch.o_bias, hidden)}
        sizes |= {"gate_up_proj": (arch.mlp_bias, 2 * inter), "down_proj": (arch.mlp_bias, hidden)}
        self.biases = tuple(name for name, (present, _) in sizes.items() if present)
        for name in self.biases:
            self.register_parameter(BIASES[name], nn.Parameter(torch.empty(sizes[name][1])))
        if arch.qk_norm:
            self.q_norm = nn.Parameter(torch.empty(self.head_dim))
            self.k_norm = nn.Parameter(torch.empty(self.head_dim))
        if self.sandwich:
            self.pre_feedforward_layernorm = nn.Parameter(torch.empty(hidden))
            self.post_feedforward_layernorm = nn.Parameter(torch.empty(hidden))
        self.qk_norm = arch.qk_norm
        self.low_bit: dict[str, LowBitWeight] = {}  # packed copies for small batches (see quant.py)
        self.low_bit_max_rows = 0

    def quantize(self, kind: str, max_rows: int) -> None:
        """Keep int4/int8 copies of the projections, used for calls of at most `max_rows` tokens."""
        packed = {name: quantize(getattr(self, name), kind) for name in PROJECTIONS}  # type: ignore[arg-type]
        self.low_bit = {name: low for name, low in packed.items() if low is not None}
        self.low_bit_max_rows = max_rows

    def _project(self, x: torch.Tensor, name: str) -> torch.Tensor:
        out = project(x, getattr(self, name), self.low_bit.get(name), self.low_bit_max_rows)
        return out + getattr(self, BIASES[name]) if name in self.biases else out

    def forward(self, x: torch.Tensor, tables: Tables, attention: Attention) -> torch.Tensor:
        """x [T, H] -> [T, H]."""
        tokens = x.shape[0]
        cos, sin = tables[self.rope]
        qkv = self._project(self.norm(x, self.input_layernorm, self.eps), "qkv_proj")
        rotated = self.split[0] + self.split[1]  # q and k sit side by side: one rotary call for both
        qk = qkv[:, :rotated].view(tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            qk = torch.cat(
                (
                    self.norm(qk[:, : self.num_heads], self.q_norm, self.eps),
                    self.norm(qk[:, self.num_heads :], self.k_norm, self.eps),
                ),
                dim=1,
            )
        qk = apply_rotary(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, rotated:].view(tokens, self.num_kv_heads, self.head_dim)
        attended = self._project(attention.attend(self.layer_idx, q, k, v, self.form), "o_proj")
        if self.sandwich:
            x = x + self.norm(attended, self.post_attention_layernorm, self.eps)
            gate, up = self._project(self.norm(x, self.pre_feedforward_layernorm, self.eps), "gate_up_proj").chunk(
                2, -1
            )
            return x + self.norm(
                self._project(self.activation(gate) * up, "down_proj"), self.post_feedforward_layernorm, self.eps
            )
        x = x + attended
        gate, up = self._project(self.norm(x, self.post_attention_layernorm, self.eps), "gate_up_proj").chunk(2, dim=-1)
        return x + self._project(self.activation(gate) * up, "down_proj")


def fuse_layer_tensors(hf: dict[str, torch.Tensor], arch: Architecture) -> dict[str, torch.Tensor]:
    """One layer's Hugging Face tensors (names relative to the layer, see `layer_tensor_names`) -> this
    layer's parameters."""
    fused_checkpoint = arch.family.fused_checkpoint
    out = {
        "qkv_proj": hf["self_attn.qkv_proj.weight"]
        if fused_checkpoint
        else torch.cat([hf[f"self_attn.{p}_proj.weight"] for p in "qkv"]),
        "o_proj": hf["self_attn.o_proj.weight"],
        "gate_up_proj": hf["mlp.gate_up_proj.weight"]
        if fused_checkpoint
        else torch.cat([hf["mlp.gate_proj.weight"], hf["mlp.up_proj.weight"]]),
        "down_proj": hf["mlp.down_proj.weight"],
    }
    if arch.qkv_bias:
        out["qkv_bias"] = torch.cat([hf[f"self_attn.{p}_proj.bias"] for p in "qkv"])
    if arch.o_bias:
        out["o_bias"] = hf["self_attn.o_proj.bias"]
    if arch.mlp_bias:
        out["gate_up_bias"] = torch.cat([hf["mlp.gate_proj.bias"], hf["mlp.up_proj.bias"]])
        out["down_bias"] = hf["mlp.down_proj.bias"]
    if arch.qk_norm:
        out["q_norm"], out["k_norm"] = hf["self_attn.q_norm.weight"], hf["self_attn.k_norm.weight"]
    norms = ["input_layernorm", "post_attention_layernorm"]
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if arch.gemma_norms else []
    out.update({name: hf[f"{name}.weight"] for name in norms})
    return out


class CausalAttention:
    """Plain causal attention over one sequence held entirely in the batch (no cache): for traces."""

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, form: AttentionForm = LLAMA
    ) -> torch.Tensor:
        tokens = q.shape[0]
        windowed = form.sliding_window is not None and tokens > form.sliding_window
        positions = torch.arange(tokens, device=q.device)
        mask = window_mask(positions, tokens, form.sliding_window) if windowed else None
        out = attend(
            q.transpose(0, 1).unsqueeze(0),
            k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0),
            mask,
            mask is None,
            form,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1).reshape(tokens, -1)
