"""One stage of a decoder-only model: only its decoder layers (plus embedding / norm + lm_head at the ends).

The layers are `serve_apps.engine.decoder.DecoderLayer`s (one decoder on a flat token batch, fused
projections, each family's switches from its `Architecture`); weights are read tensor by tensor from
safetensors for this stage only, under the family's tensor names, and fused on load. A config of a family
the decoder does not implement is refused by `load_config`, before any weight is read, naming the
supported ones (serve_apps.engine.architectures.FAMILIES).
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from cluster.network.model_cost import head_copy_kind
from serve_apps.engine.architectures import (
    SUPPORTED_MODEL_TYPES,
    UnsupportedArchitecture,
    architecture_of,
    layer_tensor_names,
    supported_summary,
)
from serve_apps.engine.decoder import (
    Attention,
    CausalAttention,
    DecoderLayer,
    Rotary,
    fuse_layer_tensors,
    gemma_rms_norm,
    rms_norm,
)
from serve_apps.engine.gguf_source import SourceWeights, weights_summary
from serve_apps.engine.layer_split import StageSpec
from serve_apps.engine.quant import LowBitWeight, WeightQuant, project, quantize

__all__ = ["SUPPORTED_MODEL_TYPES", "StageModel", "UnsupportedArchitecture", "build_stage", "load_config"]


class StageModel(nn.Module):
    """Decoder layers [spec.start, spec.end) of a model; embedding if first, norm + lm_head if last."""

    def __init__(self, config: PretrainedConfig, spec: StageSpec) -> None:
        super().__init__()
        arch = architecture_of(config)
        self.arch = arch
        self.spec = spec
        self.eps = arch.eps
        self.final_norm = gemma_rms_norm if arch.gemma_norms else rms_norm
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size) if spec.first else None
        self.layers = nn.ModuleList(DecoderLayer(arch, layer_idx=i) for i in range(spec.start, spec.end))
        self.norm = nn.Parameter(torch.empty(arch.hidden_size)) if spec.last else None
        self.lm_head = nn.Parameter(torch.empty(arch.vocab_size, arch.hidden_size)) if spec.last else None
        with torch.device("cpu"):  # computed, not loaded: real tensors even when the stage is built on meta
            self.rotary = Rotary(config, arch)
        self.lm_head_low_bit: LowBitWeight | None = None
        self.low_bit_max_rows = 0
        self.source: SourceWeights | None = None  # a GGUF's types and blocks (gguf_source), set by build_stage
        self.quantized = False

    def quantize(self, kind: WeightQuant, max_rows: int) -> None:
        """Packed low-bit copies of the layers' projections (int4 or int8) and of the lm_head (fp16 where
        FBGEMM runs it, else int8: see head_copy_kind), used for calls of at most `max_rows` tokens.
        A model from a GGUF takes each projection's copy from the file's own blocks instead (gguf_source)."""
        if kind == "none":
            return
        for layer in self._decoder_layers():
            if self.source is None:
                layer.quantize(kind, max_rows)
            else:
                self._copy_source_blocks(layer, self.source, max_rows)
        if self.lm_head is not None:
            self.lm_head_low_bit = quantize(self.lm_head, head_copy_kind()) or quantize(self.lm_head, "int8")
        self.low_bit_max_rows = max_rows
        self.quantized = True

    @staticmethod
    def _copy_source_blocks(layer: DecoderLayer, source: SourceWeights, max_rows: int) -> None:
        copies = {
            name: source.copy_for(f"layers.{layer.layer_idx}.{name}", parts, getattr(layer, name).dtype)
            for name, parts in source.layer_parts(layer.layer_idx).items()
        }
        layer.low_bit = {name: low for name, low in copies.items() if low is not None}
        layer.low_bit_max_rows = max_rows

    def weights_summary(self) -> dict[str, object]:
        """Source types, packed copies by kind and dense fallbacks (the `weights` of the stage's description)."""
        copies = [low for layer in self._decoder_layers() for low in layer.low_bit.values()]
        copies += [self.lm_head_low_bit] if self.lm_head_low_bit is not None else []
        return weights_summary(self.source, copies, self.quantized)

    def _decoder_layers(self) -> list[DecoderLayer]:
        return [layer for layer in self.layers if isinstance(layer, DecoderLayer)]

    def low_bit_bytes(self) -> int:
        packed = [low for layer in self._decoder_layers() for low in layer.low_bit.values()]
        packed += [self.lm_head_low_bit] if self.lm_head_low_bit is not None else []
        return sum(low.nbytes for low in packed)

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, attention: Attention) -> torch.Tensor:
        """Token ids [T] (first stage) or hidden states [T, H] in, at `positions` [T]; hidden states [T, H]
        out (final-normed on the last stage)."""
        if self.embed_tokens is not None:
            hidden = self.embed_tokens(inputs)
            if self.arch.embed_scale is not None:  # Gemma: sqrt(hidden), rounded to the weights' dtype first
                hidden = hidden * torch.tensor(self.arch.embed_scale).to(hidden.dtype)
        else:
            hidden = inputs
        tables = self.rotary.tables(positions, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, tables, attention)
        return self.final_norm(hidden, self.norm, self.eps) if self.norm is not None else hidden

    def forward_full(self, inputs: torch.Tensor) -> torch.Tensor:
        """Cache-free causal forward of one whole sequence (token ids [T] or hidden states [T, H])."""
        return self.forward(inputs, torch.arange(inputs.shape[0]), CausalAttention())

    def logits(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """lm_head over the final-normed hidden states of the rows' last positions: [B, H] -> [B, V] float32."""
        if self.lm_head is None:
            raise RuntimeError("only the last stage computes logits")
        logits = project(hidden_last, self.lm_head, self.lm_head_low_bit, self.low_bit_max_rows).float()
        cap = self.arch.final_softcap
        return torch.tanh(logits / cap) * cap if cap is not None else logits


def load_config(model_dir: Path) -> PretrainedConfig:
    """The model's config, validated to be an architecture the stages implement (UnsupportedArchitecture,
    a ValueError naming the supported families, otherwise)."""
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except ValueError as exc:  # a model_type transformers does not know either
        declared = json.loads((model_dir / "config.json").read_text()).get("model_type")
        raise UnsupportedArchitecture(
            f"{model_dir}: model_type {declared!r} is not supported by the sharded engine; supported: "
            f"{supported_summary()}"
        ) from exc
    architecture_of(config)
    config._attn_implementation = "sdpa"
    return config


def build_stage(model_dir: Path, spec: StageSpec, dtype: torch.dtype) -> StageModel:
    """Instantiate the stage on the meta device, then materialise only its own tensors from disk."""
    config = load_config(model_dir)
    with torch.device("meta"):
        model = StageModel(config, spec)
    state = _fuse(_read_stage_tensors(model_dir, spec, config, dtype), spec, model)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval().requires_grad_(False)
    model.source = SourceWeights.load(model_dir)
    if model.source is not None:
        model.source.stage_tensors = sorted(set(stage_tensor_names(spec, config).values()))
    return model


def _fuse(state: dict[str, torch.Tensor], spec: StageSpec, model: StageModel) -> dict[str, torch.Tensor]:
    """Checkpoint-named tensors -> the stage's parameters (fused per layer, plain names at the ends)."""
    fused: dict[str, torch.Tensor] = {}
    for local in range(spec.num_layers):
        prefix = f"layers.{local}."
        layer = {name[len(prefix) :]: state.pop(name) for name in list(state) if name.startswith(prefix)}
        fused.update({prefix + name: tensor for name, tensor in fuse_layer_tensors(layer, model.arch).items()})
    renamed = {"norm.weight": "norm", "lm_head.weight": "lm_head"}
    fused.update({renamed.get(name, name): tensor for name, tensor in state.items()})
    return fused


def stage_tensor_names(spec: StageSpec, config: PretrainedConfig) -> dict[str, str]:
    """Map the stage's parameter names to the checkpoint's tensor names (tied lm_head reads the embedding)."""
    names: dict[str, str] = {}
    if spec.first:
        names["embed_tokens.weight"] = "model.embed_tokens.weight"
    suffixes = layer_tensor_names(architecture_of(config))
    for local, layer in enumerate(range(spec.start, spec.end)):
        for suffix in suffixes:
            names[f"layers.{local}.{suffix}"] = f"model.layers.{layer}.{suffix}"
    if spec.last:
        names["norm.weight"] = "model.norm.weight"
        tied = getattr(config, "tie_word_embeddings", False)
        names["lm_head.weight"] = "model.embed_tokens.weight" if tied else "lm_head.weight"
    return names


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
