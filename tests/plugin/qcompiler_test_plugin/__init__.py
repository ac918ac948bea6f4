"""A third-party pass: records, per op type, how many weights are about to be rewritten."""

from collections import Counter

from qcompiler.hookspecs import hookimpl
from qcompiler.passmanager import Pass, PassResult


class CountCompressedWeights(Pass):
    name = "count_compressed_weights"

    def run(self, graph, ctx):
        counts = Counter(u.op.op for u in graph.weight_uses() if u.const.meta.get("format") is not None)
        for const in graph.weight_constants():
            const.meta["seen_by_test_plugin"] = True
        return PassResult(False, {"by_op": dict(counts)})


@hookimpl
def qcompiler_register_passes():
    return [CountCompressedWeights]
