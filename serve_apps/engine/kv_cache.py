"""A per-stage KV cache of fixed slots, planned up front: one slot per resident sequence.

A forward pass carries a flat batch of tokens; `BatchView` lays it out (single-token rows first, sorted
by slot, then multi-token rows) and `SlotKVCache.attend` stores each layer's new keys/values at
(slot, position) in preallocated tensors and attends every token to its own sequence's history: all
single-token rows (decodes) in one attention call, each multi-token row (a prefill chunk) in its own.
A stage holds the cache only for its own layers; a finished sequence frees its slot without allocation.
Each layer attends in its own `AttentionForm` (serve_apps.engine.attention): a sliding-window layer keeps
the whole history in its slot but sees only the last `sliding_window` positions (a mask per window, made
once per pass), so it stays exact past the window.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from serve_apps.engine.attention import LLAMA, AttentionForm, attend, window_mask

ZERO_AHEAD = 64  # positions cleared at once ahead of a slot's written prefix (see SlotKVCache._clear_ahead)


@dataclass(frozen=True, slots=True)
class Row:
    """One sequence's tokens in a forward pass: `length` tokens entering slot `slot` at `start`."""

    slot: int
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class BatchView:
    """The layout of one forward pass's flat token batch (the same on every stage of a pipeline).

    `rows` are in layout order: single-token rows sorted by slot, then multi-token rows in step order;
    `order[i]` is the index in the step of layout row i.
    """

    rows: tuple[Row, ...]
    order: tuple[int, ...]
    num_single: int

    @staticmethod
    def of(rows: Sequence[Row]) -> "BatchView":
        singles = sorted((i for i, r in enumerate(rows) if r.length == 1), key=lambda i: rows[i].slot)
        multis = [i for i, r in enumerate(rows) if r.length != 1]
        order = tuple(singles + multis)
        return BatchView(tuple(rows[i] for i in order), order, len(singles))

    @property
    def num_tokens(self) -> int:
        return sum(r.length for r in self.rows)

    def positions(self) -> torch.Tensor:
        """The position of every token, in layout order: [T] long."""
        return torch.cat([torch.arange(r.start, r.start + r.length) for r in self.rows])

    def last_tokens(self) -> list[int]:
        """Index in the flat batch of each layout row's last token."""
        ends, total = [], 0
        for r in self.rows:
            total += r.length
            ends.append(total - 1)
        return ends


class SlotKVCache:
    """Preallocated K/V tensors [slots, kv_heads, max_len, head_dim] for each layer of one stage."""

    def __init__(
        self,
        layer_ids: range,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        shape = (num_slots, num_kv_heads, max_len, head_dim)
        # torch.empty touches no pages on CPU: memory becomes resident only as sequences fill it. A GPU
        # allocates it all at once anyway, so there it is zeroed (finite from the start: see _clear_ahead).
        self.device = device if device is not None else torch.device("cpu")
        alloc = torch.zeros if self.device.type == "cuda" else torch.empty
        self._keys = [alloc(shape, dtype=dtype, device=self.device) for _ in layer_ids]
        self._values = [alloc(shape, dtype=dtype, device=self.device) for _ in layer_ids]
        self._local = {layer: i for i, layer in enumerate(layer_ids)}
        self._clean = [max_len if self.device.type == "cuda" else 0] * num_slots  # [0, clean) hold finite values
        self.num_slots = num_slots
        self.max_len = max_len
        self._plan: _Plan | None = None

    def bind(self, view: BatchView) -> "SlotKVCache":
        """Prepare the slots and positions the next forward pass reads and writes."""
        if max(r.start + r.length for r in view.rows) > self.max_len:
            raise ValueError(f"sequence exceeds the KV capacity of {self.max_len} tokens")
        if any(not 0 <= r.slot < self.num_slots for r in view.rows):
            raise ValueError(f"a row's slot is outside this cache's {self.num_slots} slots")
        plan = _Plan.of(view) if self.device.type == "cpu" else _Plan.of(view).to(self.device)
        for row in view.rows[: view.num_single]:
            self._clear_ahead(row.slot, plan.single_len)
        for row in view.rows[view.num_single :]:
            self._clean[row.slot] = max(self._clean[row.slot], row.start + row.length)
        self._plan = plan
        return self

    @property
    def positions(self) -> torch.Tensor:
        """The bound pass's token positions, in layout order: [T] long."""
        if self._plan is None:
            raise RuntimeError("SlotKVCache.positions read before bind()")
        return self._plan.token_positions

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, form: AttentionForm = LLAMA
    ) -> torch.Tensor:
        """Store k/v [T, Hkv, D] at each token's (slot, position); return attention output [T, Hq * D]."""
        plan = self._plan
        if plan is None:
            raise RuntimeError("SlotKVCache.attend called before bind()")
        keys, values = self._keys[self._local[layer]], self._values[self._local[layer]]
        keys[plan.token_slots, :, plan.token_positions] = k
        values[plan.token_slots, :, plan.token_positions] = v
        parts = []
        if plan.num_single:
            parts.append(self._attend_singles(plan, q[: plan.num_single], keys, values, form))
        masks = plan.multi_masks(form.sliding_window)
        for (offset, row, _), mask in zip(plan.multi, masks, strict=True):
            parts.append(_attend_row(q[offset : offset + row.length], keys, values, row, mask, form))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _attend_singles(
        self, plan: "_Plan", q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, form: AttentionForm
    ) -> torch.Tensor:
        # One query per row: fold the query heads that share a KV head into the query axis (no repeat).
        rows, heads, dim = q.shape
        kv_heads = keys.shape[1]
        if plan.single_range is not None:
            lo, hi = plan.single_range
            hist_k, hist_v = keys[lo:hi, :, : plan.single_len], values[lo:hi, :, : plan.single_len]
        else:
            hist_k, hist_v = (
                keys[plan.single_slots, :, : plan.single_len],
                values[plan.single_slots, :, : plan.single_len],
            )
        mask = plan.single_mask if form.sliding_window is None else plan.window_single_mask(form.sliding_window)
        out = attend(q.view(rows, kv_heads, heads // kv_heads, dim), hist_k, hist_v, mask, False, form)
        return out.reshape(rows, heads * dim)

    def _clear_ahead(self, slot: int, upto: int) -> None:
        # Rows of one attention call read up to the longest row's length; past a row's own length lies
        # never-written memory (torch.empty: possibly NaN, and 0 * NaN is NaN even where masked), so clear
        # it once, a block ahead at a time, rather than on every step.
        clean = self._clean[slot]
        if clean >= upto:
            return
        end = min(self.max_len, upto + ZERO_AHEAD)
        for tensor in (*self._keys, *self._values):
            tensor[slot, :, clean:end].zero_()
        self._clean[slot] = end

    def capacity_tokens(self) -> int:
        return self.num_slots * self.max_len


@dataclass(frozen=True, slots=True)
class _Plan:
    """Index tensors and masks of one forward pass, computed once and reused by every layer."""

    token_slots: torch.Tensor  # [T]
    token_positions: torch.Tensor  # [T]
    num_single: int
    single_len: int  # keys each single-token row attends over (the longest row's length)
    single_range: tuple[int, int] | None  # the single rows' slots when they are one contiguous run
    single_slots: torch.Tensor
    single_mask: torch.Tensor | None  # [B, 1, 1, L] True = attend; None when every row sees all L keys
    multi: tuple[tuple[int, Row, torch.Tensor | None], ...]  # (token offset, row, causal mask)
    windowed: dict[int, tuple[torch.Tensor | None, list[torch.Tensor | None]]]  # window -> masks, made on use

    def to(self, device: torch.device) -> "_Plan":
        """The same plan with its index tensors and masks on `device` (masks made later follow them)."""

        def on(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=True)

        return _Plan(
            token_slots=self.token_slots.to(device, non_blocking=True),
            token_positions=self.token_positions.to(device, non_blocking=True),
            num_single=self.num_single,
            single_len=self.single_len,
            single_range=self.single_range,
            single_slots=self.single_slots.to(device, non_blocking=True),
            single_mask=on(self.single_mask),
            multi=tuple((offset, row, on(mask)) for offset, row, mask in self.multi),
            windowed={},
        )

    def window_single_mask(self, window: int) -> torch.Tensor | None:
        return self._windowed(window)[0]

    def multi_masks(self, window: int | None) -> list[torch.Tensor | None]:
        return [mask for _, _, mask in self.multi] if window is None else self._windowed(window)[1]

    def _windowed(self, window: int) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        if window not in self.windowed:
            starts = self.token_positions[: self.num_single].tolist()  # single rows come first, one token each
            device = self.token_positions.device
            single = _decode_mask(starts, self.single_len, window)
            multi = [_causal_mask(row, window) for _, row, _ in self.multi]
            if device.type != "cpu":
                single = None if single is None else single.to(device)
                multi = [None if mask is None else mask.to(device) for mask in multi]
            self.windowed[window] = (single, multi)
        return self.windowed[window]

    @staticmethod
    def of(view: BatchView) -> "_Plan":
        rows = view.rows
        singles = rows[: view.num_single]
        slots = [r.slot for r in singles]
        single_len = max((r.start + 1 for r in singles), default=0)
        contiguous = bool(slots) and slots == list(range(slots[0], slots[0] + len(slots)))
        multi, offset = [], view.num_single
        for row in rows[view.num_single :]:
            multi.append((offset, row, _causal_mask(row)))
            offset += row.length
        return _Plan(
            token_slots=torch.tensor([r.slot for r in rows for _ in range(r.length)], dtype=torch.long),
            token_positions=view.positions(),
            num_single=len(singles),
            single_len=single_len,
            single_range=(slots[0], slots[0] + len(slots)) if contiguous else None,
            single_slots=torch.tensor(slots, dtype=torch.long),
            single_mask=_decode_mask([r.start for r in singles], single_len),
            multi=tuple(multi),
            windowed={},
        )


def _decode_mask(starts: list[int], kv_len: int, window: int | None = None) -> torch.Tensor | None:
    windowed = window is not None and kv_len > window
    if not starts or (not windowed and all(s == kv_len - 1 for s in starts)):
        return None  # every row is at the same position: it sees the whole history
    return window_mask(torch.tensor(starts), kv_len, window).view(len(starts), 1, 1, kv_len)


def _causal_mask(row: Row, window: int | None = None) -> torch.Tensor | None:
    end = row.start + row.length
    if row.start == 0 and (window is None or end <= window):
        return None  # a fresh prefill: SDPA's own causal mask is exact
    return window_mask(torch.arange(row.start, end), end, window).view(1, 1, row.length, -1)


def _attend_row(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    row: Row,
    mask: torch.Tensor | None,
    form: AttentionForm = LLAMA,
) -> torch.Tensor:
    end = row.start + row.length
    out = attend(
        q.transpose(0, 1).unsqueeze(0),
        keys[row.slot : row.slot + 1, :, :end],
        values[row.slot : row.slot + 1, :, :end],
        mask,
        mask is None and row.length > 1,
        form,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1).reshape(row.length, -1)


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


GPU_RUNTIME_BYTES = 512 * 2**20  # CUDA context, cuBLAS workspaces, the allocator's slack and captured graphs


def activation_headroom_bytes(
    max_step_tokens: int, hidden_size: int, intermediate_size: int, vocab_size: int, sample_rows: int, dtype_bytes: int
) -> int:
    """Device memory one step's temporaries need beside weights and KV cache: a layer's activations for the
    largest step (residual, q/k/v, attention output, gate/up and their product) and float32 logits of the
    sampled rows three times over (raw, masked or penalised copy, log-softmax), plus the CUDA runtime."""
    per_token = (4 * hidden_size + 3 * intermediate_size) * dtype_bytes
    logits = 3 * sample_rows * vocab_size * 4
    return max_step_tokens * per_token + logits + GPU_RUNTIME_BYTES


def device_kv_budget(free_bytes: int, fraction: float, weight_bytes: int, headroom_bytes: int) -> int:
    """KV-cache bytes a stage may allocate on its device: `fraction` of the free memory measured before its
    weights loaded, less the weights and the activation headroom (never negative)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"memory fraction must be in (0, 1], got {fraction}")
    return max(0, int(free_bytes * fraction) - weight_bytes - headroom_bytes)
