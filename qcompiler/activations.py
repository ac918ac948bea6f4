"""Activation quantization math, on torch tensors, and which MatMuls take it; no backend appears here.

A quantized activation is u8 per tensor (NNCF's MIXED preset for transformers: activations
asymmetric, weights int8_sym per output channel), either static, with a range from calibration
data, or dynamic, with the range the runtime measures on each call.

Static range: lo = min(x, 0), hi = max(x, 0) over the calibration tokens, s = (hi - lo) / 255,
z = clip(round(-lo / s), 0, 255); the range is then moved to (-z s, (255 - z) s) so that zero is a
code exactly. q = clip(round(x / s) + z, 0, 255), x ~ (q - z) s: onnxruntime's QuantizeLinear and
OpenVINO's FakeQuantize (256 levels on that range) compute the same codes from it.

Smoothed: where SmoothQuant found no op to fold its scale s into (a post-LN encoder's LayerNorm, whose
output also feeds the residual; a GELU), the weight is multiplied by s and the quantizer carries s: the
runtime quantizes x / s on [low, high] (a Multiply by 1 / s before the quantizer, as NNCF writes it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompiler.config import Mode

LEVELS = 256


@dataclass(frozen=True)
class ActivationQuant:
    """How one MatMul's activation input is quantized: `dynamic`, or static u8 on [low, high]."""

    dynamic: bool = False
    low: float = 0.0
    high: float = 0.0
    smooth: tuple[float, ...] | None = None  # per input channel s: the input is divided by it before quantizing

    @property
    def scale(self) -> float:
        return (self.high - self.low) / (LEVELS - 1)

    @property
    def zero_point(self) -> int:
        return int(round(-self.low / self.scale)) if self.scale > 0 else 0

    def fake(self, x: torch.Tensor) -> torch.Tensor:
        """x quantized and decoded, as the runtime computes it (dynamic: on x's own range)."""
        aq = static_range(float(x.min()), float(x.max())) if self.dynamic else self
        if aq.scale == 0:
            return torch.zeros_like(x)
        s, z = aq.scale, aq.zero_point
        return (torch.clamp(torch.round(x / s) + z, 0, LEVELS - 1) - z) * s


def static_range(low: float, high: float) -> ActivationQuant:
    """The static u8 quantizer of values in [low, high], with zero exactly representable."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if high - low <= 0:
        return ActivationQuant(low=0.0, high=0.0)
    s = float(torch.tensor((high - low) / (LEVELS - 1), dtype=torch.float32))
    z = min(max(int(round(-low / s)), 0), LEVELS - 1)
    low, high = float(torch.tensor(-z * s, dtype=torch.float32)), float(torch.tensor((LEVELS - 1 - z) * s,
                                                                                        dtype=torch.float32))
    return ActivationQuant(low=low, high=high)


def symmetric_range(low: float, high: float) -> ActivationQuant:
    """The signed (i8) quantizer of values in [low, high]: 256 levels on [-a, a * 127 / 128], a = max |x|,
    zero point 128 in u8 terms (NNCF's form for the attention's query and key, which OpenVINO's CPU plugin
    runs in its int8 attention; an asymmetric range keeps that attention in f32, measured)."""
    a = float(torch.tensor(max(abs(float(low)), abs(float(high))), dtype=torch.float32))
    if a <= 0:
        return ActivationQuant(low=0.0, high=0.0)
    return ActivationQuant(low=-a, high=float(torch.tensor(a * 127 / 128, dtype=torch.float32)))


def linear(graph, const, op) -> torch.Tensor:
    """A 2-D MatMul weight as [out, in] in float32: W for `x @ W^T` (transpose_b, torch's Linear), W^T for
    `x @ W` (an ONNX file's MatMul on a [in, out] initializer)."""
    w = graph.weight(const).float()
    return w if op.attrs.get("transpose_b") else w.t()


def scale_input_channels(w: torch.Tensor, op, factor: torch.Tensor) -> torch.Tensor:
    """MatMul `op`'s weight w with its input channels multiplied by `factor`, in w's own orientation and
    dtype: w's columns for `x @ W^T` (transpose_b, and batched weights), its rows for `x @ W`."""
    scale = factor[None, :] if op.attrs.get("transpose_b") or w.dim() != 2 else factor[:, None]
    return (w.float() * scale).to(w.dtype)


def eligible(const, op, users) -> str:
    """Why a MatMul weight (Constant `const` read by `op`; `users`: `Graph.consumers()`) takes no activation
    quantization ("" when it does): its weight must be int8_sym per channel, not ignored, read by this
    MatMul alone, and a 2-D linear weight (either orientation, see `linear`)."""
    fmt = const.meta.get("format")
    if fmt is None or fmt.mode is not Mode.INT8_SYM or fmt.group_size != -1:
        return "its weight is not int8_sym per channel"
    if "ignored" in op.meta or "ignored" in const.meta:
        return "in the ignored scope"
    if users[const] != [op]:
        return "the weight is shared with another op"
    if op.op != "MatMul" or len(const.meta.get("shape", ())) != 2:
        return "not a 2-D linear weight"
    return ""
