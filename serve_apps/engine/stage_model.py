"""One stage of a Llama-family model: only its decoder layers (plus embedding / norm + lm_head at the ends).

The decoder layers, norm and rotary embedding are Hugging Face's own modules, so a stage computes exactly
what the unsharded model computes; weights are read tensor by tensor from safetensors for this stage only.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, LlamaConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from serve_apps.engine.kv_cache import BatchView, SlotKVCache, attention_mask
from serve_apps.engine.layer_split import StageSpec

SUPPORTED_MODEL_TYPES = ("llama",)


class StageModel(nn.Module):
    """Decoder layers [spec.start, spec.end) of a Llama model; embedding if first, norm + lm_head if last."""

    def __init__(self, config: LlamaConfig, spec: StageSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if spec.first else None
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, layer_idx=i) for i in range(spec.start, spec.end))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps) if spec.last else None
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if spec.last else None

    def forward(self, inputs: torch.Tensor, view: BatchView, cache: SlotKVCache, rotary: nn.Module) -> torch.Tensor:
        """Token ids [B, Q] (first stage) or hidden states [B, Q, H] in; hidden states [B, Q, H] out."""
        hidden = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs
        starts = torch.tensor(view.start_pos, dtype=torch.long).view(-1, 1)
        position_ids = starts + torch.arange(view.q_len, dtype=torch.long).view(1, -1)
        position_embeddings = rotary(hidden, position_ids=position_ids)
        mask = attention_mask(view)
        cache.bind(view)
        for layer in self.layers:
            hidden = layer(
                hidden,
                attention_mask=mask,
                position_ids=position_ids,
                past_key_values=cache,
                position_embeddings=position_embeddings,
            )
        return self.norm(hidden) if self.norm is not None else hidden

    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """lm_head over the final-normed hidden states of the rows' last positions: [B, H] -> [B, V] float32."""
        if self.lm_head is None:
            raise RuntimeError("only the last stage computes logits")
        return self.lm_head(hidden_last).float()


def load_config(model_dir: Path) -> LlamaConfig:
    """The model's config with SDPA attention, validated to be an architecture the stages implement."""
    config = AutoConfig.from_pretrained(model_dir)
    if not isinstance(config, LlamaConfig) or config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model type {config.model_type!r} is not supported (supported: {SUPPORTED_MODEL_TYPES})")
    config._attn_implementation = "sdpa"
    return config


def build_stage(model_dir: Path, spec: StageSpec, dtype: torch.dtype) -> tuple[StageModel, LlamaRotaryEmbedding]:
    """Instantiate the stage on the meta device, then materialise only its own tensors from disk."""
    config = load_config(model_dir)
    with torch.device("meta"):
        model = StageModel(config, spec)
    state = _read_stage_tensors(model_dir, spec, config, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    return model, LlamaRotaryEmbedding(config)


def stage_tensor_names(spec: StageSpec, config: PretrainedConfig) -> dict[str, str]:
    """Map the stage's parameter names to the checkpoint's tensor names (tied lm_head reads the embedding)."""
    names: dict[str, str] = {}
    if spec.first:
        names["embed_tokens.weight"] = "model.embed_tokens.weight"
    for local, layer in enumerate(range(spec.start, spec.end)):
        for suffix in _LAYER_TENSORS:
            names[f"layers.{local}.{suffix}"] = f"model.layers.{layer}.{suffix}"
    if spec.last:
        names["norm.weight"] = "model.norm.weight"
        tied = getattr(config, "tie_word_embeddings", False)
        names["lm_head.weight"] = "model.embed_tokens.weight" if tied else "lm_head.weight"
    return names


_LAYER_TENSORS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
    "input_layernorm.weight",
    "post_attention_layernorm.weight",
)


def _read_stage_tensors(
    model_dir: Path, spec: StageSpec, config: PretrainedConfig, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    names = stage_tensor_names(spec, config)
    files = _tensor_files(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    handles: dict[Path, object] = {}
    for local, stored in names.items():
        path = files.get(stored)
        if path is None:
            raise KeyError(f"{model_dir}: checkpoint has no tensor {stored!r}")
        handle = handles.setdefault(path, safe_open(str(path), framework="pt"))
        tensor = handle.get_tensor(stored)  # type: ignore[attr-defined]
        # Own the memory (not a view of the mapped file), so the process's RSS is its weights.
        tensors[local] = tensor.to(dtype) if tensor.dtype != dtype else tensor.clone()
    return tensors


def _tensor_files(model_dir: Path) -> dict[str, Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files: dict[str, Path] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            files.update({name: path for name in handle.keys()})  # noqa: SIM118 - safe_open is not iterable
    return files
