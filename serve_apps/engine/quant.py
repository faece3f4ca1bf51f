"""Weight-only low-bit copies of a stage's matrices for small batches on CPU (int4 groups, int8 rows, fp16).

A decode step of a few rows is bound by reading the weights from memory: SmolLM2-135M's 30 layers in
bfloat16 are 200 MB per token. A packed copy read by PyTorch's weight-only kernels
(`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) reads a quarter (int4) or half (int8) of that;
from 10-20 rows on (more with more threads), the dense bfloat16 GEMM is faster again (bench/stage_bench.py,
docs/benchmarks.md), so the dense weights stay and `project` picks per call by the number of rows.

int4 is affine per group of 32 input features (w = (q - 8) * scale + zero), the layout of GGUF's Q4_1
blocks: a model converted from a Q4_1 GGUF re-quantizes to its very own 4-bit values. int8 is symmetric
per output row. fp16 is FBGEMM's packed half-precision GEMM (`linear_dynamic_fp16`, float32 accumulation):
not smaller than bfloat16, but for the lm_head of a few rows it runs at memory speed where the int8
kernel does not (SmolLM2's 49152 x 576 head, 8 rows, 1 thread: 5.5 ms against 12.8 int8 and 8.8 bfloat16;
docs/benchmarks.md), and bfloat16 weights convert to it exactly.

A GGUF's own blocks (cluster.models.gguf_file) are packed as they are, not re-derived from values:
`int4_from_blocks` takes Q4_0 / Q4_1 / Q4_K codes with their per-32 scale and zero, and `int8_g32` holds
Q8_0 (int8 codes, one scale per 32 inputs) as two int4 planes, q = 16 * hi + lo (hi = q >> 4, lo = q & 15),
since PyTorch's int8 kernel takes one scale per row only: the two planes read the same bytes as int8 codes
and, both products being exact, sum to the file's values (float32; a bfloat16 model's scales round).
"""

from dataclasses import dataclass
from typing import cast

import torch
from torch.nn import functional as F

from cluster.config.serving import INT4_GROUP, WeightQuant
from cluster.network.model_cost import LowBitKind, fp16_gemm_available, packed_bytes

__all__ = ["INT4_GROUP", "LowBitWeight", "WeightQuant", "dequantize", "project", "quantize"]

FP16_MAX = 65504.0


@dataclass(frozen=True, slots=True)
class LowBitWeight:
    """A packed [N, K] weight and its scales; `matmul(x)` is x [T, K] @ W.T -> [T, N] in x's dtype."""

    kind: LowBitKind
    packed: torch.Tensor | torch.ScriptObject  # fp16: FBGEMM's packed matrix (an opaque object)
    scales: torch.Tensor  # int8: [N]; int4: [K / group, N, 2] (scale, zero); fp16: none (empty)
    out_features: int
    nbytes: int  # of the packed copy and its scales
    planes: tuple["LowBitWeight", ...] = ()  # int8_g32: its high and low int4 planes (packed/scales unused)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.planes:
            high, low = self.planes
            return high.matmul(x) + low.matmul(x)
        if self.kind == "fp16":
            return torch.ops.quantized.linear_dynamic_fp16(x.float(), self.packed).to(x.dtype)
        packed = cast(torch.Tensor, self.packed)
        if self.kind == "int8":
            return torch._weight_int8pack_mm(x, packed, self.scales)
        return torch._weight_int4pack_mm_for_cpu(x, packed, INT4_GROUP, self.scales)


def quantize(weight: torch.Tensor, kind: LowBitKind) -> LowBitWeight | None:
    """The packed copy of `weight` [N, K], or None where the kernel cannot take its shape, values or device."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if kind == "int4":
        return quantize_int4(weight) if weight.shape[1] % INT4_GROUP == 0 else None
    if kind == "fp16":
        return quantize_fp16(weight) if fp16_gemm_available() and _fits_fp16(weight) else None
    return quantize_int8(weight)


def _fits_fp16(weight: torch.Tensor) -> bool:
    return bool(weight.abs().max() <= FP16_MAX) if weight.numel() else False


def quantize_fp16(weight: torch.Tensor) -> LowBitWeight:
    """FBGEMM's packed fp16 copy (bfloat16 values within fp16's range convert exactly, bar subnormals)."""
    rows, cols = weight.shape
    packed = torch.ops.quantized.linear_prepack_fp16(weight.float().contiguous(), None)
    return LowBitWeight("fp16", packed, torch.empty(0), rows, packed_bytes(rows, cols, "fp16", 2))


def quantize_int8(weight: torch.Tensor) -> LowBitWeight:
    """Symmetric per-row int8: w ~ q * scale, q in [-127, 127]."""
    full = weight.float()
    scale = (full.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(full / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
    scales = scale.to(weight.dtype)
    return LowBitWeight("int8", q, scales, weight.shape[0], q.numel() + scales.numel() * scales.element_size())


def quantize_int4(weight: torch.Tensor) -> LowBitWeight:
    """Affine int4 per group of INT4_GROUP inputs: min..max of the group onto q = 0..15."""
    rows, cols = weight.shape
    groups = weight.float().view(rows, cols // INT4_GROUP, INT4_GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(rows, cols)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
    scales = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(weight.dtype)
    nbytes = packed.numel() * packed.element_size() + scales.numel() * scales.element_size()
    return LowBitWeight("int4", packed, scales, rows, nbytes)


def int4_from_blocks(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> LowBitWeight:
    """Pack codes q [N, K] (0..15) with per-group scale and zero [N, K / 32]: w = (q - 8) * scale + zero."""
    rows = q.shape[0]
    packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    scales = torch.stack([scale.float(), zero.float()], dim=-1).transpose(0, 1).contiguous().to(dtype)
    nbytes = packed.numel() * packed.element_size() + scales.numel() * scales.element_size()
    return LowBitWeight("int4", packed, scales, rows, nbytes)


def int8_g32_from_blocks(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> LowBitWeight:
    """Int8 codes q [N, K] with one scale per 32 inputs [N, K / 32] (w = q * scale), as two int4 planes."""
    codes = q.to(torch.int32)
    high = int4_from_blocks((codes >> 4) + 8, 16 * scale, torch.zeros_like(scale), dtype)  # (hi + 8 - 8) * 16s
    low = int4_from_blocks(codes & 0x0F, scale, 8 * scale, dtype)  # (lo - 8) * s + 8s
    return LowBitWeight("int8_g32", high.packed, high.scales, q.shape[0], high.nbytes + low.nbytes, (high, low))


def dequantize(low: LowBitWeight, in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [N, K] matrix the packed copy stands for (what its matmul multiplies by)."""
    eye = torch.eye(in_features, dtype=low.scales.dtype)
    return low.matmul(eye).t().to(dtype).contiguous()


def project(x: torch.Tensor, dense: torch.Tensor, low: LowBitWeight | None, max_rows: int) -> torch.Tensor:
    """x [T, K] @ dense.T: through the packed copy when there is one and T <= max_rows, else dense."""
    if low is not None and x.shape[0] <= max_rows:
        return low.matmul(x)
    return F.linear(x, dense)
