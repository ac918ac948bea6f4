"""What the trace sees of a model's weights, so that no weight is silently left in float.

A weight matrix the IR cannot compress is one that no weight-bearing op (MatMul, Gather,
Convolution) reads directly: read through an op the frontend does not translate (`Opaque`, e.g.
GPT-2's `addmm`), through an indexing op (batched MoE experts), or not read at all by the traced
forward. Compressing such a model would write an artifact whose report counts only what it saw,
so it is refused with the names; `fp32` (no compression) is not affected.
"""

from __future__ import annotations

from qcompiler.errors import QCompilerError
from qcompiler.ir import Graph

MIN_REPORTED_PARAMS = 1024  # smaller float matrices are tables and embeddings of toy models, not weights


def refuse_unseen_weights(graph: Graph) -> None:
    unseen = graph.unseen_weights(MIN_REPORTED_PARAMS)
    if not unseen:
        return
    params = sum(graph.weights[name].numel() for name in unseen)
    shown = "; ".join(f"{name} (read by {how})" for name, how in list(unseen.items())[:3])
    raise QCompilerError(
        f"{len(unseen)} weight tensors of this model ({params} parameters) are read by ops qcompiler cannot compress "
        f"yet: {shown}{'; ...' if len(unseen) > 3 else ''} -- the artifact would leave them float, so this model "
        "family is not supported yet (--weight-format fp32 exports it uncompressed)"
    )


def parameter_counts(graph: Graph) -> dict:
    """Parameters by kind: weight-bearing (what the table counts), other (norms, biases, small
    tables), not exported (where an encoder's output does not need them), and their sum, which
    equals the model's parameter count for a traced torch model."""
    bearing = {c.attrs["weight"] for c in graph.weight_constants()}
    weights = other = dropped = 0
    for const in graph.parameter_constants():
        if const.meta.get("adapter_of"):  # added by a pass, reported apart
            continue
        numel = graph.weights[const.attrs["weight"]].numel()
        if const.attrs["weight"] in bearing:
            weights += numel
        elif const.meta.get("dropped"):
            dropped += numel
        else:
            other += numel
    counts = {"weight_bearing": weights, "other": other, "total": weights + other + dropped}
    if dropped:  # parameters of the model the exported outputs do not need (an encoder's pooler)
        counts["not_exported"] = dropped
    return counts


def float_weights(graph: Graph) -> list[dict]:
    """Every weight-bearing tensor left in float, with the reason."""
    out = []
    for const, uses in graph.uses_by_weight().items():
        if const.meta.get("format") is not None or const.meta.get("adapter_of"):
            continue
        role = const.meta.get("role")
        ignored = const.meta.get("ignored") or next((u.op.meta["ignored"] for u in uses if "ignored" in u.op.meta), None)
        reason = (f"ignored scope ({ignored})" if ignored else "backup precision none" if role == "backup"
                  else "no compression asked (fp32)" if role is None else role)
        out.append({"name": const.attrs["weight"], "params": graph.tensor(const).numel(), "reason": reason})
    return out
