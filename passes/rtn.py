"""Weight rewriting by round-to-nearest: every weight with a format gets codes and scales.

The math for each format is in `qcompiler.quant`. The compressed weight is stored in the weight
Constant's meta as "compressed"; the float tensor is left as it is (backends decide what to emit).
Shared weights (a tied embedding and lm_head) are compressed once. Weights are visited largest
first (the order changes no result), which keeps the peak memory of a lazily loaded model low.
"""

from __future__ import annotations

from collections import Counter

from qcompiler.hookspecs import hookimpl
from qcompiler.ir import Graph
from qcompiler.passmanager import Pass, PassContext, PassResult
from qcompiler.quant import quantize


class RoundToNearest(Pass):
    name = "rtn"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        axes = {u.const: u.reduction_axes for u in graph.weight_uses()}
        done = Counter()
        # largest first: a weight's float copy is the largest transient, and it comes while few codes are held
        for const, reduction_axes in sorted(axes.items(), key=lambda item: -graph.tensor(item[0]).numel()):
            fmt = const.meta.get("format")
            if fmt is None or "compressed" in const.meta:
                continue
            # as stored (bf16 / f16 checkpoints: half the bytes); quantize widens it exactly, or converts it
            const.meta["compressed"] = quantize(graph.stored_weight(const), reduction_axes, fmt.mode, fmt.group_size)
            done[str(fmt)] += 1
        return PassResult(bool(done), {"compressed": dict(done)})


@hookimpl
def qcompiler_register_passes():
    return [RoundToNearest]
