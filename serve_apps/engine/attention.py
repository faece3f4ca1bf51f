"""The one attention call every path makes (slot KV cache, cache-free traces), per layer's `AttentionForm`.

The Llama form (scale head_dim^-0.5, no window, no soft-cap) is PyTorch's SDPA exactly as before. A
sliding window is a mask (a query at position p sees keys at p - window < k <= p, as transformers'
`sliding_window_overlay`); Gemma 2's soft-capped scores (tanh(s / cap) * cap before the softmax) cannot go
through SDPA, so those layers take the explicit path of transformers' `eager_attention_forward`.
"""

from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True, slots=True)
class AttentionForm:
    """How one layer attends: q.k scale (None: head_dim^-0.5), sliding window, score soft-cap."""

    scale: float | None = None
    sliding_window: int | None = None
    softcap: float | None = None


LLAMA = AttentionForm()


def window_mask(query_positions: torch.Tensor, kv_len: int, window: int | None) -> torch.Tensor:
    """[Q, kv_len] bool (True = attend): causal, and within the last `window` positions when set."""
    keys = torch.arange(kv_len, device=query_positions.device).view(1, -1)
    queries = query_positions.view(-1, 1)
    allowed = keys <= queries
    return allowed & (keys > queries - window) if window is not None else allowed


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    is_causal: bool,
    form: AttentionForm,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """SDPA's contract (q [..., Hq, L, D], k/v [..., Hkv, S, D], bool mask True = attend) for `form`."""
    if form.softcap is None:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, scale=form.scale, enable_gqa=enable_gqa
        )
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scale = form.scale if form.scale is not None else q.shape[-1] ** -0.5
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / form.softcap) * form.softcap
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)
