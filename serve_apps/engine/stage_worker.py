"""The compute of one pipeline stage: its layers, its KV cache, and (last stage) the sampler.

`StageWorker` is a plain class so it is unit-tested in-process; `serve_apps.engine.stage_actor` wraps
it as the Ray actor placed in the replica's placement-group bundle.
"""

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import ray
import torch

from serve_apps.engine.kv_cache import BatchView, Row, SlotKVCache
from serve_apps.engine.layer_split import StageSpec
from serve_apps.engine.messages import StageInfo, StepBatch, StepResult, TokenLogprobs
from serve_apps.engine.quant import WeightQuant
from serve_apps.engine.sampling import Sampler
from serve_apps.engine.stage_model import build_stage, load_config
from serve_apps.engine.token_mask import apply_token_masks


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


class StageWorker:
    """Holds decoder layers [spec.start, spec.end) and their KV cache; runs one step at a time."""

    def __init__(self, config: StageConfig) -> None:
        torch.set_num_threads(max(1, config.torch_threads))
        self.config = config
        self.spec = config.spec
        dtype = getattr(torch, config.dtype)
        rss_before = _rss()
        self.model = build_stage(Path(config.model_dir), config.spec, dtype)
        self.model.quantize(config.weight_quant, config.low_bit_max_tokens)
        self.load_rss_bytes = max(0, _rss() - rss_before)  # weights and their low-bit copies
        model_config = load_config(Path(config.model_dir))
        num_kv_heads = int(model_config.num_key_value_heads or model_config.num_attention_heads)
        head_dim = int(
            getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
        )
        self.cache = SlotKVCache(
            range(config.spec.start, config.spec.end), config.kv_slots, config.max_len, num_kv_heads, head_dim, dtype
        )
        self.sampler = Sampler()
        self.pooling = Pooling()
        self.dtype = dtype
        self.busy_s = 0.0  # compute seconds (the busy fraction of a stage = busy_s / wall seconds)
        self.steps = 0

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
        return self._sample(batch, view, out) if self.spec.last else out

    def _inputs(self, batch: StepBatch, view: BatchView, hidden: torch.Tensor | None) -> torch.Tensor:
        if self.spec.first:
            return torch.tensor([t for i in view.order for t in batch.chunks[i].token_ids], dtype=torch.long)
        if hidden is None:
            raise ValueError(f"stage {self.spec.index} needs the previous stage's hidden states")
        if hidden.shape[0] != view.num_tokens:
            raise ValueError(
                f"stage {self.spec.index} got {hidden.shape[0]} hidden states for {view.num_tokens} tokens"
            )
        return hidden

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
            logits = self.model.logits(out[torch.tensor([last for _, last in rows])])
            chunks = [batch.chunks[i] for i, _ in rows]
            raw = logits
            if any(c.token_mask is not None for c in chunks):
                logits = apply_token_masks(logits.float(), [c.token_mask for c in chunks])
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
