"""Reading an ONNX graph's weights: which initializer feeds which MatMul / Gather / Conv, and through
what. Used by the ONNX frontend (to build the IR) and the ONNX backend (to rewrite the weights).

A weight is an initializer (or a `Constant` node's tensor) reaching a MatMul's B input, a Gather's
data input or a Conv's W input through a chain of Cast / Identity / Transpose([1, 0]) nodes (for
batched MoE expert weights, the Transpose swaps their last two axes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

CHAIN_OPS = ("Cast", "Identity", "Transpose")
WEIGHTED = {"MatMul": 1, "Gather": 0, "Conv": 1}  # op -> the input that holds the weight
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


@dataclass
class WeightUse:
    node: onnx.NodeProto  # the MatMul / Gather / Conv
    chain: list[onnx.NodeProto] = field(default_factory=list)  # Cast / Identity / Transpose between
    transposed: bool = False  # a Transpose in the chain: the op sees the initializer transposed


class GraphIndex:
    """Producers, consumers and weight tensors of one onnx.GraphProto (the main graph)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.constant_nodes = {n.output[0]: n for n in graph.node if n.op_type == "Constant"
                               and any(a.name == "value" for a in n.attribute)}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in graph.output}

    def tensor(self, name: str) -> onnx.TensorProto | None:
        if name in self.initializers:
            return self.initializers[name]
        node = self.constant_nodes.get(name)
        if node is None:
            return None
        return next(a.t for a in node.attribute if a.name == "value")

    def weight_uses(self, name: str) -> list[WeightUse] | None:
        """Every weighted op `name` reaches; None if it also reaches anything else."""
        uses: list[WeightUse] = []
        for node in self.consumers.get(name, []):
            use = self._follow(node, name, [], False)
            if use is None:
                return None
            uses.append(use)
        return uses

    def _follow(self, node, tensor: str, chain: list, transposed: bool) -> WeightUse | None:
        if node.op_type in WEIGHTED and list(node.input).index(tensor) == WEIGHTED[node.op_type]:
            return WeightUse(node, chain, transposed)
        if node.op_type not in CHAIN_OPS or node.output[0] in self.graph_outputs:
            return None
        if node.op_type == "Transpose":
            rank = len(self.tensor(tensor).dims) if self.tensor(tensor) is not None else 2
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), list(range(rank))[::-1])
            if perm[-2:] != [len(perm) - 1, len(perm) - 2] or perm[:-2] != list(range(len(perm) - 2)):
                return None  # only [1, 0], or the swap of the last two axes of batched (MoE expert) weights
            transposed = not transposed
        users = self.consumers.get(node.output[0], [])
        if len(users) != 1:
            return None
        return self._follow(users[0], node.output[0], chain + [node], transposed)

    def weights(self) -> dict[str, list[WeightUse]]:
        """Float weight tensors (rank >= 2) and their uses, in the order their first use appears."""
        order = {id(n): i for i, n in enumerate(self.graph.node)}
        found = {}
        for name in list(self.initializers) + list(self.constant_nodes):
            tensor = self.tensor(name)
            if tensor.data_type not in FLOAT_TYPES or len(tensor.dims) < 2:
                continue
            uses = self.weight_uses(name)
            if uses:
                found[name] = uses
        return dict(sorted(found.items(), key=lambda item: min(order[id(u.node)] for u in item[1])))


def gemms_as_matmuls(graph: onnx.GraphProto) -> int:
    """Gemm(A, W, C) with a constant W (the exporter's form of `addmm` and of a 2-D `linear`) becomes
    MatMul(A, W) (+ Add C), W read through a Transpose when transB: the same numbers, in the form
    whose weight the lowering rewrites. Only alpha = beta = 1 and transA = 0; returns the count."""
    from onnx import helper

    index = GraphIndex(graph)
    nodes, count = [], 0
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or index.tensor(node.input[1]) is None or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight, base = node.input[1], node.name or node.output[0]
        if attrs.get("transB", 0):
            nodes.append(helper.make_node("Transpose", [weight], [f"{base}/W_t"], name=f"{base}/W_t", perm=[1, 0]))
            weight = f"{base}/W_t"
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{base}/MatMul_out" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{base}/MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{base}/Add"))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def to_array(tensor: onnx.TensorProto, base_dir: str | None = None) -> np.ndarray:
    return numpy_helper.to_array(tensor, base_dir or "")


def attribute(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default
