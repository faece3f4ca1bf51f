"""A per-stage KV cache of fixed slots, planned up front: one slot per resident sequence.

The Hugging Face attention modules call `update(key, value, layer_idx)` and expect the whole key/value
history back; `SlotKVCache` answers from preallocated tensors indexed by (slot, position), so a
stage holds the cache only for its own layers and a finished sequence frees its slot without allocation.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class BatchView:
    """Where the tokens of the coming forward pass go: one slot per row, rows start at `start_pos`."""

    slots: torch.Tensor  # [B] long
    start_pos: tuple[int, ...]
    q_len: int  # tokens per row (1 for a decode batch; a prefill chunk is a single row)

    @property
    def kv_len(self) -> int:
        return max(self.start_pos) + self.q_len


class SlotKVCache:
    """Preallocated K/V tensors [slots, kv_heads, max_len, head_dim] for each layer of one stage."""

    def __init__(
        self, layer_ids: range, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        # torch.empty touches no pages: memory becomes resident only as sequences fill it.
        self._keys = [torch.empty(shape, dtype=dtype) for _ in layer_ids]
        self._values = [torch.empty(shape, dtype=dtype) for _ in layer_ids]
        self._local = {layer: i for i, layer in enumerate(layer_ids)}
        self.num_slots = num_slots
        self.max_len = max_len
        self._view: BatchView | None = None

    def bind(self, view: BatchView) -> "SlotKVCache":
        """Set the slots and positions the next forward pass writes to."""
        if max(view.start_pos) + view.q_len > self.max_len:
            raise ValueError(f"sequence exceeds the KV capacity of {self.max_len} tokens")
        self._view = view
        return self

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this pass's K/V ([B, H, Q, D]) and return each row's history up to the batch's longest."""
        view = self._view
        if view is None:
            raise RuntimeError("SlotKVCache.update called before bind()")
        keys, values = self._keys[self._local[layer_idx]], self._values[self._local[layer_idx]]
        if key.shape[0] == 1:
            slot, start = int(view.slots[0]), view.start_pos[0]
            keys[slot, :, start : start + view.q_len] = key[0]
            values[slot, :, start : start + view.q_len] = value[0]
            end = start + view.q_len
            return keys[slot : slot + 1, :, :end], values[slot : slot + 1, :, :end]
        if view.q_len != 1:
            raise ValueError("batched rows must be single-token decodes")
        positions = torch.tensor(view.start_pos, dtype=torch.long)
        keys[view.slots, :, positions] = key[:, :, 0]
        values[view.slots, :, positions] = value[:, :, 0]
        gathered_k, gathered_v = keys[view.slots, :, : view.kv_len], values[view.slots, :, : view.kv_len]
        valid = torch.arange(view.kv_len).view(1, -1) <= positions.view(-1, 1)
        if not bool(valid.all()):
            # Past a row's own length lies never-written memory (torch.empty: possibly NaN); masked
            # attention weights are 0, but 0 * NaN is NaN, so clear it in the gathered copy.
            invalid = ~valid.view(len(view.start_pos), 1, view.kv_len, 1)
            gathered_k, gathered_v = gathered_k.masked_fill(invalid, 0), gathered_v.masked_fill(invalid, 0)
        return gathered_k, gathered_v

    def capacity_tokens(self) -> int:
        return self.num_slots * self.max_len


def attention_mask(view: BatchView) -> torch.Tensor | None:
    """Boolean mask [B, 1, Q, K] (True = attend), or None where plain causal attention is exact.

    None keeps the single-sequence path on the same kernel as an unsharded Hugging Face model.
    """
    rows, q_len, kv_len = len(view.start_pos), view.q_len, view.kv_len
    if rows == 1 and view.start_pos[0] == 0:
        return None  # fresh prefill: is_causal
    if q_len == 1 and len(set(view.start_pos)) == 1:
        return None  # decodes at one common position see the whole history
    kv_index = torch.arange(kv_len)
    starts = torch.tensor(view.start_pos).view(rows, 1, 1)
    query_pos = starts + torch.arange(q_len).view(1, q_len, 1)
    return (kv_index.view(1, 1, kv_len) <= query_pos).unsqueeze(1)


@dataclass(frozen=True, slots=True)
class KVPlan:
    """How many sequences (slots of `max_len` tokens) a pipeline's KV caches hold, and what that costs."""

    slots: int
    bytes_per_token: int  # of the largest stage
    bytes_per_stage: int  # of the largest stage at `slots` full slots


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Key + value bytes one token occupies in `num_layers` layers."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_bytes


def plan_kv_slots(wanted_slots: int, max_len: int, bytes_per_token: int, budget_bytes: int) -> KVPlan:
    """The most slots (up to `wanted_slots`) whose full KV cache fits `budget_bytes` on the largest stage.

    Planned up front so a stage never runs out of cache mid-sequence; requests beyond the slots wait in
    the scheduler's bounded queue (admission control). ValueError when not even one sequence fits.
    """
    per_slot = max_len * bytes_per_token
    if per_slot <= 0 or wanted_slots < 1:
        raise ValueError("KV planning needs positive sizes")
    fitting = budget_bytes // per_slot
    if fitting < 1:
        raise ValueError(
            f"one sequence of {max_len} tokens needs {per_slot / 2**20:.1f} MiB of KV cache per stage, "
            f"but only {budget_bytes / 2**20:.1f} MiB are available: lower max_model_len or use more stages"
        )
    slots = min(wanted_slots, fitting)
    return KVPlan(slots, bytes_per_token, slots * per_slot)
