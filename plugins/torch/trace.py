"""Trace a torch module into the IR by recording one eager forward pass.

A `TorchFunctionMode` sees every torch function call of the forward (F.linear, F.embedding,
torch.mul, ...) with its tensor arguments; tensors are tied to the nodes that made them by
identity, parameters become weight Constants named after the parameter, and each node is named
after the module that ran it (`model.layers.0.mlp.up_proj/MatMul`). Like `torch.jit.trace`, it
records the path the example input takes. It costs one forward on a few tokens (a fraction of a
second for SmolLM2, against about 13 s for `torch.export`), copies no weight, and the small
translation table `_OPS` is the only place torch op names appear.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from qcompiler.ir import Graph, Node

T = torch.Tensor
_OPS: dict[Any, tuple[str, dict]] = {
    F.linear: ("MatMul", {"transpose_b": True}),
    torch.matmul: ("MatMul", {}), T.matmul: ("MatMul", {}), T.__matmul__: ("MatMul", {}),
    torch.bmm: ("MatMul", {}), T.bmm: ("MatMul", {}),
    F.embedding: ("Gather", {"axis": 0}),
    F.conv1d: ("Convolution", {}), F.conv2d: ("Convolution", {}), F.conv3d: ("Convolution", {}),
    torch.mul: ("Multiply", {}), T.mul: ("Multiply", {}), T.__mul__: ("Multiply", {}), T.__rmul__: ("Multiply", {}),
    torch.add: ("Add", {}), T.add: ("Add", {}), T.__add__: ("Add", {}), T.__radd__: ("Add", {}),
    torch.sub: ("Subtract", {}), T.sub: ("Subtract", {}), T.__sub__: ("Subtract", {}),
    torch.div: ("Divide", {}), T.div: ("Divide", {}), T.__truediv__: ("Divide", {}),
    torch.pow: ("Power", {}), T.pow: ("Power", {}), T.__pow__: ("Power", {}),
    torch.sqrt: ("Sqrt", {}), torch.rsqrt: ("Rsqrt", {}), T.rsqrt: ("Rsqrt", {}),
    torch.mean: ("ReduceMean", {}), T.mean: ("ReduceMean", {}),
    F.silu: ("Swish", {}), F.gelu: ("Gelu", {}), F.relu: ("Relu", {}), torch.relu: ("Relu", {}),
    torch.sigmoid: ("Sigmoid", {}), torch.tanh: ("Tanh", {}), F.softmax: ("Softmax", {}),
    torch.softmax: ("Softmax", {}), F.scaled_dot_product_attention: ("ScaledDotProductAttention", {}),
    torch.cat: ("Concat", {}), T.view: ("Reshape", {}), T.reshape: ("Reshape", {}), torch.reshape: ("Reshape", {}),
    T.transpose: ("Transpose", {}), torch.transpose: ("Transpose", {}), T.permute: ("Transpose", {}),
    T.__getitem__: ("Slice", {}), T.to: ("Convert", {}), T.float: ("Convert", {}), T.__neg__: ("Negative", {}),
    torch.neg: ("Negative", {}),
}


_ADDMM = (torch.addmm, T.addmm)
_TRANSPOSE_2D = (T.t, torch.t)


def _is_transpose(func, args) -> bool:
    """`W.T`, `W.t()`, `torch.t(W)` or `W.transpose(0, 1)` of a matrix, or the swap of the last two
    axes of batched matrices (MoE experts [experts, out, in]: `W.transpose(1, 2)`, `W.mT`)."""
    rank = args[0].dim() if args and isinstance(args[0], torch.Tensor) else 0
    if rank == 2 and (func in _TRANSPOSE_2D or func == T.T.__get__):
        return True
    if func == T.mT.__get__:
        return rank >= 2
    return func in (T.transpose, torch.transpose) and rank >= 2 and sorted(a % rank for a in args[1:3]) == [
        rank - 2, rank - 1]


class _Recorder(TorchFunctionMode):
    def __init__(self, graph: Graph, params: dict[int, str], inputs: dict[int, Node], module_names) -> None:
        super().__init__()
        self.graph, self.params, self.values = graph, params, dict(inputs)
        self.transposed: dict[int, torch.Tensor] = {}
        self.module_names, self.scope = module_names, ["model"]
        self.alive: list[Any] = []  # keeps recorded tensors alive so their ids stay unique

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outs:
            return out
        op, attrs = _OPS.get(func, ("Opaque", {"fn": getattr(func, "__name__", str(func))}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        if _is_transpose(func, args) and id(tensors[0]) in self.params and tensors[0].dim() in (2, 3):
            self.transposed[id(out)] = tensors[0]  # W.T of a parameter: a MatMul reading it takes W, transpose_b
            op, attrs = "Transpose", {}
        if op == "MatMul" and len(tensors) == 2 and id(tensors[1]) in self.transposed:
            tensors[1], attrs = self.transposed[id(tensors[1])], {"transpose_b": True}
        inputs = [self.value(t) for t in tensors]
        if func is F.embedding:  # F.embedding(indices, weight) -> Gather(data, indices)
            inputs[:2] = inputs[1::-1]
        if func is F.linear and len(inputs) == 3:  # bias: MatMul then Add
            node = self.graph.add(op, inputs[:2], attrs, self._name(op), {"shape": tuple(outs[0].shape)})
            node = self.graph.add("Add", [node, inputs[2]], {}, self._name("Add"))
        elif func in _ADDMM:  # addmm(bias, x, W) = x @ W + bias (GPT-2's Conv1D: W is [in, out])
            node = self.graph.add("MatMul", inputs[1:3], {}, self._name("MatMul"), {"shape": tuple(outs[0].shape)})
            node = self.graph.add("Add", [node, inputs[0]], {}, self._name("Add"))
        else:
            node = self.graph.add(op, inputs, attrs, self._name(op), {"shape": tuple(outs[0].shape)})
        if isinstance(out, torch.Tensor):
            self.values[id(out)] = node
        else:
            for i, t in enumerate(outs):
                self.values[id(t)] = self.graph.add("GetItem", [node], {"index": i}, self._name("GetItem"))
        self.alive.append(out)
        return out

    def value(self, t: torch.Tensor) -> Node:
        node = self.values.get(id(t))
        if node is None:
            name = self.params.get(id(t))
            if name is not None:
                node = self.graph.add_weight(name, t.detach())
            else:  # a tensor made outside recorded calls: a small constant, not a weight
                node = self.graph.add("Opaque", [], {"fn": "tensor"}, self._name("Tensor"), {"shape": tuple(t.shape)})
            self.values[id(t)] = node
            self.alive.append(t)
        return node

    def _name(self, op: str) -> str:
        return f"{self.scope[-1]}/{op}"

    def enter(self, module, *_):
        self.scope.append(self.module_names.get(module, self.scope[-1]))

    def leave(self, *_):
        self.scope.pop()


def trace_module(module: torch.nn.Module, example_inputs: dict[str, torch.Tensor], name: str = "model",
                 outputs: list[str] | None = None) -> Graph:
    """The IR of `module(**example_inputs)`; graph outputs are the tensors the forward returns, or with
    `outputs` only those fields of its output (an encoder's `last_hidden_state`): what they do not
    depend on (BERT's pooler) is dropped, its weights then unused, as they are in the export."""
    graph = Graph(name)
    inputs = {id(t): graph.add("Parameter", [], {"shape": [None] * t.dim(), "dtype": str(t.dtype)}, key)
              for key, t in example_inputs.items()}
    params = {}
    for pname, p in list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers()):
        params.setdefault(id(p), pname)
    buffers = {name for name, _ in module.named_buffers()}
    module_names = {m: (n or "model") for n, m in module.named_modules()}
    recorder = _Recorder(graph, params, inputs, module_names)
    hooks = []
    for m in module_names:
        hooks.append(m.register_forward_pre_hook(recorder.enter))
        hooks.append(m.register_forward_hook(recorder.leave))
    try:
        with torch.no_grad(), recorder:
            out = module(**example_inputs)
    finally:
        for h in hooks:
            h.remove()
    if outputs is not None:
        out = [out[key] for key in outputs]
    graph.outputs = [recorder.values[id(t)] for t in _output_tensors(out) if id(t) in recorder.values]
    read = {id(p) for p in module.parameters() if id(p) in recorder.values}
    if outputs is not None:
        read = _prune(graph, {pname: id(p) for pname, p in module.named_parameters(remove_duplicate=False)})
    for pname, p in module.named_parameters():  # parameters the forward never read: visible, not lost
        if id(p) not in read:
            node = graph.add_weight(pname, p.detach())
            node.meta["unused"] = True
            if id(p) in recorder.values:  # read on the way to an output that is not exported
                node.meta["dropped"] = f"not needed for {', '.join(outputs)}, the exported output"
    for node in graph.nodes:
        if node.op == "Constant" and node.attrs.get("weight") in buffers:
            node.meta["buffer"] = True
    return graph


def _prune(graph: Graph, ids: dict[str, int]) -> set[int]:
    """Drop the nodes the graph's outputs do not depend on (inputs stay); return the ids of the
    parameters still read."""
    keep, stack = set(), list(graph.outputs)
    while stack:
        node = stack.pop()
        if id(node) not in keep:
            keep.add(id(node))
            stack.extend(node.inputs)
    graph.nodes = [n for n in graph.nodes if id(n) in keep or n.op == "Parameter"]
    names = {n.attrs["weight"] for n in graph.nodes if n.op == "Constant" and "weight" in n.attrs}
    for name in [w for w in graph.weights if w not in names]:
        del graph.weights[name]
    return {ids[name] for name in names if name in ids}


def _output_tensors(out) -> list[torch.Tensor]:
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
