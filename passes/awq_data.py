"""AWQ with calibration data: per-input-channel scales searched on the block's own activations.

Two patterns, found by the pattern language, each a place where a scale s on the input channels of
the target MatMuls can be folded into the op before them, so the float function is unchanged:
- `gated`: MatMul -> Multiply -> MatMul (a gated MLP's down projection): W2[:, k] *= s_k and the
  first MatMul's output channel k is divided by s_k (of its up half, when gate and up are one fused
  weight whose output is split, as phi3's; `qcompiler.scale_sites.gated_matches`);
- `norm`: Multiply(gamma, y) -> MatMuls (q/k/v after an RMSNorm, gate/up after the second one):
  every target's W[:, k] *= s_k, and gamma_k /= s_k. All consumers of the norm must be targets.

For a group of targets reading the same input x (rows X of the calibration sub-sample), the search
is AWQ's: s = mean|x|^alpha / mean|W|^(1 - alpha) (AutoAWQ's duo scaling; |W| relative to its
group's max, averaged over output channels), normalised by sqrt(max * min), for alpha in 0, 1/grid,
..., (grid-1)/grid, each measured by sum over targets of ||X W^T - (X / s) Q(W * s)^T||^2, Q being
round to nearest in the weight's assigned format; no scale (s = 1) is a candidate too.
When scale estimation follows (on its own or inside GPTQ), the `refit_top` best candidates are
measured again with Q the scale-estimation refit of W * s on the same rows, and the best of them is
kept: the scale that is best for round to nearest is not always best once the scales are refitted
(SmolLM2 int4 g64, held-out perplexity with AWQ + SE: 22.53 -> 22.34 with 2, 22.45 with 3).
Otherwise the best by the round-to-nearest error is kept. The statistics of the scaled input are updated (x / s) for the passes
after this one. The summary counts matches and applications per pattern, and per layer the chosen
alpha and the error before and after (round to nearest; with the refit too when it chose).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompiler.hookspecs import hookimpl
from qcompiler.ir import Graph
from qcompiler.passmanager import BlockPass, PassContext, PassResult
from qcompiler import scale_sites
from qcompiler.engine import hessian_blocks_of, native_bf16
from qcompiler.quant import awq_residual, matrix_view
from qcompiler.weight_fit import ESTIMATE_MODES, INITIAL_STEPS, SCALE_STEPS, estimate

@dataclass(frozen=True)
class AWQOptions:
    # alphas 0, 1/20, ..., 19/20 (AutoAWQ's and NNCF's grid). A grid of 40 took SmolLM2's held-out
    # perplexity with scale estimation from 22.53 to 22.16, but with GPTQ after it from 21.83 to 22.08
    # (benchmarks/measured/data_aware-2026-11-27-s7-awq-grid40.json): not adopted
    grid: int = 20
    # calibration rows the search measures the error on. 1024 took SmolLM2's held-out perplexity with AWQ + SE
    # from 22.45 to 22.39 but with GPTQ after it from 21.99 to 22.06 (the latter moves by 0.2 with summation order)
    rows: int = 256
    duo: bool = True  # divide by mean|W|^(1 - alpha) too (AutoAWQ's duo scaling)
    # the search's MatMuls in bf16 where the CPU has bf16 units (the losses it compares differ by far more than
    # bf16's error); elsewhere float32: emulated bf16 took 20 of SmolLM2's 74 s with AWQ + SE on an AVX-512 Xeon
    bf16: bool = True
    refit_top: int = 2  # candidates measured again after scale estimation's refit, when it follows (0: never)
    refit: bool = False  # scale estimation follows (set from its switch)
    refit_steps: tuple[int, int] = (INITIAL_STEPS, SCALE_STEPS)  # its steps (set from its options)


class DataAwareAWQ(BlockPass):
    name = "awq_data"
    Options = AWQOptions
    statistics = frozenset({"abs_mean", "rows"})

    @classmethod
    def options_from(cls, config):
        if not config.awq or config.dataset is None:
            return None
        asked = config.switched_on().get("scale_estimation") or {}  # its options, as the user gave them
        steps = (asked.get("initial_steps", INITIAL_STEPS), asked.get("scale_steps", SCALE_STEPS))
        return cls.Options(refit=config.switch("scale_estimation"), refit_steps=steps)

    def start(self, graph: Graph, ctx: PassContext) -> None:
        self.sites, self.skipped = scale_sites.sites(graph, _eligible)
        self.applied = {"gated": 0, "relu": 0, "norm": 0}
        self.layers: dict[str, dict] = {}

    def wants(self, graph, ctx) -> list[str]:
        return [c.attrs["weight"] for site in self.sites for _, c in site.targets]

    def run_block(self, graph: Graph, block, stats, ctx) -> None:
        mine = [s for s in self.sites if s.targets[0][1].attrs["weight"] in stats]
        for site in mine:
            st = stats[site.targets[0][1].attrs["weight"]]
            x = st.rows[: self.options.rows]
            if x.numel() == 0:
                continue
            weights = [matrix_view(graph.weight(c).float(), (1,))[0] for _, c in site.targets]
            fmts = [c.meta["format"] for _, c in site.targets]
            mean = st.abs_mean.clamp(min=1e-8)
            w_mean = _weight_magnitude(weights, fmts[0].group_size) if self.options.duo else None

            xb = x.to(torch.bfloat16) if self.options.bf16 and native_bf16() else x

            def loss(s: torch.Tensor) -> float:  # X W^T - (X / s) Q(W s)^T = X (W - Q(W s) / s)^T
                return sum(_output_error(xb, awq_residual(w, s, f.mode, f.group_size)) for w, f in zip(weights, fmts))

            ones = torch.ones_like(mean)
            candidates = [(loss(ones), None, ones)]  # (round-to-nearest error, alpha, s); None: no scale
            for step in range(self.options.grid):
                alpha = step / self.options.grid
                s = mean.pow(alpha)
                if w_mean is not None:
                    s = (s / (w_mean.pow(1 - alpha) + 1e-4)).clamp(min=1e-4)
                s = s / (s.max() * s.min()).sqrt()
                candidates.append((loss(s), alpha, s))
            norm = sum(float((x @ w.t()).pow(2).sum()) for w in weights) or 1.0
            layer = {"pattern": site.pattern}
            if self.options.refit and self.options.refit_top > 0 and all(f.mode in ESTIMATE_MODES for f in fmts):
                top = sorted(candidates, key=lambda c: c[0])[: self.options.refit_top]
                refits = [_refit_error(x, xb, weights, fmts, c[2], self.options.refit_steps) for c in top]
                best = top[refits.index(min(refits))]
                layer["error_refit"] = min(refits) / norm
            else:
                best = min(candidates, key=lambda c: c[0])
            loss_after, alpha, s = best
            self.layers[site.targets[-1][1].attrs["weight"]] = {
                **layer, "alpha": alpha, "error_before": candidates[0][0] / norm, "error_after": loss_after / norm}
            if alpha is None:
                continue
            scale_sites.apply(graph, site, s)
            for seen in {id(stats[c.attrs["weight"]]): stats[c.attrs["weight"]] for _, c in site.targets}.values():
                seen.scale_channels(1.0 / s)
            self.applied[site.pattern] += 1

    def finish(self, graph, ctx) -> PassResult:
        counts = {p: sum(1 for s in self.sites if s.pattern == p) for p in ("gated", "relu", "norm")}
        return PassResult(any(self.applied.values()), {
            "matched": counts, "applied": dict(self.applied), "skipped": self.skipped,
            "layers": self.layers, "grid": self.options.grid})




def _refit_error(x: torch.Tensor, xb: torch.Tensor, weights, fmts, s: torch.Tensor, steps: tuple[int, int]) -> float:
    """sum over targets of ||X W^T - (X / s) Q(W s)^T||^2, Q scale estimation's refit of the scaled weight
    on the rows X / s (their Hessian's diagonal blocks and max |x| as importance)."""
    xs = x / s
    blocks: dict[int, torch.Tensor] = {}
    total = 0.0
    for w, f in zip(weights, fmts):
        g = w.shape[1] if f.group_size == -1 else f.group_size
        if g not in blocks:
            blocks[g] = hessian_blocks_of(xs, g) / xs.shape[0]
        cw, _, _ = estimate(w * s, blocks[g], xs.abs().amax(0), f.mode, f.group_size, *steps)
        total += _output_error(xb, w - cw.dequantize().float().reshape(w.shape) / s)
    return total


def _output_error(xb: torch.Tensor, residual: torch.Tensor) -> float:
    """||X R^T||^2 for a weight residual R, in the search's dtype (that of the rows `xb`)."""
    return float((xb @ residual.to(xb.dtype).t()).float().pow(2).sum())


def _weight_magnitude(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Per input channel, the mean over output channels of |W| relative to its group's max (AutoAWQ)."""
    w = torch.cat(weights)
    g = w.shape[1] if group_size == -1 else group_size
    grouped = w.abs().reshape(w.shape[0], -1, g)
    return (grouped / (grouped.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)


def _eligible(const, op, users) -> str:
    fmt = const.meta.get("format")
    if const.meta.get("role") != "primary" or fmt is None or not fmt.mode.low_bit:
        return "not in low-bit primary precision"
    if "ignored" in op.meta:
        return "in the ignored scope"
    if users[const] != [op]:
        return "the weight is shared with another op"
    if not op.attrs.get("transpose_b") or graph_rank(const) != 2:
        return "not a [out, in] linear weight"
    return ""


def graph_rank(const) -> int:
    return len(const.meta.get("shape", ()))


@hookimpl
def qcompiler_register_passes():
    return [DataAwareAWQ]

