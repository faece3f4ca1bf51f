"""A Llama-family model's per-layer memory and compute, measured on the meta device (no weights)."""

from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from cluster.network.placement import ModelCost


def model_cost_from_config(
    config: PretrainedConfig, dtype: torch.dtype = torch.float32, kv_tokens: int = 0
) -> ModelCost:
    """Bytes of one decoder layer (built on meta), the embedding, norm + lm_head, and `kv_tokens` of KV
    cache per layer. The lm_head is counted even when tied: each stage owns its own tensors."""
    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, layer_idx=0)  # type: ignore[arg-type]  # any Llama-shaped config
    layer_params = sum(p.numel() for p in layer.parameters())
    itemsize = torch.empty((), dtype=dtype).element_size()
    hidden, vocab = config.hidden_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return ModelCost(
        num_layers=config.num_hidden_layers,
        layer_bytes=layer_params * itemsize,
        embed_bytes=vocab * hidden * itemsize,
        head_bytes=(vocab * hidden + hidden) * itemsize,
        kv_bytes_per_layer=2 * kv_heads * head_dim * kv_tokens * itemsize,
        layer_flops_per_token=2.0 * layer_params,
        head_layer_equiv=vocab * hidden / layer_params,
    )


def model_cost_for(model_dir: Path, dtype: str, kv_tokens: int = 0) -> ModelCost:
    """The cost of a materialised Hugging Face directory (its config.json only) in `dtype` ('float32'...)."""
    config = AutoConfig.from_pretrained(model_dir)
    return model_cost_from_config(config, getattr(torch, dtype), kv_tokens)
