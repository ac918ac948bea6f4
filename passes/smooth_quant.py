"""SmoothQuant: activation outliers moved into the weights before the activations are quantized.

For the MatMuls that read one input x (q/k/v after an RMSNorm, gate/up after the second one, a
gated MLP's down projection after its Multiply), with per-channel calibration statistics
max|x_j| (over all calibration tokens) and max|W_j| (over the rows of every such MatMul):

    s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)   (clamped to >= 1e-5; INC's and the paper's formula)

and x / s, W * s leave the float function unchanged. The places a scale folds into are found by the
pattern language (`qcompiler.passes.awq_data._sites`, shared with AWQ): the norm's weight gamma / s,
or the rows of the MatMul before a gated Multiply (up_proj's rows / s); no per-architecture table.

alpha: a number in [0, 1], or "auto": per site, each alpha of 0, 0.1, ..., 1 and no smoothing at all
are measured by the output error of the quantized layers on the calibration rows X,
sum over targets ||X W^T - Qa(X / s) Qw(W s)^T||^2, Qa the static u8 per-tensor quantizer of the
smoothed input's range and Qw int8_sym per output channel, and the best is kept (INC's auto-alpha,
layer-wise). The statistics of the smoothed input are updated (x / s) for activation quantization.
The summary gives, per site, the alpha, the spread of s (min, max) and the errors before and after.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompiler.activations import static_range
from qcompiler.config import Mode
from qcompiler.hookspecs import hookimpl
from qcompiler.ir import Graph
from qcompiler.passes.awq_data import _apply, _sites
from qcompiler.passmanager import BlockPass, PassContext, PassResult
from qcompiler.quant import fake_quantize

GRID = tuple(i / 10 for i in range(11))


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float | str = "auto"
    rows: int = 512  # calibration rows the auto search measures on


def eligible(const, op, users) -> str:
    """Why a MatMul weight takes no activation quantization ("" when it does)."""
    fmt = const.meta.get("format")
    if fmt is None or fmt.mode is not Mode.INT8_SYM or fmt.group_size != -1:
        return "its weight is not int8_sym per channel"
    if "ignored" in op.meta or "ignored" in const.meta:
        return "in the ignored scope"
    if users[const] != [op]:
        return "the weight is shared with another op"
    if op.op != "MatMul" or not op.attrs.get("transpose_b") or len(const.meta.get("shape", ())) != 2:
        return "not a [out, in] linear weight"
    return ""


class SmoothQuant(BlockPass):
    name = "smooth_quant"
    Options = SmoothQuantOptions
    statistics = frozenset({"min_max", "rows"})

    @classmethod
    def options_from(cls, config):
        alpha = config.smoothing
        return None if alpha is None else cls.Options(alpha=alpha)

    def start(self, graph: Graph, ctx: PassContext) -> None:
        self.sites, self.skipped = _sites(graph, eligible)
        self.layers: dict[str, dict] = {}
        self.applied = {"gated": 0, "relu": 0, "norm": 0}

    def wants(self, graph, ctx) -> list[str]:
        return [c.attrs["weight"] for site in self.sites for _, c in site.targets]

    def run_block(self, graph: Graph, block, stats, ctx) -> None:
        for site in [s for s in self.sites if s.targets[0][1].attrs["weight"] in stats]:
            st = stats[site.targets[0][1].attrs["weight"]]
            if st.max is None:
                continue
            weights = [graph.weight(c).float() for _, c in site.targets]
            x_max = torch.maximum(st.max.abs(), st.min.abs()).clamp(min=1e-5)
            w_max = torch.cat(weights).abs().amax(0).clamp(min=1e-5)
            x = st.rows[: self.options.rows]

            def scale(alpha: float) -> torch.Tensor:
                return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)

            def loss(s: torch.Tensor) -> float:
                aq = static_range(float((st.min / s).min()), float((st.max / s).max()))
                xq = aq.fake(x / s)
                return sum(float((x @ w.t() - xq @ fake_quantize(w * s, Mode.INT8_SYM, -1).t()).pow(2).sum())
                           for w in weights)

            layer = {"pattern": site.pattern}
            ones = torch.ones_like(x_max)
            if self.options.alpha == "auto" and x.numel():
                norm = sum(float((x @ w.t()).pow(2).sum()) for w in weights) or 1.0
                candidates = [(loss(ones), None, ones)] + [(loss(scale(a)), a, scale(a)) for a in GRID]
                best = min(candidates, key=lambda c: c[0])
                _, alpha, s = best
                layer.update(error_before=candidates[0][0] / norm, error_after=best[0] / norm)
            else:
                alpha = float(self.options.alpha)
                s = scale(alpha)
                if x.numel():
                    norm = sum(float((x @ w.t()).pow(2).sum()) or 1.0 for w in weights)
                    layer.update(error_before=loss(ones) / norm, error_after=loss(s) / norm)
            layer["alpha"] = alpha
            if alpha is not None:
                layer["scale_min"], layer["scale_max"] = float(s.min()), float(s.max())
                _apply(graph, site, s, mark="smooth_quant")
                for seen in {id(stats[c.attrs["weight"]]): stats[c.attrs["weight"]] for _, c in site.targets}.values():
                    seen.scale_channels(1.0 / s)
                self.applied[site.pattern] += 1
            self.layers[", ".join(c.attrs["weight"] for _, c in site.targets)] = layer

    def finish(self, graph, ctx) -> PassResult:
        counts = {p: sum(1 for s in self.sites if s.pattern == p) for p in ("gated", "relu", "norm")}
        return PassResult(any(self.applied.values()), {
            "alpha": self.options.alpha, "matched": counts, "applied": dict(self.applied),
            "skipped": self.skipped, "layers": self.layers})


@hookimpl
def qcompiler_register_passes():
    return [SmoothQuant]
