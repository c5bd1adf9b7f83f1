"""Float8 (e4m3) matrix products for a step's linear layers, for Hopper-class GPUs (``precision: fp8``).

Each ``nn.Linear`` of the layers a step compiles becomes a :class:`Fp8Linear`: its weight stored in float8
e4m3 with one scale per output channel (the row's largest magnitude maps to e4m3's largest, 448), and at
run time each input row (token) quantized with a scale of its own, then one ``torch._scaled_mm`` with both
scale vectors and a bfloat16 output. Under ``torch.compile`` the input's quantization fuses into a kernel or
two around the product. Half the weight bytes and twice bf16's tensor-core rate; the cost is rounding
(e4m3 keeps 3 mantissa bits), which whoever uses it measures against bf16 (benchmarks/fp8_encoder.py, and
the serving instance's check against its artifact).
"""

from __future__ import annotations

import torch
from torch import nn

E4M3_MAX = 448.0


def _scales(t: torch.Tensor) -> torch.Tensor:
    """Per-row scales of a 2-d tensor: its rows' largest magnitude over e4m3's largest, float32 [rows, 1]."""
    return (t.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp(min=1e-12)


class Fp8Linear(nn.Module):
    """``linear``'s product in float8: y = (x / sx) @ (W / sw)^T * sx * sw + b, rows of x and W scaled alone."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach()
        if weight.shape[0] % 16 or weight.shape[1] % 16:
            raise ValueError(f"fp8 products need both weight dims a multiple of 16, got {tuple(weight.shape)}")
        scale = _scales(weight)
        self.register_buffer("weight", (weight.float() / scale).to(torch.float8_e4m3fn))  # [out, in]
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.bias = linear.bias
        self.out_dtype = weight.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        scale = _scales(rows)
        quantized = (rows.float() / scale).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(quantized, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                             out_dtype=torch.bfloat16).to(self.out_dtype)  # fmt: skip
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def to_fp8(targets) -> int:
    """Replace each ``owner.<attribute>`` (an ``nn.Linear``) of ``targets`` by a :class:`Fp8Linear`, in place;
    the count replaced."""
    count = 0
    for owner, attribute in targets:
        setattr(owner, attribute, Fp8Linear(getattr(owner, attribute)))
        count += 1
    return count


def fp8_unsupported(device: str) -> str:
    """Why this device cannot run the fp8 products, or "" (float8 tensor cores: compute capability 8.9+)."""
    if not device.startswith("cuda"):
        return f"a {device} device (fp8 products need a GPU of compute capability 8.9 or newer)"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return f"compute capability {major}.{minor} (fp8 products need 8.9 or newer)"
    return ""
