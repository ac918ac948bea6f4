"""GPTQ: round a weight column by column, pushing each column's rounding error onto the columns not yet
rounded, weighted by the inverse Hessian of the layer's calibration inputs (Frantar et al. 2022).

For W [N, K] with H = X^T X over the calibration tokens (the engine's "hessian"):
- dead input channels (H_kk = 0) are zeroed; H += damp * mean(diag H) * I;
- U = chol(H^-1) (upper); in blocks of `block` columns, for each column j: at a group start the
  group's scale (and zero point) is computed from the current, already updated columns (RTN's
  formulas, or scale estimation's refit on the group's Hessian block when both are asked for), then
  q_j = Q(w_j), e = (w_j - q_j) / U_jj, and w_{j+1..} -= e U_{j, j+1..}; after a block, the
  remaining columns take the block's errors at once.
- blocks run in order and each takes the outputs of the compressed blocks before it.
The codes are computed from the f16-stored scales, so the artifact computes what was optimised.
The summary has each layer's output error tr(D H D^T) / tr(W H W^T) (D = W - Q(W)) with RTN and GPTQ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from qcompiler.config import Mode
from qcompiler.hookspecs import hookimpl
from qcompiler.quant import CompressedWeight, code_dtype, decode_values, matrix_view, quantize, quantize_matrix_with_scale
from qcompiler.weight_fit import ESTIMATE_MODES, WeightFitPass, estimate

MODES = (Mode.INT4_SYM, Mode.INT4_ASYM, Mode.INT8_SYM, Mode.INT8_ASYM, Mode.NF4, Mode.INT3_SYM, Mode.INT3_ASYM,
         Mode.INT2_SYM, Mode.INT2_ASYM)


@dataclass(frozen=True)
class GPTQOptions:
    # NNCF's damping. On SmolLM2 with AWQ + scale estimation, held-out perplexity moves by 0.2-0.3 with the
    # summation order of the scale refit (21.75-22.08 with 0.1, 22.00-22.16 with 0.01, 21.96 with 0.05)
    damp: float = field(default=0.1, metadata={"help": "damping, a fraction of the Hessian's mean diagonal",
                                                "above": 0})
    block: int = field(default=128, metadata={"help": "columns updated together", "min": 1})
    scale_estimation: bool = False  # set from scale estimation's switch: each group's scale refitted as it is reached
    scales_by_default: bool = False  # ... because a dataset was given, not asked for (said in the report)


class GPTQ(WeightFitPass):
    name = "gptq"
    Options = GPTQOptions
    propagate_compressed = True
    modes = MODES
    modes_reason = "GPTQ rounds to integer and NF4 grids (NNCF refuses the other modes too)"
    flag = "--gptq"
    help = "GPTQ rounding on calibration data"
    needs_data = True
    conflicts = ("lora_correction",)
    count_key = "quantized"

    @classmethod
    def options_from(cls, config):
        options = super().options_from(config)
        return None if options is None else dataclasses.replace(
            options, scale_estimation=config.switch("scale_estimation"),
            scales_by_default=config.scale_estimation is None and config.switch("scale_estimation"))

    @property
    def statistics(self):
        return frozenset({"hessian", "abs_max"}) if self.options.scale_estimation else frozenset({"hessian"})

    def ready(self, st) -> bool:
        return st.hessian is not None

    def fit(self, w, st, fmt, errors: bool = True):
        mean_h = st.hessian / max(st.tokens, 1)
        refit = None
        if self.options.scale_estimation and fmt.mode in ESTIMATE_MODES:
            refit = lambda group, cols: estimate(group, mean_h[cols, cols][None], st.abs_max[cols], fmt.mode, -1)[0]  # noqa: E731
        return gptq(w, mean_h, fmt.mode, fmt.group_size, self.options.damp, self.options.block, refit, errors)

    def extra_summary(self) -> dict:
        return {"damp": self.options.damp, "scale_estimation": self.options.scale_estimation,
                "by_default": self.options.scales_by_default}

    def run_block(self, graph, block, stats, ctx) -> None:
        """Weights that read one input (q, k and v; gate and up) share its Hessian, and GPTQ treats rows
        independently: they are rounded as one stacked matrix (one inverse, one column loop)."""
        stacks: dict[tuple, list] = {}
        for name, (const, axes) in self.pending.items():
            st = stats.get(name)
            if st is not None and self.ready(st):
                fmt = const.meta["format"]
                stacks.setdefault((id(st), fmt.mode, fmt.group_size), []).append((name, const, axes, st))
        for members in stacks.values():
            views = [matrix_view(graph.weight(c).float(), axes) for _, c, axes, _ in members]
            st, fmt = members[0][3], members[0][1].meta["format"]
            cw, _, _ = self.fit(torch.cat([w for w, _ in views]), st, fmt, errors=False)
            h = st.hessian / max(st.tokens, 1)
            start = 0
            for (name, const, axes, _), (w, transposed) in zip(members, views):
                rows = slice(start, start + w.shape[0])
                start += w.shape[0]
                part = CompressedWeight(cw.mode, cw.group_size, cw.codes[rows].clone(), cw.scale[rows].clone(),
                                        None if cw.zero_point is None else cw.zero_point[rows].clone(),
                                        tuple(graph.tensor(const).shape), transposed)
                const.meta["compressed"] = part
                rtn = quantize(w, (1,), fmt.mode, fmt.group_size).dequantize()
                self.layers[name] = {"error_rtn": output_error(w - rtn, w, h.float()),
                                     "error_after": output_error(w - matrix_view(part.dequantize(), axes)[0], w,
                                                                 h.float())}
                del self.pending[name]


def _params(group: torch.Tensor, mode: Mode, cols: slice, refit):
    cw = refit(group, cols) if refit is not None else quantize(group, (1,), mode, -1)
    return cw.scale.reshape(-1, 1), None if cw.zero_point is None else cw.zero_point.reshape(-1, 1)


def _decode(mode: Mode, codes: torch.Tensor, scale: torch.Tensor, zp) -> torch.Tensor:
    values = decode_values(mode, codes)
    if zp is not None:
        values = values - zp.float()
    return values * scale.float()


def _inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """chol(H^-1) (upper) of H + damp * mean(diag H) * I; the damping grows tenfold (up to 3 times)
    where rounding left H not positive definite."""
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for attempt in range(4):
        try:
            damped = h + damp * 10**attempt * torch.diag(h).mean() * eye
            return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ValueError("the calibration Hessian is not positive definite even with 10x damping: try more samples")


def output_error(d: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> float:
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp(min=1e-30))


def gptq(w: torch.Tensor, h: torch.Tensor, mode: Mode, group_size: int, damp: float = 0.1, block: int = 128,
         refit=None, errors: bool = True) -> tuple[CompressedWeight, float | None, float | None]:
    """(compressed W [N, K], relative output error of RTN, of GPTQ) for the mean Hessian h [K, K]. The
    updates run in float64 (on SmolLM2 with AWQ + scale estimation, float32 updates gave held-out
    perplexity 22.04, float64 21.85), each column rounded in float32 as round to nearest rounds."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    if g != k:
        block = max(block // g, 1) * g
    h_metric = h.float()
    h = h.clone().double()
    w0 = w.clone()
    W = w.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    W[:, dead] = 0
    u = _inverse_cholesky(h, damp)
    codes = torch.empty(n, k, dtype=code_dtype(mode))
    scales, zps = [], []
    column = None
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                source = W[:, col:col + g] if g > i2 - i1 else w1[:, i:i + g]
                scale, zp = _params(source.float(), mode, slice(col, col + g), refit)
                scales.append(scale)
                zps.append(zp)
                column = _column_rounding(mode, scale, zp)
            q, deq = column(w1[:, i].float())
            codes[:, col] = q
            e = (w1[:, i] - deq.double()) / u1[i, i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ u[i1:i2, i2:]
    if g == k:
        scale_t, zp_t = scales[0], zps[0]
        cw = CompressedWeight(mode, group_size, codes, scale_t, zp_t, (n, k))
    else:
        scale_t = torch.stack(scales, 1)  # [N, G, 1]
        zp_t = None if zps[0] is None else torch.stack(zps, 1)
        cw = CompressedWeight(mode, group_size, codes.reshape(n, k // g, g), scale_t, zp_t, (n, k))
    if not errors:
        return cw, None, None
    rtn = quantize(w0, (1,), mode, group_size).dequantize()
    return cw, output_error(w0 - rtn, w0, h_metric), output_error(w0 - cw.dequantize(), w0, h_metric)


def _column_rounding(mode: Mode, scale: torch.Tensor, zp):
    """column [N] -> (codes [N], decoded values [N]) for one group's stored scale (and zero point):
    `quantize_matrix_with_scale` and `_decode` on one column, inlined for the integer modes."""
    if not mode.integer:
        def generic(col):
            q = quantize_matrix_with_scale(col[:, None], mode, scale, zp)
            return q[:, 0], _decode(mode, q, scale, zp)[:, 0]
        return generic
    s = scale.float()[:, 0]
    if zp is None:
        half, dtype = 2 ** (mode.bits - 1), torch.int8

        def symmetric(col):
            x = (col / s).round_().clamp_(-half, half - 1)
            return x.to(dtype), x * s
        return symmetric
    z, top = zp.float()[:, 0], 2 ** mode.bits - 1

    def asymmetric(col):
        x = (col / s).round_().add_(z).clamp_(0, top)
        return x.to(torch.uint8), (x - z) * s
    return asymmetric


@hookimpl
def qcompiler_register_passes():
    return [GPTQ]
