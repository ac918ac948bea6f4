"""LoRA correction: a rank-r term B(A(x)) added to a 4-bit layer's output that absorbs most of its
quantization error on the calibration data, stored as two small int8 MatMuls.

For a weight W [N, K] compressed to Q(W) (by scale estimation when asked, otherwise round to
nearest, computed here), D = W - Q(W), and the inputs' mean Hessian H = X^T X / T:
- the output error on the calibration data is tr(D H D^T); with Hd = H + damp * mean(diag H) * I
  = L L^T (Cholesky), the rank-r M minimising tr((D - M) Hd (D - M)^T) = ||(D - M) L||^2 is
  M = SVD_r(D L) L^-1, exactly (Eckart-Young on D L; the top r triplets by a seeded randomized
  SVD). The damping is
  NNCF's regularisation (keep M close to D) in closed form; NNCF alternates least squares on per-sample
  mean activations instead (`lora_correction.py`).
- A = sqrt(S_r) V_r^T L^-1 [r, K] is rounded to int8 (asymmetric, one scale per row), then B [N, r] is
  refitted to the rounded A by least squares, B = D Hd A^T (A Hd A^T)^-1, and rounded to int8 too, so
  the artifact computes what was fitted.
The IR gets the adapters as inserted nodes, y + MatMul(MatMul(x, A^T), B^T), an epilogue of the
layer's module (`qcompiler.rewrites`): OpenVINO, ONNX and torch all lower it. The summary has each
layer's relative output error tr(D H D^T) / tr(W H W^T) before and after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qcompiler.config import Mode
from qcompiler.errors import QCompilerError
from qcompiler.hookspecs import hookimpl
from qcompiler.quant import matrix_view, quantize
from qcompiler.rewrites import module_output
from qcompiler.weight_fit import WeightFitPass, targets

MODES = (Mode.INT4_SYM, Mode.INT4_ASYM, Mode.NF4)
ADAPTER_MODE = Mode.INT8_ASYM


@dataclass(frozen=True)
class LoRACorrectionOptions:
    rank: int = field(default=8, metadata={"help": "rank of the adapters", "flag": "--lora-rank", "min": 1})
    damp: float = field(default=0.1, metadata={"help": "regularisation towards the weight error, a fraction of the "
                                                       "Hessian's mean diagonal", "min": 0})


class LoRACorrection(WeightFitPass):
    name = "lora_correction"
    Options = LoRACorrectionOptions
    statistics = frozenset({"hessian"})
    modes = MODES
    modes_reason = "LoRA correction corrects 4-bit layers (NNCF applies it to 4-bit modes only)"
    flag = "--lora-correction"
    help = "add int8 low-rank adapters, fitted on calibration data, that absorb the 4-bit error"
    needs_data = True
    conflicts = ("gptq",)
    count_key = "corrected"

    def wants(self, graph, ctx):
        # weights an earlier pass of the same sweep (scale estimation) compresses are corrected too
        self.pending = {c.attrs["weight"]: (c, axes) for c, axes in targets(graph, self.modes, compressed=True)}
        self.not_targets = {c.attrs["weight"]: "backup precision: no adapter (4-bit layers only, as NNCF)"
                            if c.meta.get("role") == "backup" else "not a 2-D weight read by one MatMul: no adapter"
                            for c in graph.weight_constants() if c.meta.get("role") in ("primary", "backup")
                            and c.attrs["weight"] not in self.pending}
        by_weight, uses, readers = graph.uses_by_weight(), graph.weight_uses(), graph.consumers()
        for name, (const, _) in list(self.pending.items()):  # the adapter follows the layer's module
            try:
                module_output(graph, by_weight[const][0].op.name.split("/")[0], uses, readers)
            except QCompilerError as exc:
                self.not_targets[name] = f"no adapter: {exc}"
                del self.pending[name]
        return list(self.pending)

    def ready(self, st) -> bool:
        return st.hessian is not None and st.tokens > 0

    def run_block(self, graph, block, stats, ctx) -> None:
        factors = {}  # one Cholesky factor per Hessian: q, k and v (gate and up) read the same input
        for name, (const, axes) in list(self.pending.items()):
            st = stats.get(name)
            if st is None or not self.ready(st):
                continue
            fmt = const.meta["format"]
            cw = const.meta.get("compressed")
            if cw is None:
                cw = const.meta["compressed"] = quantize(graph.weight(const), axes, fmt.mode, fmt.group_size)
            w, _ = matrix_view(graph.weight(const).float(), axes)
            deq, _ = matrix_view(cw.dequantize().float(), axes)
            h = st.hessian / st.tokens
            if id(st) not in factors:
                factors[id(st)] = cholesky(damped(h, self.options.damp))
            a, b, before, after = correct(w, deq, h, self.options.rank, self.options.damp, factors[id(st)])
            _insert(graph, const, a, b)
            self.layers[name] = {"error_rtn": before, "error_after": after}
            del self.pending[name]

    def finish(self, graph, ctx):
        result = super().finish(graph, ctx)
        result.summary.update(rank=self.options.rank, adapters=ADAPTER_MODE.value + " per-channel")
        return result


def correct(w: torch.Tensor, deq: torch.Tensor, h: torch.Tensor, rank: int, damp: float, chol=None):
    """(A [r, K] int8, B [N, r] int8 as CompressedWeights, relative output error before, after) for the
    mean Hessian h; `chol` is Hd's lower Cholesky factor when already computed (q/k/v share one)."""
    d = (w - deq).float()
    n, k = d.shape
    r = min(rank, n, k)
    low = chol if chol is not None else cholesky(damped(h, damp))
    u, s, vt = _top_svd(d @ low, r)  # D L ~ U S V^T
    a = torch.linalg.solve_triangular(low, s.sqrt()[:, None] * vt, upper=False, left=False)  # sqrt(S) V^T L^-1
    qa = quantize(a, (1,), ADAPTER_MODE, -1)
    aq = qa.dequantize().float()
    ha = low @ (low.t() @ aq.t())  # Hd A^T [K, r], Hd as factored (with any extra damping)
    gram = (aq @ ha).double()
    b = torch.linalg.solve(gram + 1e-9 * torch.diag(gram).mean() * torch.eye(r, dtype=gram.dtype),
                           (d @ ha).double().t()).t().float()
    qb = quantize(b, (1,), ADAPTER_MODE, -1)
    rest = d - qb.dequantize().float() @ aq
    norm = ((w.float() @ h) * w.float()).sum().clamp(min=1e-30)
    before = float(((d @ h) * d).sum() / norm)
    after = float(((rest @ h) * rest).sum() / norm)
    return qa, qb, before, after


def damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    return h.float() + damp * torch.diag(h).float().mean().clamp(min=1e-12) * torch.eye(h.shape[0])


def cholesky(hd: torch.Tensor) -> torch.Tensor:
    """Lower L with L L^T = hd; more damping where rounding left hd not positive definite."""
    for attempt in range(4):
        low, info = torch.linalg.cholesky_ex(hd + attempt * 1e-3 * torch.diag(hd).mean() * torch.eye(hd.shape[0]))
        if int(info) == 0:
            return low
    raise ValueError("the calibration Hessian is not positive definite even with damping: try more samples")


def _top_svd(e: torch.Tensor, r: int, oversample: int = 8, iterations: int = 4):
    """The top r singular triplets of e by a seeded randomized range finder (Halko et al. 2011)."""
    n, k = e.shape
    q = min(r + oversample, n, k)
    omega = torch.randn(k, q, generator=torch.Generator().manual_seed(0))
    y, _ = torch.linalg.qr(e @ omega)
    for _ in range(iterations):
        z, _ = torch.linalg.qr(e.t() @ y)
        y, _ = torch.linalg.qr(e @ z)
    u, s, vt = torch.linalg.svd(y.t() @ e, full_matrices=False)
    return (y @ u)[:, :r], s[:r], vt[:r]


def _insert(graph, const, a, b) -> None:
    """y + MatMul(MatMul(x, A^T), B^T) after the module of the MatMul reading `const`."""
    use = graph.uses_by_weight()[const][0]
    path = use.op.name.split("/")[0]
    x, y = module_output(graph, path)
    meta = {"epilogue_of": path}
    nodes = []
    for part, cw in (("lora_A", a), ("lora_B", b)):
        weight = graph.insert_weight(f"{path}.{part}", cw.dequantize(), {"adapter_of": const.attrs["weight"]})
        weight.meta["compressed"] = cw
        nodes.append(graph.insert("MatMul", [nodes[-1] if nodes else x, weight], {"transpose_b": True},
                                  f"{path}/{part}", meta))
    graph.replace_uses(y, graph.insert("Add", [y, nodes[-1]], name=f"{path}/lora", meta=meta))


@hookimpl
def qcompiler_register_passes():
    return [LoRACorrection]
