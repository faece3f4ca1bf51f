"""The one device abstraction of a stage: where its layers, KV cache and sampler live (CPU or one CUDA GPU).

Everything device-specific sits here, so the rest of the engine reads `StageDevice` and never
`torch.cuda` directly:
- selection (`choose_device`): a stage whose bundle reserves a GPU (`pipeline.stage_resources` with
  `GPU`) runs on it when CUDA is present; Ray sets CUDA_VISIBLE_DEVICES to the actor's GPU, so it is
  always `cuda:0` inside the actor. `pipeline.device` forces `cpu` (or `cuda`, refused without CUDA);
- the compute dtype (`stage_dtype`): bfloat16 on CUDA (float16 where the GPU has no bfloat16), the
  catalogue's dtype on CPU;
- pinned host buffers (`HostStaging`) the hidden states pass through on their way to and from the links,
  sized from the most tokens of one step x hidden size x dtype, so a copy is one DMA and no pageable
  staging;
- `free_memory()` for the KV planner (the GPU's free memory; on CPU the node's available memory, as
  before) and `synchronize()`.

The CPU path is what the engine did before this module: no copies, no pinned memory, no synchronisation.
"""

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import psutil
import torch

logger = logging.getLogger(__name__)

DeviceKind = Literal["cpu", "cuda"]
DevicePreference = Literal["auto", "cpu", "cuda"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class DeviceChoice:
    """Where a stage computes and why (the reason goes into the stage's description)."""

    kind: DeviceKind
    reason: str


def choose_device(
    preference: DevicePreference, bundle_gpus: float, cuda_available: bool, visible_gpus: Sequence[int | str] = ()
) -> DeviceChoice:
    """A stage's device from the setting, its bundle's GPUs and what this process sees.

    `auto` takes the GPU when the bundle reserves one (or Ray assigned the actor one: `visible_gpus`) and
    CUDA is present; a GPU bundle without CUDA (a CPU-only torch) falls back to CPU, logged. `cuda`
    without CUDA is a ValueError: the operator asked for something this process cannot do.
    """
    if preference == "cpu":
        return DeviceChoice("cpu", "pipeline.device is cpu")
    if preference == "cuda":
        if not cuda_available:
            raise ValueError("pipeline.device is cuda, but this process sees no CUDA device (CPU-only torch?)")
        return DeviceChoice("cuda", "pipeline.device is cuda")
    wants_gpu = bundle_gpus > 0 or len(visible_gpus) > 0
    if not wants_gpu:
        return DeviceChoice("cpu", "the stage's bundle has no GPU")
    if not cuda_available:
        logger.warning("the stage's bundle reserves a GPU but torch sees no CUDA device: computing on CPU")
        return DeviceChoice("cpu", "bundle has a GPU, torch has no CUDA")
    return DeviceChoice("cuda", "the stage's bundle has a GPU")


def stage_dtype(kind: DeviceKind, requested: str, bf16_supported: bool = True) -> str:
    """The compute dtype of a stage: the catalogue's on CPU; a half-precision one on CUDA (bfloat16, float16
    where the GPU lacks bfloat16), since float32 would halve the KV slots and the speed for nothing."""
    if requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}; one of {sorted(DTYPES)}")
    if kind == "cpu":
        return requested
    if requested == "float16" or not bf16_supported:
        return "float16"
    return "bfloat16"


def staging_bytes(max_tokens: int, hidden_size: int, dtype: torch.dtype) -> int:
    """Bytes of one pinned host buffer: the hidden states of the largest step."""
    if max_tokens < 1 or hidden_size < 1:
        raise ValueError("a staging buffer needs at least one token of at least one feature")
    return max_tokens * hidden_size * torch.empty((), dtype=dtype).element_size()


def max_step_tokens(max_batch_size: int, prefill_chunk: int) -> int:
    """The most tokens one step carries: a full decode batch beside one prefill chunk."""
    return max_batch_size + prefill_chunk


class HostStaging:
    """A pinned host buffer of [max_tokens, hidden] (grown when a step is larger) for one direction."""

    def __init__(self, max_tokens: int, hidden_size: int, dtype: torch.dtype, pin: bool) -> None:
        self.hidden_size, self.dtype, self.pin = hidden_size, dtype, pin
        self.nbytes = staging_bytes(max_tokens, hidden_size, dtype)
        self._buffer = self._allocate(max_tokens)

    def _allocate(self, tokens: int) -> torch.Tensor:
        return torch.empty((tokens, self.hidden_size), dtype=self.dtype, pin_memory=self.pin)

    def rows(self, tokens: int) -> torch.Tensor:
        """The first `tokens` rows of the buffer (reallocated larger first where a step outgrows it)."""
        if tokens > self._buffer.shape[0]:
            self._buffer = self._allocate(tokens)
            self.nbytes = self._buffer.numel() * self._buffer.element_size()
        return self._buffer[:tokens]


class StageDevice:
    """A stage's device; on CPU every method is the identity or a no-op (the engine as it was)."""

    def __init__(self, kind: DeviceKind, reason: str = "") -> None:
        self.kind: DeviceKind = kind
        self.reason = reason
        self.torch = torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device("cpu")
        self._inbound: HostStaging | None = None
        self._outbound: HostStaging | None = None

    @staticmethod
    def select(preference: DevicePreference, bundle_gpus: float) -> "StageDevice":
        """The device of a stage in this process (inside a Ray actor: the GPUs Ray assigned it)."""
        choice = choose_device(preference, bundle_gpus, torch.cuda.is_available(), _ray_gpu_ids())
        return StageDevice(choice.kind, choice.reason)

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def dtype(self, requested: str) -> torch.dtype:
        """The stage computes in the dtype it was given (the replica chose it with `stage_dtype`); only a GPU
        without bfloat16 takes float16 instead."""
        if self.is_cuda and requested == "bfloat16" and not torch.cuda.is_bf16_supported():
            return torch.float16
        return getattr(torch, requested)

    def prepare_staging(self, max_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
        """Pinned buffers for the hidden states in and out (CUDA only; CPU tensors need no staging)."""
        if self.is_cuda and max_tokens > 0:
            self._inbound = HostStaging(max_tokens, hidden_size, dtype, pin=True)
            self._outbound = HostStaging(max_tokens, hidden_size, dtype, pin=True)

    def staging_bytes(self) -> int:
        return sum(s.nbytes for s in (self._inbound, self._outbound) if s is not None)

    def to_device(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states from a link (host memory) onto the device; a tensor already there stays as it is."""
        if not self.is_cuda or hidden.device == self.torch:
            return hidden
        if self._inbound is None or hidden.dim() != 2 or hidden.dtype != self._inbound.dtype:
            return hidden.to(self.torch)
        # The previous step's copy from this buffer finished: each step ends with a synchronize (to_host / the
        # sampled tokens' .tolist()), so the buffer is free to reuse.
        staged = self._inbound.rows(hidden.shape[0])
        staged.copy_(hidden)
        return staged.to(self.torch, non_blocking=True)

    def to_host(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states for the next stage's link: through the pinned buffer into a tensor the link owns."""
        if not self.is_cuda:
            return hidden
        if self._outbound is None or hidden.dim() != 2:
            return hidden.cpu()
        staged = self._outbound.rows(hidden.shape[0])
        staged.copy_(hidden, non_blocking=True)
        self.synchronize()
        return staged.clone()  # the buffer is reused by the next step; the link may still hold this one

    def tensor(self, values: list[int] | list[float], dtype: torch.dtype = torch.long) -> torch.Tensor:
        """A small index or value tensor on the device (CPU: exactly torch.tensor)."""
        out = torch.tensor(values, dtype=dtype)
        return out.to(self.torch, non_blocking=True) if self.is_cuda else out

    def free_memory(self) -> int:
        """Bytes the KV cache may plan on: the GPU's free memory, or the node's available memory on CPU."""
        if self.is_cuda:
            free, _total = torch.cuda.mem_get_info(self.torch)
            return int(free)
        return int(psutil.virtual_memory().available)

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.torch)

    def describe(self) -> dict[str, str]:
        """The device entries of a stage's description (`StageInfo.extra`)."""
        out = {"device": str(self.torch), "device_reason": self.reason}
        if self.is_cuda:
            out["device_name"] = torch.cuda.get_device_name(self.torch)
            out["staging_bytes"] = str(self.staging_bytes())
        return out


def _ray_gpu_ids() -> list[int | str]:
    """The GPUs Ray assigned this process (empty outside an actor or without Ray)."""
    try:
        import ray

        return list(ray.get_gpu_ids()) if ray.is_initialized() else []
    except Exception:  # noqa: BLE001 - outside a worker process ray.get_gpu_ids may raise
        return [] if not os.environ.get("CUDA_VISIBLE_DEVICES") else os.environ["CUDA_VISIBLE_DEVICES"].split(",")
