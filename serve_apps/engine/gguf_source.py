"""A stage's low-bit copies taken from its GGUF's own blocks, and what it says about them (`describe`).

A model materialised from a GGUF carries `gguf/` (cluster.models.gguf_weights): each tensor's source type
and, for the types the kernels hold exactly (Q4_0, Q4_1, Q4_K -> int4; Q8_0 -> int8_g32), its blocks.
With such a model the source type decides each projection's copy, whatever kind the stage was asked for:
a fused projection (q/k/v, gate/up) gets one when all its parts share one layout, else it stays dense
(Q5_K, Q6_K, F16, BF16 ... and mixed fusions), and `summary` lists why.
"""

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cluster.models.gguf_weights import read_blocks, read_index
from serve_apps.engine.quant import LowBitWeight, int4_from_blocks, int8_g32_from_blocks

# The stage's fused parameters and the checkpoint tensors they are stacked from (serve_apps.engine.decoder).
FUSED_PARTS = {
    "qkv_proj": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
    "o_proj": ("self_attn.o_proj.weight",),
    "gate_up_proj": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "down_proj": ("mlp.down_proj.weight",),
}
# Families whose checkpoints hold them fused already (Phi-3): one tensor, one GGUF type.
FUSED_CHECKPOINT = {"qkv_proj": "self_attn.qkv_proj.weight", "gate_up_proj": "mlp.gate_up_proj.weight"}


@dataclass(slots=True)
class SourceWeights:
    """The `gguf/` index of one model directory; builds copies from its blocks and keeps the stage's tally."""

    model_dir: Path
    types: dict[str, str]
    low_bit: dict[str, str]
    fallback: dict[str, str]
    stage_tensors: list[str] = field(default_factory=list)  # the checkpoint tensors this stage holds
    dense: list[str] = field(default_factory=list)  # "<stage parameter>: why it stays dense"

    @classmethod
    def load(cls, model_dir: Path) -> "SourceWeights | None":
        index = read_index(model_dir)
        if index is None:
            return None
        return cls(model_dir, dict(index["types"]), dict(index["low_bit"]), dict(index["dense_fallback"]))

    def copy_for(self, parameter: str, parts: list[str], dtype: torch.dtype) -> LowBitWeight | None:
        """The packed copy of the rows of `parts` stacked (a fused parameter), None (and the reason noted)."""
        kinds = {self.low_bit.get(name) for name in parts}
        if None in kinds or len(kinds) != 1:
            reasons = sorted({self._why(name) for name in parts if name not in self.low_bit})
            why = "; ".join(reasons) if reasons else "its parts have different low-bit layouts"
            self.dense.append(f"{parameter}: {why}")
            return None
        kind = kinds.pop()
        blocks = [read_blocks(self.model_dir, name, kind) for name in parts]  # type: ignore[arg-type]
        q = torch.from_numpy(_rows([b.q for b in blocks]))
        scale = torch.from_numpy(_rows([b.scale for b in blocks]))
        zero = torch.from_numpy(_rows([b.zero for b in blocks]))
        return int4_from_blocks(q, scale, zero, dtype) if kind == "int4" else int8_g32_from_blocks(q, scale, dtype)

    def layer_parts(self, layer: int) -> dict[str, list[str]]:
        """Fused parameter -> the checkpoint names of decoder layer `layer` it is stacked from."""
        parts = layer_parts(layer)
        for fused, name in FUSED_CHECKPOINT.items():
            if f"model.layers.{layer}.{name}" in self.types:
                parts[fused] = [f"model.layers.{layer}.{name}"]
        return parts

    def _why(self, name: str) -> str:
        return f"{self.types.get(name, 'unknown')} ({self.fallback.get(name, 'no blocks')})"

    def stage_types(self) -> dict[str, int]:
        """GGUF type -> how many of this stage's checkpoint tensors have it."""
        return dict(Counter(self.types.get(name, "unknown") for name in self.stage_tensors))


def weights_summary(source: SourceWeights | None, copies: list[LowBitWeight], quantized: bool) -> dict[str, object]:
    """The `"weights"` entry of a stage's description: its tensors' GGUF types (empty unless the model came
    from a GGUF), its packed copies by kind, and why the tensors without one stay dense."""
    fallback = list(source.dense) if source is not None and quantized else []
    if not quantized:
        fallback = ["low-bit copies off (weight_quant none): every matrix dense"]
    return {
        "gguf_types": source.stage_types() if source is not None else {},
        "low_bit": dict(Counter(copy.kind for copy in copies)),
        "dense_fallback": fallback,
    }


def _rows(arrays: list) -> object:  # type: ignore[type-arg]
    import numpy as np

    return np.ascontiguousarray(np.concatenate(arrays, axis=0))


def layer_parts(layer: int) -> dict[str, list[str]]:
    """Fused parameter -> checkpoint names of decoder layer `layer`."""
    return {fused: [f"model.layers.{layer}.{part}" for part in parts] for fused, parts in FUSED_PARTS.items()}
