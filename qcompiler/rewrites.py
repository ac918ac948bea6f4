"""What passes add to a model beyond its weights' values, and how a backend that converts the source
torch module takes it.

- Rewritten parameters that are not weights of a weight-bearing op (a norm weight AWQ scaled, a
  plugin's rewrite of a bias). Converters fold constants (OpenVINO drops a norm's multiply by ones,
  renames what it folds), so such values cannot be found and replaced in the converted model
  afterwards: the backend converts the module with them in place (`in_module`) and puts the
  module's own values back afterwards.
- Inserted nodes (`Graph.insert`): an *epilogue* of one module, a small program of MatMul /
  Multiply / Add / Subtract / Divide nodes that reads only the module's input x, its output y and
  new weights named `<module path>.<attribute>`, and whose last node replaces y (LoRA correction's
  y + B(A(x)), a plugin's y * s). `in_module` realizes each as a forward hook on the module with
  the new weights as its parameters, so the converters trace it and the backends find and compress
  the new weights by name like any other; the torch backend stores the program and rebuilds the
  hook on its int kernels. An inserted node outside that shape is refused, naming it, before any
  backend writes anything.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qcompiler.errors import QCompilerError
from qcompiler.ir import Graph, Node

EPILOGUE_OPS = ("MatMul", "Multiply", "Add", "Subtract", "Divide")


def rewritten_params(graph: Graph, done=()) -> list:
    """Rewritten parameter Constants that are not weights of a weight-bearing op, except `done`."""
    bearing = {c.attrs["weight"] for c in graph.weight_constants()}
    return [c for c in graph.parameter_constants() if c.meta.get("rewritten")
            and c.attrs["weight"] not in bearing and c.attrs["weight"] not in done]


@dataclass
class Epilogue:
    """One module's inserted program. `steps` are (op, inputs, attrs); an input is "x", "y", "w:<attr>"
    (a new weight, a parameter of the module) or the index of an earlier step; the last step's value
    replaces the module's output."""

    path: str
    steps: list
    weights: dict  # attribute -> IR weight name

    def to_json(self) -> dict:
        return {"steps": [[op, list(inputs), attrs] for op, inputs, attrs in self.steps], "weights": self.weights}

    @classmethod
    def from_json(cls, path: str, data: dict) -> Epilogue:
        return cls(path, [(op, inputs, attrs) for op, inputs, attrs in data["steps"]], dict(data["weights"]))

    def run(self, owner, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        values = []

        def value(ref):
            if ref == "x":
                return x
            if ref == "y":
                return y
            if isinstance(ref, str):
                return getattr(owner, ref[2:])
            return values[ref]

        for op, inputs, attrs in self.steps:
            a, b = value(inputs[0]), value(inputs[1])
            if op == "MatMul":
                if isinstance(b, torch.nn.Module):  # an int kernel (the torch backend's artifact)
                    out = b(a)
                else:
                    b = b.to(a.dtype)
                    out = torch.nn.functional.linear(a, b) if attrs.get("transpose_b") else a @ b
            elif op == "Multiply":
                out = a * b
            elif op == "Add":
                out = a + b
            elif op == "Subtract":
                out = a - b
            else:
                out = a / b
            values.append(out)
        return values[-1].to(y.dtype)

    def attach(self, owner) -> object:
        """A forward hook on `owner` running this program; returns its handle."""
        return owner.register_forward_hook(lambda module, args, out: self.run(module, args[0], out))


def epilogues(graph: Graph) -> list[Epilogue]:
    """Each module's inserted program; an inserted node that is not part of one is refused, named."""
    inserted = [n for n in graph.nodes if n.meta.get("inserted") and n.op != "Constant"]
    readers = graph.consumers()
    outputs = set(graph.outputs)
    members_all = set(inserted)
    for const in (n for n in graph.nodes if n.meta.get("inserted") and n.op == "Constant"):
        strays = [r for r in readers[const] if r not in members_all]
        if strays or const in outputs:
            raise QCompilerError(f"the inserted weight {const.attrs['weight']} is read by {strays[0].name if strays else 'the output'}"
                                 ", a node of the model: backends lower inserted weights read by inserted nodes only "
                                 "(to change a weight, use Graph.set_weight); change the pass that inserted it")
    if not inserted:
        return []
    groups: dict[str, list[Node]] = {}
    module_io: dict[str, tuple[Node, Node]] = {}
    uses = graph.weight_uses()
    for n in inserted:
        if n.op not in EPILOGUE_OPS:
            raise QCompilerError(f"the inserted node {n.name} is a {n.op}: backends lower inserted "
                                 f"{', '.join(EPILOGUE_OPS)} nodes only; change the pass that inserted it")
        path = n.meta.get("epilogue_of")
        if path is None:
            raise QCompilerError(f"the inserted node {n.name} names no module (meta 'epilogue_of'): backends "
                                 "lower inserted nodes as a module's epilogue; change the pass that inserted it")
        if path not in module_io:
            module_io[path] = module_output(graph, path, uses, readers)
        groups.setdefault(path, []).append(n)
    out = []
    for path, nodes in groups.items():
        x, y = module_io[path]
        members = set(nodes)
        index = {n: i for i, n in enumerate(nodes)}
        steps, weights = [], {}
        for n in nodes:
            refs = []
            for i in n.inputs:
                if i in members:
                    refs.append(index[i])
                elif i is x:
                    refs.append("x")
                elif i is y:
                    refs.append("y")
                elif i.op == "Constant" and i.meta.get("inserted"):
                    name = i.attrs["weight"]
                    attr = name[len(path) + 1:] if name.startswith(path + ".") else ""
                    if not attr.isidentifier():
                        raise QCompilerError(f"the inserted weight {name} must be named {path}.<attribute> to be "
                                             "lowered; change the pass that inserted it")
                    weights[attr] = name
                    refs.append("w:" + attr)
                else:
                    raise QCompilerError(f"the inserted node {n.name} reads {i.name}, which is neither the input nor "
                                         f"the output of {path} nor a new weight: backends lower inserted nodes "
                                         "as one module's epilogue; change the pass that inserted it")
            if len(refs) != 2:
                raise QCompilerError(f"the inserted node {n.name} has {len(refs)} inputs, not 2")
            if set(n.attrs) - {"transpose_b"}:
                raise QCompilerError(f"the inserted node {n.name} has attributes {sorted(n.attrs)}: backends lower "
                                     "an inserted MatMul's transpose_b only; change the pass that inserted it")
            steps.append((n.op, refs, {"transpose_b": True} if n.attrs.get("transpose_b") else {}))
        last = nodes[-1]
        escaped = [n for n in nodes[:-1] if n in outputs or any(r not in members for r in readers[n])]
        if escaped or not any(r not in members for r in readers[last]) and last not in outputs:
            raise QCompilerError(f"the inserted nodes of {path} must end in one node that replaces its output "
                                 f"(Graph.replace_uses); {(escaped or [last])[0].name} does not")
        left = [r for r in readers[y] if r not in members]
        if left or y in outputs:
            raise QCompilerError(f"{(left[0].name if left else 'the graph output')} still reads the output of {path} "
                                 "past its inserted nodes, but backends replace a module's output for every reader: "
                                 "use Graph.replace_uses; change the pass that inserted them")
        out.append(Epilogue(path, steps, weights))
    return out


def module_output(graph: Graph, path: str, uses=None, readers=None) -> tuple[Node, Node]:
    """(input x, output y) of the module at `path` holding one weight-bearing MatMul: y is the MatMul,
    or the bias Add that reads it; or holding one embedding Gather (none of the former): y is the
    Gather, x its indices. `uses` / `readers`: `graph.weight_uses()` / `graph.consumers()` when a
    caller asks about many modules of an unchanged graph."""
    uses = graph.weight_uses() if uses is None else uses
    readers = graph.consumers() if readers is None else readers
    matmuls = [u.op for u in uses if u.op.op == "MatMul" and u.op.name.split("/")[0] == path
               and not u.op.meta.get("inserted")]
    gathers = [u.op for u in uses if u.op.op == "Gather" and u.op.name.split("/")[0] == path]
    if not matmuls and len(gathers) == 1:
        return gathers[0].inputs[1], gathers[0]
    if len(matmuls) != 1:
        raise QCompilerError(f"{path} is not a module with one weight-bearing MatMul ({len(matmuls)} found): an "
                             "epilogue can only follow such a module (a Linear, or an Embedding); change the pass "
                             "that inserted it")
    y = matmuls[0]
    adds = [r for r in readers[y] if r.op == "Add" and r.name.split("/")[0] == path
            and not r.meta.get("inserted")]
    return y.inputs[0], adds[0] if adds else y


@contextmanager
def in_module(module, graph: Graph):
    """`module` with the graph's rewritten non-weight parameters in place (named as in the module) and
    its epilogues attached as forward hooks; yields the rewritten parameters' names. The module's own
    tensors are restored and the hooks and new weights removed on exit."""
    saved, hooks, added = [], [], []
    try:
        for ep in epilogues(graph):
            try:
                owner = module.get_submodule(ep.path)
            except AttributeError:
                raise QCompilerError(f"{ep.path} (which a pass gave an epilogue) is not a module of the model being "
                                     "converted: report it") from None
            for attr, name in ep.weights.items():
                if hasattr(owner, attr):
                    raise QCompilerError(f"{ep.path} already has an attribute {attr}: rename the inserted weight")
                owner.register_parameter(attr, torch.nn.Parameter(graph.weights[name].float(),  # never a placeholder
                                                                  requires_grad=False))
                added.append((owner, attr))
            hooks.append(ep.attach(owner))
        for const in rewritten_params(graph):
            name = const.attrs["weight"]
            try:
                param = module.get_parameter(name)
            except AttributeError:
                raise QCompilerError(f"the rewritten parameter {name} is not a parameter of the model being "
                                     "converted: use --backend torch, or report it") from None
            value = graph.weight(const)
            if tuple(value.shape) != tuple(param.shape):
                raise QCompilerError(f"a pass changed the shape of {name} ({tuple(param.shape)} -> "
                                     f"{tuple(value.shape)}): no backend can take that")
            saved.append((param, param.data))
            value = value.to(param.dtype)
            graph.weights[name] = value  # a converter may share this memory: the IR keeps it alive
            param.data = value
        yield {c.attrs["weight"] for c in rewritten_params(graph)}
    finally:
        for param, data in saved:
            param.data = data
        for handle in hooks:
            handle.remove()
        for owner, attr in added:
            delattr(owner, attr)
