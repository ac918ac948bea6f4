"""Linear layers on torch's CPU integer kernels.

Codes are stored plainly and packed here, at load time, because the int4 pack layout depends on
the CPU's instruction set. Activations go through the kernels in bf16, the only vectorized path.

- int4 (`_weight_int4pack_mm_for_cpu`, groups of 32/64/128/256): the kernel computes
  w = (q - 8) * scale + zero per group, with q in 0..15. Symmetric codes c in [-8, 7] are
  q = c + 8 with zero = 0; asymmetric (q - zp) * s becomes zero = (8 - zp) * s.
- int8 (`_weight_int8pack_mm`, per channel): y = x @ (c * s)^T with c int8; the kernel needs a
  multiple of 16 inputs (it crashes on a rest), so other layers (a rank-8 LoRA adapter) decode c here. Asymmetric codes q in
  0..255 are c = q - 128 plus a per-channel offset (128 - zp) * s times the sum of x over K.
"""

from __future__ import annotations

import torch

INT4_GROUP_SIZES = (32, 64, 128, 256)


class Int4Linear(torch.nn.Module):
    def __init__(self, codes, scale, zero_point, group_size: int, bias=None) -> None:
        super().__init__()
        n = codes.shape[0]
        q = codes.reshape(n, -1).to(torch.int32)
        k = q.shape[1]
        s = scale.reshape(n, -1).float()
        if zero_point is None:
            q, zero = q + 8, torch.zeros_like(s)
        else:
            zero = (8 - zero_point.reshape(n, -1).float()) * s
        self.in_features, self.out_features, self.group_size = k, n, group_size
        self.register_buffer("packed", torch._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scale_zero", torch.stack([s.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous())
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scale_zero)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(torch.nn.Module):
    def __init__(self, codes, scale, zero_point, bias=None) -> None:
        super().__init__()
        n = codes.shape[0]
        s = scale.reshape(n).float()
        if zero_point is None:
            c, offset = codes.reshape(n, -1), None
        else:
            c = (codes.reshape(n, -1).to(torch.int16) - 128).to(torch.int8)
            offset = ((128 - zero_point.reshape(n).float()) * s).to(torch.bfloat16)
        self.in_features, self.out_features = c.shape[1], n
        self.register_buffer("codes", c.contiguous())
        self.register_buffer("scale", s.to(torch.bfloat16))
        self.register_buffer("offset", offset)
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if self.in_features % 16:  # the kernel reads 16 inputs at a time (and crashes on a rest): decode here
            y = (flat.float() @ self.codes.float().t() * self.scale.float()).to(torch.bfloat16)
        else:
            y = torch._weight_int8pack_mm(flat, self.codes, self.scale)
        if self.offset is not None:
            y = y + flat.float().sum(-1, keepdim=True).to(torch.bfloat16) * self.offset
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def w8a8_available() -> bool:
    """oneDNN's int8 Linear (x86 CPUs; what torch's inductor lowers its x86 quantization to) is in this torch."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.onednn, "qlinear_pointwise")


class W8A8Linear(torch.nn.Module):
    """int8_sym per-channel weights and u8 per-tensor activations, the product in integers on oneDNN's
    u8 x s8 kernel (`torch.ops.onednn.qlinear_pointwise`, float output with the bias).

    x [/ s] is quantized here, q = clamp(round(x / (s a)) + z, 0, 255) in one multiply (s: SmoothQuant's
    scale where it had no op to fold into): static, a and z from the calibrated range; dynamic, from
    this call's min and max (zero exactly representable, as `qcompiler.activations.static_range`).
    Chosen by `benchmarks/w8a8_torch_kernels.py` on the Linear shapes of SmolLM2 and MiniLM, time over
    float32 F.linear's (AVX-512 VNNI, 2 cores; benchmarks/measured/w8a8-torch-kernels-2026-11-28-s14.json):
    this kernel with the quantization of x 0.80, `torch._int_mm` 0.91, `_weight_int8pack_mm` (int8 weights,
    bf16 activations) 2.7; FBGEMM's `quantized.linear_dynamic` 0.61 (faster on MiniLM's 4096-row products,
    but dynamic only, on deprecated quantized tensors; the static FBGEMM Linear requantizes its output).
    """

    def __init__(self, codes, scale, activation: dict, smooth=None, bias=None) -> None:
        super().__init__()
        n = codes.shape[0]
        c = codes.reshape(n, -1).to(torch.int8).contiguous()
        self.in_features, self.out_features = c.shape[1], n
        self.dynamic = bool(activation["dynamic"])
        self.register_buffer("w_scale", scale.reshape(n).float())
        self.register_buffer("w_zero", torch.zeros(n, dtype=torch.int64))
        self.register_buffer("inverse", None if smooth is None else (1.0 / smooth.float()))
        self.bias = bias
        self.packed = torch.ops.onednn.qlinear_prepack(c, None)
        if not self.dynamic:
            self.a_scale, self.a_zero = float(activation["scale"]), int(activation["zero_point"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        if self.inverse is not None:
            flat = flat * self.inverse
        if self.dynamic:
            low, high = min(float(flat.min()), 0.0), max(float(flat.max()), 0.0)
            a_scale = (high - low) / 255 or 1.0
            a_zero = min(max(int(round(-low / a_scale)), 0), 255)
        else:
            a_scale, a_zero = self.a_scale, self.a_zero
        q = torch.round(flat * (1.0 / a_scale)).add_(a_zero).clamp_(0, 255).to(torch.uint8)
        bias = None if self.bias is None else self.bias.float()
        y = torch.ops.onednn.qlinear_pointwise(q, a_scale, a_zero, self.packed, self.w_scale, self.w_zero, bias, 1.0, 0,
                                               torch.float32, "none", [], "")
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
