"""A decoder model's per-layer memory and compute, measured on the meta device (no weights): layer 0 of the
config's own family (Llama, Qwen2/3, Mistral, Gemma 2/3, Phi-3, ...)."""

import copy
from pathlib import Path
from typing import Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from cluster.config.serving import INT4_GROUP, WeightQuant
from cluster.network.placement import ModelCost

# Packed copies a stage keeps (serve_apps.engine.quant); int8_g32: a GGUF's Q8_0 blocks, as two int4 planes.
LowBitKind = Literal["int8", "int4", "fp16", "int8_g32"]
# FBGEMM packs an fp16 matrix in blocks of 512 inputs, padded: SmolLM2's 49152 x 576 head holds 96 MiB, not
# 54 (resident memory measured per pack for inputs 64, 500, 576, 1024 and 49152).
FBGEMM_FP16_K_BLOCK = 512


def fp16_gemm_available() -> bool:
    """Whether this torch build has FBGEMM (x86) and its packed fp16 GEMM."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16"
    )


def head_copy_kind() -> LowBitKind:
    """The lm_head's packed copy for steps of few rows: fp16 where FBGEMM has its GEMM (bfloat16 values,
    exactly), else int8 rows (a GGUF keeps its embedding at 8 bits)."""
    return "fp16" if fp16_gemm_available() else "int8"


def packed_bytes(rows: int, cols: int, kind: WeightQuant | LowBitKind, itemsize: int) -> int:
    """Bytes of the low-bit copy a stage keeps of a [rows, cols] weight beside the dense one (0: none).

    int4: two values a byte plus a (scale, zero) pair per group of 32 inputs; int8: a byte a value plus a
    scale per row; int8_g32: two int4 planes; scales in the model's dtype; fp16: two bytes a value, inputs
    padded to FBGEMM's block.
    A matrix whose inputs are not whole groups gets no int4 copy.
    """
    if kind == "int4":
        return rows * cols // 2 + (cols // INT4_GROUP) * rows * 2 * itemsize if cols % INT4_GROUP == 0 else 0
    if kind == "int8":
        return rows * cols + rows * itemsize
    if kind == "int8_g32":
        return 2 * packed_bytes(rows, cols, "int4", itemsize)
    if kind == "fp16":
        return rows * _round_up(cols, FBGEMM_FP16_K_BLOCK) * 2
    return 0


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def model_cost_from_config(
    config: PretrainedConfig,
    dtype: torch.dtype = torch.float32,
    kv_tokens: int = 0,
    weight_quant: WeightQuant = "none",
    layer_packed_bytes: int | None = None,
) -> ModelCost:
    """Bytes of one decoder layer (built on meta), the embedding, norm + lm_head, and `kv_tokens` of KV
    cache per layer. The lm_head is counted even when tied: each stage owns its own tensors. With
    `weight_quant`, the packed copies of the layers' projections (`layer_packed_bytes` where known, e.g.
    from a GGUF's own types) and of the lm_head are added."""
    layer = _first_layer(config)
    layer_params = sum(p.numel() for p in layer.parameters())
    itemsize = torch.empty((), dtype=dtype).element_size()
    hidden, vocab = config.hidden_size, config.vocab_size
    matrices = [tuple(p.shape) for p in layer.parameters() if p.dim() == 2]
    layer_packed = sum(packed_bytes(rows, cols, weight_quant, itemsize) for rows, cols in matrices)
    if layer_packed_bytes is not None and weight_quant != "none":
        layer_packed = layer_packed_bytes
    head_packed = packed_bytes(vocab, hidden, head_copy_kind(), itemsize) if weight_quant != "none" else 0
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return ModelCost(
        num_layers=config.num_hidden_layers,
        layer_bytes=layer_params * itemsize + layer_packed,
        embed_bytes=vocab * hidden * itemsize,
        head_bytes=(vocab * hidden + hidden) * itemsize + head_packed,
        kv_bytes_per_layer=2 * kv_heads * head_dim * kv_tokens * itemsize,
        layer_flops_per_token=2.0 * layer_params,
        head_layer_equiv=vocab * hidden / layer_params,
    )


def _first_layer(config: PretrainedConfig) -> torch.nn.Module:
    """Decoder layer 0 of the config's own family (its biases, fused projections and extra norms), built on
    meta from a one-layer copy; a config transformers has no causal LM for is counted as Llama-shaped."""
    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    with torch.device("meta"):
        try:
            # eager: only shapes matter, and some families refuse another attention implementation.
            model = AutoModelForCausalLM.from_config(one, attn_implementation="eager")
            return model.model.layers[0]  # type: ignore[no-any-return]
        except (ValueError, KeyError, AttributeError):
            return LlamaDecoderLayer(config, layer_idx=0)  # type: ignore[arg-type]


def model_cost_for(model_dir: Path, dtype: str, kv_tokens: int = 0, weight_quant: WeightQuant = "none") -> ModelCost:
    """The cost of a materialised Hugging Face directory (its config.json, and a GGUF's gguf/weights.json
    for the kind of each layer's copies) in `dtype` ('float32'...)."""
    config = AutoConfig.from_pretrained(model_dir)
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    packed = gguf_layer_packed_bytes(model_dir, itemsize)
    return model_cost_from_config(config, getattr(torch, dtype), kv_tokens, weight_quant, packed)


def gguf_layer_packed_bytes(model_dir: Path, itemsize: int) -> int | None:
    """The most bytes of low-bit copies one layer of a GGUF-sourced model holds (each tensor's copy follows
    its GGUF type, serve_apps.engine.gguf_source); None for a model without gguf/weights.json."""
    from cluster.models.gguf_weights import read_index

    index = read_index(model_dir)
    if index is None:
        return None
    from safetensors import safe_open

    per_layer: dict[str, int] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                kind = index["low_bit"].get(name)
                if kind is None or not name.startswith("model.layers."):
                    continue
                rows, cols = handle.get_slice(name).get_shape()
                layer = name.split(".")[2]
                per_layer[layer] = per_layer.get(layer, 0) + packed_bytes(rows, cols, kind, itemsize)  # type: ignore[arg-type]
    return max(per_layer.values(), default=0)
