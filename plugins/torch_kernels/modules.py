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
