"""Scale estimation: refit each group's scale of a 4-bit weight to the layer's output on calibration data.

For a weight W [N, K] in groups of g, with the calibration Hessian H = X^T X / T over all T tokens
and per-channel importance a_k = max|x_k| (NNCF's algorithm, `scale_estimation.py`):
- start from the round-to-nearest scale s0 and codes q (the zero point z stays fixed);
- the error of a group is the mean over tokens of (W_g x_g - Q(W_g) x_g)^2, per output channel,
  computed exactly from H's g x g diagonal block: d^T H_g d with d = W_g - Q(W_g) (NNCF measures it
  on per-sample mean activations instead);
- a candidate scale is the importance-weighted mean of the per-element ideal scales,
  s = sum_i a_i |w_i| / sum_i a_i |v_i| ... written as sum_i a_i' |w_i| / (|v_i| + 0.001 [v_i = 0]) with
  a' = a zeroed where v_i = 0 and normalised per group, v = decode(q) - z;
- `initial_steps` rounds of: candidate from the current codes, re-quantize with it, keep per group
  where the error drops; then `scale_steps` candidates from the codes of (1 - 0.05 k) * s0.
The scales are stored as f16 and the codes computed from the stored scale, as RTN does, so the
artifact computes exactly what was measured. The summary has each layer's output error (relative,
on the calibration data, summed over groups) with RTN and with the refitted scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompiler.config import Mode
from qcompiler.hookspecs import hookimpl
from qcompiler.ir import Graph
from qcompiler.passmanager import BlockPass, PassContext, PassResult
from qcompiler.quant import (CompressedWeight, _f16_scale, decode_values, grouped, matrix_view, quantize,
                             quantize_matrix_with_scale)

MODES = (Mode.INT4_SYM, Mode.INT4_ASYM, Mode.NF4)


@dataclass(frozen=True)
class ScaleEstimationOptions:
    initial_steps: int = 5
    scale_steps: int = 5


class ScaleEstimation(BlockPass):
    name = "scale_estimation"
    Options = ScaleEstimationOptions
    statistics = frozenset({"abs_max"})  # and each weight's "hessian_blocks:<group size>" (see wants)

    @classmethod
    def options_from(cls, config):
        return cls.Options() if config.scale_estimation and not config.gptq else None

    def start(self, graph: Graph, ctx: PassContext) -> None:
        self.layers: dict[str, dict] = {}

    def wants(self, graph, ctx) -> list[str]:
        self.pending = {c.attrs["weight"]: (c, axes) for c, axes in targets(graph)}
        self.not_targets = {c.attrs["weight"]: "not a 2-D weight read by one MatMul in a mode this pass takes: rounded "
                            "to nearest" for c in graph.weight_constants() if c.meta.get("role") == "primary"
                            and "compressed" not in c.meta and c.attrs["weight"] not in self.pending}
        return {name: self.statistics | {f"hessian_blocks:{_group(c, axes, graph)}"}
                for name, (c, axes) in self.pending.items()}

    def run_block(self, graph: Graph, block, stats, ctx) -> None:
        for name, (const, axes) in list(self.pending.items()):
            if name not in stats or stats[name].tokens == 0:
                continue
            fmt = const.meta["format"]
            w, transposed = matrix_view(graph.weight(const).float(), axes)
            st = stats[name]
            cw, before, after = estimate(w, st.hessian_blocks / max(st.tokens, 1), st.abs_max, fmt.mode,
                                         fmt.group_size, self.options.initial_steps, self.options.scale_steps)
            cw.shape, cw.transposed = tuple(graph.tensor(const).shape), transposed
            const.meta["compressed"] = cw
            self.layers[name] = {"error_rtn": before, "error_after": after}
            del self.pending[name]

    def finish(self, graph, ctx) -> PassResult:
        skipped = {**self.not_targets, **{name: "no calibration statistics (outside the transformer blocks, or "
                                                "no token reached it): rounded to nearest" for name in self.pending}}
        return PassResult(bool(self.layers), {"estimated": len(self.layers), "skipped": skipped,
                                              "layers": self.layers})


def _group(const, axes, graph) -> int:
    g = const.meta["format"].group_size
    return matrix_view(graph.tensor(const), axes)[0].shape[1] if g == -1 else g


def targets(graph: Graph) -> list:
    """Primary 4-bit linear weights ([out, in], read by one MatMul) not yet compressed."""
    out = []
    for const, uses in graph.uses_by_weight().items():
        fmt = const.meta.get("format")
        if (const.meta.get("role") == "primary" and fmt is not None and fmt.mode in MODES and "compressed" not in const.meta
                and len(uses) == 1 and uses[0].op.op == "MatMul" and len(const.meta.get("shape", ())) == 2):
            out.append((const, uses[0].reduction_axes))
    return out


def group_error(w: torch.Tensor, deq: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[N, G]: the mean squared output error of each group, d^T H_g d, for w and deq grouped [N, G, g]
    and the Hessian's diagonal blocks [G, g, g]."""
    diff = w - deq
    return (torch.bmm(diff.transpose(0, 1), blocks).transpose(0, 1) * diff).sum(-1)


def hessian_blocks(h: torch.Tensor, g: int) -> torch.Tensor:
    """The g x g diagonal blocks [K/g, g, g] of a K x K matrix."""
    k = h.shape[0]
    return torch.stack([h[i:i + g, i:i + g] for i in range(0, k, g)])


def estimate(w: torch.Tensor, blocks: torch.Tensor, importance: torch.Tensor, mode: Mode, group_size: int,
             initial_steps: int = 5, scale_steps: int = 5) -> tuple[CompressedWeight, float, float]:
    """(compressed weight, relative output error with RTN, with the refitted scales) of W [N, K], for
    the g x g diagonal blocks [K/g, g, g] of its inputs' mean Hessian X^T X / T (`hessian_blocks`)."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    wg = grouped(w, g).reshape(n, k // g, g)
    xg = blocks.float()
    rtn = quantize(w, (1,), mode, group_size)
    scale, zp = rtn.scale.float().reshape(n, k // g, 1), rtn.zero_point
    zp = None if zp is None else zp.reshape(n, k // g, 1)
    imp = importance.float().reshape(1, k // g, g)

    def decode(s16, z):
        codes = quantize_matrix_with_scale(wg, mode, s16, z)
        values = decode_values(mode, codes)
        return codes, values - z.float() if z is not None else values

    def error(s16, z):
        codes, v = decode(s16, z)
        return group_error(wg, v * s16.float(), xg), v

    best_s = _f16_scale(scale)
    best_err, v = error(best_s, zp)
    base = float(best_err.sum())

    w_abs = wg.abs()
    sign = torch.sign(best_s.float())
    s_rtn = best_s.float()
    a = imp * (v != 0)  # importance, zero where round to nearest gave a zero code, normalised per group
    a = a / a.sum(-1, keepdim=True).clamp(min=1e-12)

    def candidate(v):
        ideal = w_abs / torch.where(v != 0, v.abs(), 0.001)
        return _f16_scale(sign * (a * ideal).sum(-1, keepdim=True).clamp(min=1e-12))

    def keep(s16, err):
        nonlocal best_s, best_err
        better = (err < best_err)[..., None]
        best_s = torch.where(better, s16, best_s)
        best_err = torch.minimum(err, best_err)

    for _ in range(initial_steps):
        s16 = candidate(v)
        err, _ = error(s16, zp)
        keep(s16, err)
        _, v = decode(best_s, zp)
    for step in range(scale_steps):
        _, v_step = decode(_f16_scale(s_rtn * (1 - 0.05 * step)), zp)
        s16 = candidate(v_step)
        err, _ = error(s16, zp)
        keep(s16, err)
    codes = quantize_matrix_with_scale(wg, mode, best_s, zp)
    if g == k:  # one group per row: the per-channel layout, as round to nearest writes it
        codes, best_s = codes.reshape(n, k), best_s.reshape(n, 1)
        zp = None if zp is None else zp.reshape(n, 1)
    cw = CompressedWeight(mode, group_size, codes, best_s, zp, (n, k))
    reference = float(group_error(wg, torch.zeros_like(wg), xg).sum()) or 1.0
    return cw, base / reference, float(best_err.sum()) / reference


@hookimpl
def qcompiler_register_passes():
    return [ScaleEstimation]

