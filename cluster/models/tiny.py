"""A tiny Llama built from a config in code: the test model (same architecture as SmolLM2)."""

from transformers import LlamaConfig


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
