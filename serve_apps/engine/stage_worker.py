"""The compute of one pipeline stage: its layers, its KV cache, and (last stage) the sampler.

`StageWorker` is a plain class so it is unit-tested in-process; `serve_apps.engine.stage_actor` wraps
it as the Ray actor placed in the replica's placement-group bundle.
"""

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import ray
import torch

from serve_apps.engine.device import DevicePreference, StageDevice
from serve_apps.engine.kv_cache import (
    BatchView,
    Row,
    SlotKVCache,
    activation_headroom_bytes,
    device_kv_budget,
    kv_bytes_per_token,
    plan_kv_slots,
)
from serve_apps.engine.layer_split import StageSpec
from serve_apps.engine.messages import StageInfo, StepBatch, StepResult, TokenLogprobs
from serve_apps.engine.quant import WeightQuant
from serve_apps.engine.sampling import Sampler
from serve_apps.engine.stage_model import build_stage, load_config
from serve_apps.engine.token_mask import apply_token_masks

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StageConfig:
    """Everything a stage needs to build itself; sent once when the actor is created."""

    model_dir: str
    spec: StageSpec
    dtype: str
    kv_slots: int
    max_len: int
    torch_threads: int
    actor_name: str = ""
    weight_quant: WeightQuant = "none"  # packed low-bit copies used for steps of few tokens (quant.py)
    low_bit_max_tokens: int = 0
    device: DevicePreference = "cpu"  # auto: the bundle's GPU where CUDA is present (serve_apps.engine.device)
    bundle_gpus: float = 0.0  # GPUs the stage's bundle reserves
    max_step_tokens: int = 0  # most tokens of one step: sizes the pinned buffers and activation headroom on CUDA
    gpu_memory_fraction: float = 0.9  # share of the GPU's free memory weights, activations and KV slots plan in
    cuda_graphs: bool = False  # replay decode-only steps from captured graphs (CUDA only)


class StageWorker:
    """Holds decoder layers [spec.start, spec.end) and their KV cache; runs one step at a time."""

    def __init__(self, config: StageConfig) -> None:
        torch.set_num_threads(max(1, config.torch_threads))
        self.config = config
        self.spec = config.spec
        self.device = StageDevice.select(config.device, config.bundle_gpus)
        dtype = self.device.dtype(config.dtype)
        free_before = self.device.free_memory() if self.device.is_cuda else 0
        rss_before = _rss()
        self.model = build_stage(Path(config.model_dir), config.spec, dtype)
        if self.device.is_cuda:
            self._to_device()
        else:
            self.model.quantize(config.weight_quant, config.low_bit_max_tokens)
        self.load_rss_bytes = max(0, _rss() - rss_before)  # weights and their low-bit copies
        model_config = load_config(Path(config.model_dir))
        num_kv_heads = int(model_config.num_key_value_heads or model_config.num_attention_heads)
        head_dim = int(
            getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
        )
        kv_slots = config.kv_slots
        if self.device.is_cuda:
            kv_slots = self._device_kv_slots(free_before, model_config, num_kv_heads, head_dim, dtype)
            self.device.prepare_staging(config.max_step_tokens, int(model_config.hidden_size), dtype)
        self.cache = SlotKVCache(
            range(config.spec.start, config.spec.end),
            kv_slots,
            config.max_len,
            num_kv_heads,
            head_dim,
            dtype,
            self.device.torch,
        )
        self.sampler = Sampler()
        self.pooling = Pooling()
        self.dtype = dtype
        self.busy_s = 0.0  # compute seconds (the busy fraction of a stage = busy_s / wall seconds)
        self.steps = 0

    def _to_device(self) -> None:
        """Weights onto the GPU (the low-bit copies are CPU kernels: a GPU stage keeps its dense weights)."""
        if self.config.weight_quant != "none":
            logger.warning(
                "weight_quant %s is a CPU kernel: stage on %s uses dense weights",
                self.config.weight_quant,
                self.device.torch,
            )
        self.model.to(self.device.torch)
        self.model.rotary.to(self.device.torch)

    def _device_kv_slots(
        self, free_before: int, model_config: Any, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """The most of the wanted slots whose KV cache fits the GPU: its free memory before the weights, less
        the weights and one largest step's activations (ValueError when not one sequence fits)."""
        dtype_bytes = torch.empty((), dtype=dtype).element_size()
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        step_tokens = self.config.max_step_tokens or self.config.kv_slots
        headroom = activation_headroom_bytes(
            step_tokens,
            int(model_config.hidden_size),
            int(model_config.intermediate_size),
            int(model_config.vocab_size) if self.spec.last else 0,
            self.config.kv_slots,
            dtype_bytes,
        )
        budget = device_kv_budget(free_before, self.config.gpu_memory_fraction, weights, headroom)
        per_token = kv_bytes_per_token(self.spec.num_layers, num_kv_heads, head_dim, dtype_bytes)
        plan = plan_kv_slots(self.config.kv_slots, self.config.max_len, per_token, budget)
        if plan.slots < self.config.kv_slots:
            logger.warning(
                "stage %d: %d KV slots fit the GPU, not %d", self.spec.index, plan.slots, self.config.kv_slots
            )
        return plan.slots

    def forward(self, batch: StepBatch, hidden: torch.Tensor | None = None) -> torch.Tensor | StepResult:
        """Run this stage's layers for `batch`; the last stage returns sampled tokens, others hidden states."""
        started = time.perf_counter()
        try:
            return self._forward(batch, hidden)
        finally:
            self.busy_s += time.perf_counter() - started
            self.steps += 1

    @torch.inference_mode()
    def _forward(self, batch: StepBatch, hidden: torch.Tensor | None) -> torch.Tensor | StepResult:
        self._release(batch)
        if not batch.chunks:
            return StepResult(batch.step_id, ()) if self.spec.last else torch.empty(0)
        view = BatchView.of([Row(c.slot, c.start_pos, len(c.token_ids)) for c in batch.chunks])
        inputs = self._inputs(batch, view, hidden)
        cache = self.cache.bind(view)
        out = self.model(inputs, cache.positions, cache)
        return self._sample(batch, view, out) if self.spec.last else self.device.to_host(out)

    def _inputs(self, batch: StepBatch, view: BatchView, hidden: torch.Tensor | None) -> torch.Tensor:
        if self.spec.first:
            return self.device.tensor([t for i in view.order for t in batch.chunks[i].token_ids])
        if hidden is None:
            raise ValueError(f"stage {self.spec.index} needs the previous stage's hidden states")
        if hidden.shape[0] != view.num_tokens:
            raise ValueError(
                f"stage {self.spec.index} got {hidden.shape[0]} hidden states for {view.num_tokens} tokens"
            )
        return self.device.to_device(hidden)

    def _sample(self, batch: StepBatch, view: BatchView, out: torch.Tensor) -> StepResult:
        """Logits and tokens only for the rows that sample (a prefill chunk short of the prompt's end does not);
        an embedding sequence's chunks are pooled instead, and its last chunk returns the embedding."""
        tokens = [-1] * len(batch.chunks)
        logprobs: list[TokenLogprobs | None] = [None] * len(batch.chunks)
        pooled = self.pooling.add(batch, view, out)
        self.sampler.observe(batch.chunks)
        rows = [
            (i, last)
            for i, last in zip(view.order, view.last_tokens(), strict=True)
            if batch.chunks[i].sample and not batch.chunks[i].sampling.embed
        ]
        if rows:
            logits = self.model.logits(out[self.device.tensor([last for _, last in rows])])
            chunks = [batch.chunks[i] for i, _ in rows]
            raw = logits
            if any(c.token_mask is not None for c in chunks):
                # The mask is applied in place: logprobs report the raw logits (vLLM's default), so copy them first.
                scored = any(c.sampling.logprobs is not None for c in chunks)
                masked = logits.float().clone() if scored else logits.float()
                logits = apply_token_masks(masked, [c.token_mask for c in chunks])
            sampled, scored = self.sampler.step(logits, chunks, raw)
            for (i, _), token, score in zip(rows, sampled, scored, strict=True):
                tokens[i], logprobs[i] = token, score
        asked = any(c.sampling.logprobs is not None for c in batch.chunks)
        return StepResult(batch.step_id, tuple(tokens), tuple(logprobs) if asked else (), pooled)

    def _release(self, batch: StepBatch) -> None:
        for seq_id, _slot in batch.released_slots:
            self.sampler.release(seq_id)
            self.pooling.release(seq_id)

    def describe(self) -> StageInfo:
        """Which layers this process holds, how many parameters, and its resident memory."""
        params = list(self.model.parameters())
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return StageInfo(
            stage_index=self.spec.index,
            layer_start=self.spec.start,
            layer_end=self.spec.end,
            has_embedding=self.spec.first,
            has_lm_head=self.spec.last,
            param_count=sum(p.numel() for p in params),
            param_bytes=sum(p.numel() * p.element_size() for p in params),
            rss_bytes=_rss(),
            load_rss_bytes=self.load_rss_bytes,
            pid=os.getpid(),
            node_id=node_id,
            actor_name=self.config.actor_name,
            torch_threads=torch.get_num_threads(),
            kv_slots=self.cache.num_slots,
            kv_capacity_tokens=self.cache.capacity_tokens(),
            extra={
                "weight_quant": self.config.weight_quant,
                "low_bit_bytes": str(self.model.low_bit_bytes()),
                "weights": json.dumps(self.model.weights_summary(), sort_keys=True),  # gguf_source.weights_summary
                **self.device.describe(),
            },
            busy_s=round(self.busy_s, 4),
            steps=self.steps,
            cpus=_usable_cpus(),
        )


class Pooling:
    """Mean pooling of embedding sequences on the last stage, over chunked prefills.

    Each chunk of an embedding sequence adds the sum of its final-normed hidden states (float32) to the
    sequence's running sum; a chunk at position 0 starts it again (a replay after a stage was lost sends
    the prompt again from the start). The last chunk (`sample`) returns the mean, L2-normalised.
    """

    def __init__(self) -> None:
        self._sums: dict[str, tuple[torch.Tensor, int]] = {}

    def add(self, batch: StepBatch, view: BatchView, out: torch.Tensor) -> tuple[tuple[float, ...] | None, ...]:
        """The step's pooled embeddings per chunk (None where a chunk ends no embedding; () when none does)."""
        pooled: list[tuple[float, ...] | None] = [None] * len(batch.chunks)
        end = 0
        for i, row in zip(view.order, view.rows, strict=True):
            start, end = end, end + row.length
            chunk = batch.chunks[i]
            if not chunk.sampling.embed:
                continue
            total, count = (None, 0) if chunk.start_pos == 0 else self._sums.pop(chunk.seq_id, (None, 0))
            part = out[start:end].float().sum(dim=0)
            total, count = (part if total is None else total + part), count + row.length
            if not chunk.sample:
                self._sums[chunk.seq_id] = (total, count)
                continue
            mean = total / count
            pooled[i] = tuple(torch.nn.functional.normalize(mean, dim=0).tolist())
        return tuple(pooled) if any(p is not None for p in pooled) else ()

    def release(self, seq_id: str) -> None:
        self._sums.pop(seq_id, None)


def _usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity is not None else os.cpu_count() or 1


def _rss() -> int:
    return int(psutil.Process(os.getpid()).memory_info().rss)
