"""Fitting one weight's compressed form to its calibration inputs, on tensors (no backend, no pass).

`estimate` is scale estimation's refit of group scales (the math is in `qcompiler.passes.scale_estimation`'s
docstring); GPTQ calls it per group too. `WeightFitPass` is the shape both passes share: a block
pass over the primary 2-D MatMul weights of some modes that fits each one from its input statistics,
writes its `compressed` form, and reports per layer the output error with round to nearest and after.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from qcompiler import _kernels
from qcompiler.config import Mode
from qcompiler.ir import Graph
from qcompiler.passmanager import BlockPass, PassContext, PassResult
from qcompiler.quant import (CompressedWeight, _f16_scale, decode_values, grouped, matrix_view, quantize,
                             quantize_matrix_with_scale)


class WeightFitPass(BlockPass):
    """A block pass fitting each primary 2-D MatMul weight in `modes` from its statistics; subclasses
    give `fit(w [N, K], stats, fmt) -> (CompressedWeight, error with RTN, error after)`."""

    count_key: ClassVar[str] = "fitted"

    def start(self, graph: Graph, ctx: PassContext) -> None:
        self.layers: dict[str, dict] = {}

    def wants(self, graph, ctx):
        self.pending = {c.attrs["weight"]: (c, axes) for c, axes in targets(graph, self.modes)}
        self.not_targets = {c.attrs["weight"]: "not a 2-D weight read by one MatMul in a mode this pass takes: rounded "
                            "to nearest" for c in graph.weight_constants() if c.meta.get("role") == "primary"
                            and "compressed" not in c.meta and c.attrs["weight"] not in self.pending}
        return {name: self.statistics_of(c, axes, c.meta["format"], graph) for name, (c, axes) in self.pending.items()}

    def prefetch(self, graph, ctx, formats) -> dict[str, frozenset]:
        """The statistics of the weights `targets` would take, had they these formats."""
        out = {}
        for const, uses in graph.uses_by_weight().items():
            fmt = formats.get(const.attrs["weight"])
            if _fits(const, uses, fmt, self.modes):
                out[const.attrs["weight"]] = self.statistics_of(const, uses[0].reduction_axes, fmt, graph)
        return out

    def statistics_of(self, const, axes, fmt, graph) -> frozenset:
        """What `fit` reads of one weight's input."""
        return self.statistics

    def ready(self, st) -> bool:
        return st.tokens > 0

    def fit(self, w: torch.Tensor, st, fmt) -> tuple[CompressedWeight, float, float]:
        raise NotImplementedError

    def run_block(self, graph: Graph, block, stats, ctx) -> None:
        for name, (const, axes) in list(self.pending.items()):
            st = stats.get(name)
            if st is None or not self.ready(st):
                continue
            w, transposed = matrix_view(graph.weight(const).float(), axes)
            cw, before, after = self.fit(w, st, const.meta["format"])
            cw.shape, cw.transposed = tuple(graph.tensor(const).shape), transposed
            const.meta["compressed"] = cw
            self.layers[name] = {"error_rtn": before, "error_after": after}
            del self.pending[name]

    def finish(self, graph, ctx) -> PassResult:
        skipped = {**self.not_targets, **{name: "no calibration statistics (outside the transformer blocks, or "
                                                "no token reached it): rounded to nearest" for name in self.pending}}
        return PassResult(bool(self.layers), {self.count_key: len(self.layers), "skipped": skipped,
                                              "layers": self.layers, **self.extra_summary()})

    def extra_summary(self) -> dict:
        return {}


def targets(graph: Graph, modes, compressed: bool = False) -> list:
    """(weight Constant, reduction axes) of the primary 2-D weights in `modes` read by one MatMul, not
    yet compressed (unless `compressed`)."""
    return [(const, uses[0].reduction_axes) for const, uses in graph.uses_by_weight().items()
            if const.meta.get("role") == "primary" and (compressed or "compressed" not in const.meta)
            and _fits(const, uses, const.meta.get("format"), modes)]


def _fits(const, uses, fmt, modes) -> bool:
    """A 2-D weight read by one MatMul, in format `fmt` of one of `modes`: what a weight-fit pass takes."""
    return (fmt is not None and fmt.mode in modes and len(uses) == 1 and uses[0].op.op == "MatMul"
            and len(const.meta.get("shape", ())) == 2)


def _error_by_group(diff: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """[G, N]: d^T H_g d for the differences grouped group-major [G, N, g]."""
    return (torch.bmm(diff, blocks) * diff).sum(-1)


def hessian_blocks(h: torch.Tensor, g: int) -> torch.Tensor:
    """The g x g diagonal blocks [K/g, g, g] of a K x K matrix."""
    k = h.shape[0]
    return torch.stack([h[i:i + g, i:i + g] for i in range(0, k, g)])


# scale estimation's defaults: rounds from the current codes, candidates from shrunken RTN scales (NNCF: 5)
INITIAL_STEPS, SCALE_STEPS = 5, 10
# the low-bit modes scale estimation refits (NNCF: the 4-bit ones; the 2- and 3-bit grids likewise)
ESTIMATE_MODES = (Mode.INT4_SYM, Mode.INT4_ASYM, Mode.NF4, Mode.INT3_SYM, Mode.INT3_ASYM, Mode.INT2_SYM, Mode.INT2_ASYM)


def estimate(w: torch.Tensor, blocks: torch.Tensor, importance: torch.Tensor, mode: Mode, group_size: int,
             initial_steps: int = 5, scale_steps: int = 5) -> tuple[CompressedWeight, float, float]:
    """(compressed weight, relative output error with RTN, with the refitted scales) of W [N, K], for
    the g x g diagonal blocks [K/g, g, g] of its inputs' mean Hessian X^T X / T (`hessian_blocks`).
    The integer modes with groups up to 256 run in C where the kernels are built
    (`_kernels.Kernels.scale_estimate`, the same steps per group row); `_search` is the reference and the
    path for NF4 and per-channel weights."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    # group-major [G, N, g] throughout: the error's batched MatMul reads contiguous groups
    wg = grouped(w, g).reshape(n, k // g, g).transpose(0, 1).contiguous()
    kernels = _kernels.get()
    if kernels is not None and mode.integer and g <= 256:  # larger Hessian blocks leave the cache: torch's
        # blocked matrix products win there (per-channel K = 512: 33 ms in C, 15 ms in torch)
        best_s, zp, rtn, best, ref = kernels.scale_estimate(wg, blocks, importance.reshape(k // g, g), mode,
                                                            initial_steps, scale_steps)
        base, best_err, reference = float(rtn.sum()), float(best.sum()), float(ref.sum()) or 1.0
    else:
        best_s, zp, base, best_err, reference = _search(w, wg, blocks, importance, mode, group_size, initial_steps,
                                                        scale_steps)
    wg, best_s = wg.transpose(0, 1).contiguous(), best_s.transpose(0, 1).contiguous()  # back to [N, G, g]
    zp = None if zp is None else zp.transpose(0, 1).contiguous()
    codes = quantize_matrix_with_scale(wg, mode, best_s, zp)
    if g == k:  # one group per row: the per-channel layout, as round to nearest writes it
        codes, best_s = codes.reshape(n, k), best_s.reshape(n, 1)
        zp = None if zp is None else zp.reshape(n, 1)
    cw = CompressedWeight(mode, group_size, codes, best_s, zp, (n, k))
    return cw, base / reference, best_err / reference


def _search(w, wg, blocks, importance, mode, group_size, initial_steps, scale_steps):
    """`estimate`'s search in torch, for W [N, K] and its group-major view wg [G, N, g]: (best f16 scale
    [G, N, 1], zero point or None, summed error with RTN, after, of the weights alone)."""
    (n, k), g = w.shape, wg.shape[2]
    xg = blocks.float()
    rtn = quantize(w, (1,), mode, group_size)
    scale = rtn.scale.float().reshape(n, k // g, 1).transpose(0, 1)
    zp = None if rtn.zero_point is None else rtn.zero_point.reshape(n, k // g, 1).transpose(0, 1)
    imp = importance.float().reshape(k // g, 1, g)

    zf = None if zp is None else zp.float()

    def decode(s16, z):  # the decoded values (code minus zero point) for scale s16, in float
        if not mode.integer:
            return decode_values(mode, quantize_matrix_with_scale(wg, mode, s16, z))
        v = (wg / s16.float()).round_()  # quantize_matrix_with_scale's rounding, kept in float
        if zf is None:
            half = 2 ** (mode.bits - 1)
            return v.clamp_(-half, half - 1)
        return v.add_(zf).clamp_(0, 2**mode.bits - 1).sub_(zf)

    def error(s16, z):
        v = decode(s16, z)
        return _error_by_group(torch.addcmul(wg, v, s16.float(), value=-1), xg), v

    best_s = _f16_scale(scale)
    best_err, v = error(best_s, zp)
    base = float(best_err.sum())

    sign = torch.sign(best_s.float())
    s_rtn = best_s.float()
    a = imp * (v != 0)  # importance, zero where round to nearest gave a zero code, normalised per group
    a = a / a.sum(-1, keepdim=True).clamp(min=1e-12)
    weighted = a * wg.abs()  # a_i |w_i|, the numerator of every candidate

    def candidate(v):  # sum_i a_i |w_i| / |v_i|, with 0.001 for a zero code (|v| >= 0.07 otherwise)
        return _f16_scale(sign * (weighted / v.abs().clamp_(min=0.001)).sum(-1, keepdim=True).clamp(min=1e-12))

    def keep(s16, err):
        nonlocal best_s, best_err
        better = (err < best_err)[..., None]
        best_s = torch.where(better, s16, best_s)
        best_err = torch.minimum(err, best_err)

    for _ in range(initial_steps):
        s16 = candidate(v)
        err, _ = error(s16, zp)
        keep(s16, err)
        v = decode(best_s, zp)
    for step in range(scale_steps):
        v_step = decode(_f16_scale(s_rtn * (1 - 0.05 * step)), zp)
        s16 = candidate(v_step)
        err, _ = error(s16, zp)
        keep(s16, err)
    reference = float(_error_by_group(wg, xg).sum()) or 1.0
    return best_s, zp, base, float(best_err.sum()), reference
