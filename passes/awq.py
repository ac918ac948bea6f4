"""Data-free AWQ on the MatMul -> Multiply -> MatMul pattern (LLaMA MLP: down(act(gate(x)) * up(x))).

For the second MatMul's weight W2 (input channels k) the scale is s_k = 1 / max(mean_n |W2[n, k]|, eps);
W2[:, k] *= s_k, and the first MatMul's output channel k is divided by s_k, so the product is
unchanged in exact arithmetic while W2's input channels are equalized before 4-bit rounding
(NNCF's data-free AWQ step). Applies where W2 is a primary 4-bit weight and no tensor on the path
is shared with another consumer; the summary counts matches and says why others were skipped.
"""

from __future__ import annotations

import torch

from qcompiler.hookspecs import hookimpl
from qcompiler.ir import Graph
from qcompiler.passmanager import Pass, PassContext, PassResult
from qcompiler.pattern import P, Var, Weight, find_matches
from qcompiler.quant import EPS, matrix_view, restore

PATTERN = P.MatMul(P.Multiply(P.MatMul(Var("x"), Weight("w1"), name="first"), Var("y"), name="mul"),
                   Weight("w2"), name="second")


class DataFreeAWQ(Pass):
    name = "awq"

    @classmethod
    def options_from(cls, config):
        return cls.Options() if config.awq and config.dataset is None else None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        matches, _ = find_matches(graph, PATTERN)
        users = graph.consumers()
        axes = {u.op: u.reduction_axes for u in graph.weight_uses()}
        applied, skipped = 0, {}
        for m in matches:
            reason = _why_not(m, users, axes)
            if reason:
                skipped[m["second"].name] = reason
                continue
            _apply(graph, m, axes)
            applied += 1
        if not matches:
            skipped["<graph>"] = "no MatMul -> Multiply -> MatMul pattern in this model"
        return PassResult(applied > 0, {"matched": len(matches), "applied": applied, "skipped": skipped})


def _why_not(m, users, axes) -> str:
    fmt = m["w2"].meta.get("format")
    if m["w2"].meta.get("role") != "primary" or fmt is None or fmt.mode.bits != 4:
        return "the second MatMul's weight is not in 4-bit primary precision"
    if "ignored" in m["second"].meta or "ignored" in m["first"].meta:
        return "a MatMul of the pattern is in the ignored scope"
    for node, only in ((m["first"], m["mul"]), (m["mul"], m["second"])):
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
    new_w1 = restore(w1 / scale[:, None], graph.tensor(m["w1"]).shape, t1)
    graph.set_weight(m["w2"], new_w2.to(graph.tensor(m["w2"]).dtype))
    graph.set_weight(m["w1"], new_w1.to(graph.tensor(m["w1"]).dtype))
    m["second"].meta["awq"] = True


@hookimpl
def qcompiler_register_passes():
    return [DataFreeAWQ]
