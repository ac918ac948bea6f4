"""Data-free AWQ on the MatMul -> Multiply -> MatMul pattern (LLaMA MLP: down(act(gate(x)) * up(x)),
phi3's fused form: down(up * act(gate)) with gate, up = split(gate_up(x))), and ReLU MLPs
(OPT: fc2(relu(fc1(x))), the scale folding into fc1's rows and bias).

For the second MatMul's weight W2 (input channels k) the scale is s_k = 1 / max(mean_n |W2[n, k]|, eps);
W2[:, k] *= s_k, and the first MatMul's output channel k (of the up half, when fused) is divided by s_k, so the product is
unchanged in exact arithmetic while W2's input channels are equalized before 4-bit rounding
(NNCF's data-free AWQ step). Applies where W2 is a primary 4-bit weight and no tensor on the path
is shared with another consumer; the summary counts matches and says why others were skipped.
"""

from __future__ import annotations

import torch

from qcompiler.hookspecs import hookimpl
from qcompiler.ir import Graph
from qcompiler.passmanager import Pass, PassContext, PassResult
from qcompiler.scale_sites import gated_matches
from qcompiler.quant import EPS, matrix_view, restore

class DataFreeAWQ(Pass):
    name = "awq"

    @classmethod
    def options_from(cls, config):
        return cls.Options() if config.awq and config.dataset is None else None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        matches, skipped = gated_matches(graph)
        users = graph.consumers()
        axes = {u.op: u.reduction_axes for u in graph.weight_uses()}
        applied = 0
        for m in matches:
            reason = _why_not(m, users, axes)
            if reason:
                skipped[m["second"].name] = reason
                continue
            _apply(graph, m, axes)
            applied += 1
        if not matches:
            skipped.setdefault("<graph>", "no MatMul -> Multiply -> MatMul or MatMul -> Relu -> MatMul pattern in this "
                                          "model")
        return PassResult(applied > 0, {"matched": len(matches), "applied": applied, "skipped": skipped})


def _why_not(m, users, axes) -> str:
    fmt = m["w2"].meta.get("format")
    if m["w2"].meta.get("role") != "primary" or fmt is None or not fmt.mode.low_bit:
        return "the second MatMul's weight is not in low-bit primary precision"
    if "ignored" in m["second"].meta or "ignored" in m["first"].meta:
        return "a MatMul of the pattern is in the ignored scope"
    path = m["path"] + [m["second"]]
    for node, only in zip(path, path[1:]):
        if users[node] != [only]:
            return f"%{node.name} has other consumers, so scaling it would change them"
    for w, op in ((m["w1"], m["first"]), (m["w2"], m["second"])):
        if users[w] != [op]:
            return f"weight {w.name} is shared with another op"
    if m["first"] not in axes or m["second"] not in axes:
        return "a MatMul of the pattern has no recognized weight layout"
    return ""


def _apply(graph: Graph, m, axes) -> None:
    w2, t2 = matrix_view(graph.weight(m["w2"]).float(), axes[m["second"]])  # [N2, K2]
    w1, t1 = matrix_view(graph.weight(m["w1"]).float(), axes[m["first"]])  # [N1 = K2, K1]
    scale = 1.0 / torch.clamp(w2.abs().mean(dim=0), min=EPS)
    new_w2 = restore(w2 * scale[None, :], graph.tensor(m["w2"]).shape, t2)
    start, stop = m["rows"] or (0, w1.shape[0])  # the rows feeding the Multiply (a fused weight's up half)
    w1 = w1.clone()
    w1[start:stop] /= scale[:, None]
    new_w1 = restore(w1, graph.tensor(m["w1"]).shape, t1)
    graph.set_weight(m["w2"], new_w2.to(graph.tensor(m["w2"]).dtype))
    graph.set_weight(m["w1"], new_w1.to(graph.tensor(m["w1"]).dtype))
    if m["bias"] is not None:  # relu(W1 x + b1) / s = relu((W1 x + b1) / s): the bias takes 1/s too
        bias = graph.weight(m["bias"])
        graph.set_weight(m["bias"], (bias.float() / scale).to(bias.dtype))
    m["second"].meta["awq"] = True


@hookimpl
def qcompiler_register_passes():
    return [DataFreeAWQ]
