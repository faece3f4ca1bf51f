"""The model families the sharded engine serves, each a small declarative difference from one decoder.

A family is a `Family` of fixed traits (what its checkpoints look like, which norm form it uses); with a
Hugging Face config it resolves to an `Architecture`: every switch the decoder reads (biases, q/k norms,
sliding window and rope per layer, embedding scale, sandwich norms, soft-capping, activation, fused
tensors), so `serve_apps.engine.decoder` has one layer for all of them. The math of each switch follows
transformers' own modeling files (`transformers/models/<family>/modeling_<family>.py`).
"""

from dataclasses import dataclass
from typing import Any, Literal

from transformers import PretrainedConfig

Activation = Literal["silu", "gelu_tanh"]
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # static rope tables (no per-length switch)
_ACTIVATIONS: dict[str, Activation] = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


class UnsupportedArchitecture(ValueError):
    """A checkpoint of a family (or with a switch) the stages do not implement; raised before any weight loads."""


@dataclass(frozen=True, slots=True)
class Family:
    """What is fixed for a family, whatever the checkpoint's config says."""

    name: str
    model_type: str
    architecture: str  # the `architectures` entry of its config.json
    qkv_bias: bool | None = None  # None: read `attention_bias` from the config (Llama, Qwen3)
    o_bias_follows_qkv: bool = True  # Llama's attention_bias puts a bias on o_proj too; Qwen2 has none there
    qk_norm: bool = False  # per-head RMSNorm of q and k before the rotary (Qwen3, Gemma 3)
    gemma_norms: bool = False  # RMSNorm as (1 + w) in float32, four norms a layer, sqrt(hidden) embedding scale
    fused_checkpoint: bool = False  # q/k/v and gate/up stored fused (Phi-3's qkv_proj, gate_up_proj)
    window_per_layer_type: bool = False  # sliding window only on `layer_types` == "sliding_attention"
    rope_per_layer_type: bool = False  # `rope_parameters` keyed by layer type (Gemma 3's local/global bases)


FAMILIES = (
    Family("llama", "llama", "LlamaForCausalLM"),
    Family("mistral", "mistral", "MistralForCausalLM", qkv_bias=False),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", qkv_bias=True, o_bias_follows_qkv=False, window_per_layer_type=True),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", qk_norm=True, window_per_layer_type=True),
    Family("gemma2", "gemma2", "Gemma2ForCausalLM", gemma_norms=True, window_per_layer_type=True),
    Family(
        "gemma3",
        "gemma3_text",
        "Gemma3ForCausalLM",
        qk_norm=True,
        gemma_norms=True,
        window_per_layer_type=True,
        rope_per_layer_type=True,
    ),
    Family("phi3", "phi3", "Phi3ForCausalLM", qkv_bias=False, fused_checkpoint=True),
)
BY_MODEL_TYPE = {family.model_type: family for family in FAMILIES}
SUPPORTED_MODEL_TYPES = tuple(BY_MODEL_TYPE)


def supported_summary() -> str:
    return ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES)


@dataclass(frozen=True, slots=True)
class LayerKind:
    """How one layer attends: its rope table (key into `Architecture.rope`) and window (None: global)."""

    rope: str
    sliding_window: int | None


@dataclass(frozen=True, slots=True)
class Architecture:
    """Every switch of the one decoder, resolved from a config (see `architecture_of`)."""

    family: Family
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    eps: float
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    activation: Activation
    scaling: float  # of q.k (head_dim^-0.5, or Gemma's query_pre_attn_scalar^-0.5)
    attn_softcap: float | None  # scores -> tanh(scores / cap) * cap before the softmax (Gemma 2)
    final_softcap: float | None  # the same on the logits
    embed_scale: float | None  # token embeddings times this (Gemma: sqrt(hidden), rounded to the dtype)
    tied_embeddings: bool
    layers: tuple[LayerKind, ...]
    rope: tuple[tuple[str, dict[str, Any]], ...]  # (key, rope parameters) per distinct table

    @property
    def qk_norm(self) -> bool:
        return self.family.qk_norm

    @property
    def gemma_norms(self) -> bool:
        return self.family.gemma_norms

    def rope_parameters(self, key: str) -> dict[str, Any]:
        return dict(self.rope)[key]


def family_of(config: PretrainedConfig) -> Family:
    """The config's family, or UnsupportedArchitecture naming the supported ones."""
    family = BY_MODEL_TYPE.get(str(getattr(config, "model_type", "")))
    declared = tuple(getattr(config, "architectures", None) or ())
    causal = not declared or any(name.endswith("ForCausalLM") for name in declared)  # not a classifier head
    if family is None or not causal:
        what = f"model_type {getattr(config, 'model_type', None)!r}" + (f" ({', '.join(declared)})" if declared else "")
        raise UnsupportedArchitecture(
            f"{what} is not supported by the sharded engine; supported: {supported_summary()}"
        )
    return family


def architecture_of(config: PretrainedConfig) -> Architecture:
    """Resolve the decoder's switches from a Hugging Face config; UnsupportedArchitecture where it cannot."""
    family = family_of(config)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    attention_bias = bool(getattr(config, "attention_bias", False))
    qkv_bias = attention_bias if family.qkv_bias is None else family.qkv_bias
    act_name = str(getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu"))
    if act_name not in _ACTIVATIONS:
        raise UnsupportedArchitecture(f"activation {act_name!r} is not supported (supported: {sorted(_ACTIVATIONS)})")
    pre_attn = getattr(config, "query_pre_attn_scalar", None) if family.gemma_norms else None
    layers, rope = _layers_and_rope(config, family)
    return Architecture(
        family=family,
        hidden_size=int(config.hidden_size),
        intermediate_size=int(config.intermediate_size),
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab_size=int(config.vocab_size),
        eps=float(config.rms_norm_eps),
        qkv_bias=qkv_bias,
        o_bias=qkv_bias and family.o_bias_follows_qkv,
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        activation=_ACTIVATIONS[act_name],
        scaling=float(pre_attn if pre_attn is not None else head_dim) ** -0.5,
        attn_softcap=_positive(getattr(config, "attn_logit_softcapping", None)),
        final_softcap=_positive(getattr(config, "final_logit_softcapping", None)),
        embed_scale=float(config.hidden_size) ** 0.5 if family.gemma_norms else None,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        layers=layers,
        rope=rope,
    )


def _positive(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and value > 0 else None


def _layers_and_rope(
    config: PretrainedConfig, family: Family
) -> tuple[tuple[LayerKind, ...], tuple[tuple[str, dict[str, Any]], ...]]:
    count = int(config.num_hidden_layers)
    window = getattr(config, "sliding_window", None)
    window = int(window) if window else None
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * count)
    if len(types) != count or not set(types) <= {"full_attention", "sliding_attention"}:
        raise UnsupportedArchitecture(f"layer_types {sorted(set(types))} are not supported")
    params = dict(getattr(config, "rope_parameters", None) or {})
    if family.rope_per_layer_type:
        tables = {kind: dict(params[kind]) for kind in sorted(set(types))}
    else:
        tables = {"global": params}
    for kind, table in tables.items():
        if table.get("rope_type", "default") not in ROPE_TYPES:
            raise UnsupportedArchitecture(
                f"rope type {table.get('rope_type')!r} ({kind}) is not supported (supported: {ROPE_TYPES})"
            )
    kinds = []
    for kind in types:
        sliding = window if (kind == "sliding_attention" or not family.window_per_layer_type) else None
        kinds.append(LayerKind(kind if family.rope_per_layer_type else "global", sliding))
    return tuple(kinds), tuple(sorted(tables.items()))


def layer_tensor_names(arch: Architecture) -> tuple[str, ...]:
    """One layer's checkpoint tensor names (relative to `model.layers.<i>.`) for the family."""
    if arch.family.fused_checkpoint:
        attn = ["self_attn.qkv_proj.weight"]
        mlp = ["mlp.gate_up_proj.weight"]
    else:
        attn = [f"self_attn.{p}_proj.weight" for p in "qkv"]
        attn += [f"self_attn.{p}_proj.bias" for p in "qkv"] if arch.qkv_bias else []
        mlp = ["mlp.gate_proj.weight", "mlp.up_proj.weight"]
        mlp += ["mlp.gate_proj.bias", "mlp.up_proj.bias"] if arch.mlp_bias else []
    attn += ["self_attn.o_proj.weight"] + (["self_attn.o_proj.bias"] if arch.o_bias else [])
    attn += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"] if arch.qk_norm else []
    mlp += ["mlp.down_proj.weight"] + (["mlp.down_proj.bias"] if arch.mlp_bias else [])
    norms = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    norms += ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"] if arch.gemma_norms else []
    return (*attn, *mlp, *norms)
