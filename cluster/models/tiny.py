"""Tiny models built from a config in code: the test models, one per family the sharded engine serves.

`tiny_llama_config` is shaped like SmolLM2; each `tiny_<family>_config` is its family's own config class
with the switches real checkpoints of that family set (biases, q/k norms, sliding windows smaller than a
test sequence, soft-caps, interleaved layer types, fused projections), at a few layers and a small hidden.
"""

from typing import Any

from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

TINY_WINDOW = 8  # sliding window of the windowed families: smaller than the tests' sequences


def _common(vocab_size: int, num_layers: int, hidden_size: int) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "initializer_range": 0.2,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }


def tiny_llama_config(vocab_size: int = 49152, num_layers: int = 6, hidden_size: int = 64) -> LlamaConfig:
    """A Llama small enough to run in milliseconds, shaped like SmolLM2 (GQA, tied embeddings)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def tiny_llama3_config(vocab_size: int = 49152, num_layers: int = 4, hidden_size: int = 64) -> LlamaConfig:
    """Llama 3.x: `rope_scaling` of type llama3 (Llama 3.1/3.2's factors, scaled to a short context)."""
    return LlamaConfig(
        **_common(vocab_size, num_layers, hidden_size),
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    )


def tiny_qwen2_config(vocab_size: int = 49152, num_layers: int = 4, hidden_size: int = 64) -> Qwen2Config:
    """Qwen2/2.5: q/k/v biases (none on o_proj), rope base 1e6, untied head."""
    return Qwen2Config(
        **_common(vocab_size, num_layers, hidden_size),
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=False,
    )


def tiny_qwen3_config(vocab_size: int = 49152, num_layers: int = 4, hidden_size: int = 64) -> Qwen3Config:
    """Qwen3: per-head q/k RMSNorm, explicit head_dim (not hidden / heads), tied embeddings."""
    return Qwen3Config(
        **_common(vocab_size, num_layers, hidden_size),
        head_dim=32,
        rms_norm_eps=1e-6,
        attention_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True,
    )


def tiny_mistral_config(vocab_size: int = 49152, num_layers: int = 4, hidden_size: int = 64) -> MistralConfig:
    """Mistral: a sliding window on every layer (here smaller than a test sequence)."""
    return MistralConfig(
        **_common(vocab_size, num_layers, hidden_size),
        head_dim=hidden_size // 4,
        rms_norm_eps=1e-5,
        sliding_window=TINY_WINDOW,
        tie_word_embeddings=False,
    )


def tiny_gemma2_config(vocab_size: int = 49152, num_layers: int = 4, hidden_size: int = 64) -> Gemma2Config:
    """Gemma 2: (1 + w) norms, four a layer, sqrt(hidden) embedding scale, GELU-tanh, query_pre_attn_scalar,
    attention and final logit soft-capping, sliding and global layers alternating."""
    return Gemma2Config(
        **_common(vocab_size, num_layers, hidden_size),
        head_dim=16,
        query_pre_attn_scalar=24,
        rms_norm_eps=1e-6,
        sliding_window=TINY_WINDOW,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    )


def tiny_gemma3_config(vocab_size: int = 49152, num_layers: int = 4, hidden_size: int = 64) -> Gemma3TextConfig:
    """Gemma 3 (text): Gemma 2's norms plus (1 + w) q/k norms, local (sliding, base 1e4) and global (base 1e6,
    linear scaling) rope, two sliding layers per global one here (real checkpoints: five)."""
    layer_types = ["full_attention" if (i + 1) % 3 == 0 else "sliding_attention" for i in range(num_layers)]
    return Gemma3TextConfig(
        **_common(vocab_size, num_layers, hidden_size),
        head_dim=16,
        query_pre_attn_scalar=16,
        rms_norm_eps=1e-6,
        sliding_window=TINY_WINDOW,
        layer_types=layer_types,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
        },
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    )


def tiny_phi3_config(vocab_size: int = 49152, num_layers: int = 4, hidden_size: int = 64) -> Phi3Config:
    """Phi-3: fused qkv_proj and gate_up_proj in the checkpoint, partial rotary (Phi-4-mini's 0.75), a window."""
    return Phi3Config(
        **_common(vocab_size, num_layers, hidden_size),
        rms_norm_eps=1e-5,
        sliding_window=TINY_WINDOW,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        tie_word_embeddings=False,
    )
