"""The graph IR: one op vocabulary, nodes as small records, weights as tensors.

A `Node` is op + inputs + attrs + name, plus `meta` for what passes learn. Weights are `Constant`
nodes whose `attrs["weight"]` names a tensor in `Graph.weights`. Frontends translate their ops into
`OPS` once; passes and backends never see a framework's op names. Only the Graph is mutated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

OPS = frozenset(
    {
        "Parameter", "Constant", "MatMul", "Gather", "Convolution", "Multiply", "Add", "Subtract", "Divide",
        "Power", "Sqrt", "Rsqrt", "ReduceMean", "Swish", "Gelu", "Relu", "Sigmoid", "Tanh", "Softmax",
        "ScaledDotProductAttention", "Concat", "Reshape", "Transpose", "Slice", "Convert", "Negative",
        "GetItem", "Opaque",
    }
)

WEIGHTED_OPS = ("MatMul", "Gather", "Convolution")


@dataclass(eq=False)
class Node:
    op: str
    inputs: tuple[Node, ...]
    attrs: dict[str, Any]
    name: str
    meta: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Node({self.op} %{self.name})"


@dataclass(frozen=True)
class WeightUse:
    """A weight-bearing op and its weight, with the weight's layout.

    `reduction_axes` are the input-channel axes (the ones a scale is shared along);
    for MatMul(x, W) with transpose_b, W is [out, in] and the reduction axis is 1.
    """

    op: Node
    const: Node
    reduction_axes: tuple[int, ...]


class Graph:
    """A topologically ordered list of nodes, named outputs, and the weight tensors."""

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.nodes: list[Node] = []
        self.outputs: list[Node] = []
        self.weights: dict[str, torch.Tensor] = {}
        # weights whose values are read on demand: `weights` holds a placeholder of their shape and
        # dtype (zeros), `weight_source(name)` reads the values (see `weight`)
        self.placeholders: set[str] = set()
        self.weight_source = None
        self.stored_source = None  # optional: the same in the source's own float dtype (`stored_weight`)
        self.released: str | None = None  # why compressed weights' codes are gone (written, then dropped)
        # the weights are the frontend's own copy (a model it loaded, nobody else holds): a rewrite of the
        # same shape and dtype is written into them, instead of keeping a second copy
        self.owns_weights = False
        self._names: set[str] = set()

    # building -------------------------------------------------------------------------------
    def add(self, op: str, inputs=(), attrs=None, name: str | None = None, meta=None) -> Node:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; the IR vocabulary is {sorted(OPS)}")
        node = Node(op, tuple(inputs), dict(attrs or {}), self.unique_name(name or op), dict(meta or {}))
        self.nodes.append(node)
        self._names.add(node.name)
        return node

    def add_weight(self, name: str, tensor: torch.Tensor) -> Node:
        self.weights[name] = tensor
        return self.add("Constant", attrs={"weight": name}, name=name, meta={"shape": tuple(tensor.shape)})

    def insert(self, op: str, inputs=(), attrs=None, name: str | None = None, meta=None) -> Node:
        """A new node placed right after the last of its inputs (a Constant first), so the order stays
        topological; meta "inserted". Backends lower what `qcompiler.rewrites.epilogues` accepts."""
        node = self.add(op, inputs, attrs, name, {**(meta or {}), "inserted": True})
        self.nodes.pop()
        position = max((self.nodes.index(i) + 1 for i in node.inputs), default=0)
        self.nodes.insert(position, node)
        return node

    def insert_weight(self, name: str, tensor: torch.Tensor, meta=None) -> Node:
        """A new weight Constant (see `insert`); its name must not be taken."""
        if name in self.weights:
            raise ValueError(f"weight {name} already exists")
        self.weights[name] = tensor
        return self.insert("Constant", attrs={"weight": name}, name=name,
                           meta={"shape": tuple(tensor.shape), **(meta or {})})

    def replace_uses(self, old: Node, new: Node) -> None:
        """Every reader of `old` (and the graph outputs) reads `new` instead, except `new` and the
        nodes it depends on."""
        keep, stack = set(), [new]
        while stack:
            n = stack.pop()
            if n not in keep:
                keep.add(n)
                stack.extend(n.inputs)
        position = {n: i for i, n in enumerate(self.nodes)}
        readers = [n for n in self.nodes if n not in keep and old in n.inputs]
        early = next((n for n in readers if position[n] < position[new]), None)
        if early is not None:
            raise ValueError(f"{early.name} reads {old.name} before {new.name} is computed: insert {new.name} "
                             "earlier (Graph.insert places a node after its inputs)")
        for n in readers:
            n.inputs = tuple(new if i is old else i for i in n.inputs)
        self.outputs = [new if o is old else o for o in self.outputs]

    def unique_name(self, base: str) -> str:
        name, i = base, 0
        while name in self._names:
            i += 1
            name = f"{base}_{i}"
        return name

    # queries --------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def consumers(self) -> dict[Node, list[Node]]:
        users: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                users[i].append(n)
        return users

    def weight(self, const: Node) -> torch.Tensor:
        """The weight's values; a placeholder's are read from the source each call (not kept)."""
        name = const.attrs["weight"]
        if name in self.placeholders:
            return self.weight_source(name)
        return self.weights[name]

    def stored_weight(self, const: Node) -> torch.Tensor:
        """The weight's values in the float dtype its source stores them in (a half-precision
        checkpoint's placeholder reads as f16 / bf16, half the bytes), for consumers that widen it
        exactly themselves (round to nearest); `weight` gives float32 where the source does."""
        name = const.attrs["weight"]
        if name in self.placeholders and self.stored_source is not None:
            return self.stored_source(name)
        return self.weight(const)

    def tensor(self, const: Node) -> torch.Tensor:
        """The stored tensor, for its shape and dtype only: a placeholder holds zeros."""
        return self.weights[const.attrs["weight"]]

    def set_weight(self, const: Node, tensor: torch.Tensor) -> None:
        name = const.attrs["weight"]
        old = self.weights.get(name)
        if (self.owns_weights and name not in self.placeholders and old is not None and old is not tensor
                and old.shape == tensor.shape and old.dtype == tensor.dtype):
            with torch.no_grad():
                old.copy_(tensor)
        else:
            self.weights[name] = tensor
        self.placeholders.discard(name)
        const.meta["rewritten"] = True

    def weight_uses(self) -> list[WeightUse]:
        """Every weight-bearing op whose weight is a Constant, in graph order."""
        uses = []
        for n in self.nodes:
            use = _weight_use(n)
            if use is not None:
                uses.append(use)
        return uses

    def uses_by_weight(self) -> dict[Node, list[WeightUse]]:
        """Each weight Constant (in order of first use) with the ops that use it."""
        out: dict[Node, list[WeightUse]] = {}
        for use in self.weight_uses():
            out.setdefault(use.const, []).append(use)
        return out

    def weight_constants(self) -> list[Node]:
        """Constants used as weights, each once, in order of first use."""
        return list(self.uses_by_weight())

    def parameter_constants(self) -> list[Node]:
        """Every Constant holding one of the model's parameters (weights, norms, biases, unused
        ones), each once; not buffers (meta "buffer") such as rotary tables or masks."""
        seen, out = set(), []
        for n in self.nodes:
            name = n.attrs.get("weight")
            if n.op == "Constant" and name is not None and name not in seen and not n.meta.get("buffer"):
                seen.add(name)
                out.append(n)
        return out

    def unseen_weights(self, min_params: int = 1024) -> dict[str, str]:
        """Float parameters of two or more dimensions (at least `min_params` elements) that no
        weight-bearing op reads as its weight, with what reads them instead (an Opaque op's
        function, another op, or nothing in the traced forward). Compressing such a model would
        silently leave them float."""
        bearing = {c.attrs["weight"] for c in self.weight_constants()}
        readers = self.consumers()
        out = {}
        for n in self.parameter_constants():
            name, tensor = n.attrs["weight"], self.weights[n.attrs["weight"]]
            if name in bearing or tensor.dim() < 2 or tensor.numel() < min_params or not tensor.is_floating_point():
                continue
            if n.meta.get("dropped"):  # outside what the artifact computes (an encoder's pooler): not in it at all
                continue
            if _only_added(n, readers):  # a batched bias ([experts, out], read as bias[:, None, :]): not a weight
                continue
            ops = sorted({r.attrs.get("fn", "Opaque") if r.op == "Opaque" else r.op for r in readers.get(n, [])})
            out[name] = ", ".join(ops) or "nothing in the traced forward"
        return out

    # text -------------------------------------------------------------------------------------
    def to_text(self, meta: tuple[str, ...] = ()) -> str:
        from qcompiler.ir_text import print_graph

        return print_graph(self, meta)

    def __str__(self) -> str:
        return self.to_text()


def _only_added(node: Node, readers: dict) -> bool:
    """`node`'s value reaches only Adds, through Slice / Reshape views: a bias, however batched."""
    users = readers.get(node, [])
    return bool(users) and all(u.op == "Add" or (u.op in ("Slice", "Reshape") and _only_added(u, readers))
                               for u in users)


def _weight_use(n: Node) -> WeightUse | None:
    if n.op == "MatMul" and len(n.inputs) == 2 and n.inputs[1].op == "Constant":
        rank = len(n.inputs[1].meta.get("shape", (0, 0)))
        axis = rank - 1 if n.attrs.get("transpose_b") else rank - 2
        return WeightUse(n, n.inputs[1], (axis,))
    if n.op == "Gather" and n.inputs and n.inputs[0].op == "Constant" and n.attrs.get("axis", 0) == 0:
        rank = len(n.inputs[0].meta.get("shape", (0, 0)))
        return WeightUse(n, n.inputs[0], tuple(range(1, max(rank, 2))))  # each gathered row, whole
    if n.op == "Convolution" and len(n.inputs) >= 2 and n.inputs[1].op == "Constant":
        rank = len(n.inputs[1].meta.get("shape", ()))
        return WeightUse(n, n.inputs[1], tuple(range(1, rank)))
    return None
