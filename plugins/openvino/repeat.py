"""A causal LM's OpenVINO graph built from a few converted blocks (`protocols.Repeat`).

OpenVINO's PyTorch frontend spends about 0.17 s per transformer block (TorchScript trace, op
conversion, MOC transformations): 5 of SmolLM2's 14 s. When the source says its blocks are alike,
the converter runs on a copy with four, and the graph is completed by repeating the third:

1. Each traced block i is found from the converter's node names (`__module.<prefix>.<i>/...`), its
   weights (Constants named `self.<prefix>.<i>.<name>`, or holding a marker's values where the
   converter folded a small parameter into a new constant), its past-cache Parameters and present
   Results. Its output is the one port of its own nodes that a later block reads; its body is every
   node on a path from its input, weights or past to its output or present (with the constant-only
   nodes feeding it).
2. Blocks 1 and 2 must match node for node: same op types, attributes and wiring, the same weights
   by name, the same shared inputs (the rotary tables, the mask) or equal values. Otherwise (a
   family whose blocks differ, a converter that folded something per block) this returns None and
   every block is converted.
3. For each further block L, a clone of the 4-block graph gives a copy of block 2's body, rewired
   to block L-1's output, new Parameters for block L's past, new Results for its present, the
   shared inputs of the main graph, and Constants holding block L's own tensors (sharing the torch
   model's memory where the tensor is contiguous), with node and tensor names of its own. Block 3
   is dropped: the last copy feeds the final norm.
4. The markers in blocks 0-2 are replaced by the real parameters (blocks 0-2 must read the same
   weights by name, and every marker must be found, so none can stay behind).
The result has the inputs and outputs of the full conversion, in its order (tested against it).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import openvino as ov
import openvino.opset13 as ops
from openvino import op as ov_op
import torch

log = logging.getLogger("qcompiler")

OV_DTYPES = {torch.float32: ov.Type.f32, torch.float16: ov.Type.f16, torch.bfloat16: ov.Type.bf16}


class NotRepeatable(Exception):
    pass


def repeated(make_repeat, what: str) -> ov.Model | None:
    """The full model's float graph (inputs and outputs as `torch_to_openvino` gives them for the
    full export), or None when its blocks cannot be repeated (then convert them all).
    `make_repeat()` gives the source's `Repeat` or None (`ExportSpec.repeat`)."""
    from qcompiler.plugins.openvino.lower import torch_to_openvino

    try:
        repeat = make_repeat()
        if repeat is None:
            return None
        spec = repeat.spec
        if len(spec.cache) != 2 * repeat.traced:
            return None
        tokens = len(spec.input_names) - len(spec.cache)
        shapes = [ov.PartialShape([-1, -1])] * tokens + [ov.PartialShape([-1, h, -1, d]) for h, d in spec.past_shapes]
        model = torch_to_openvino(spec.module, spec.args, shapes, what)
        return _Repeater(model, repeat, tokens).build()
    except Exception as exc:  # NotRepeatable, or anything the shortcut trips on: the full conversion decides
        log.debug("OpenVINO conversion of every block: %s: %s", type(exc).__name__, exc)
        return None


def _id(node) -> int:
    return node.get_instance_id()


class _Repeater:
    def __init__(self, model: ov.Model, repeat, tokens: int) -> None:
        self.model, self.repeat, self.tokens = model, repeat, tokens
        self.template = model.clone()  # before any rewiring: each further block is cut from a clone
        self.order = model.get_ordered_ops()
        self.index = {_id(n): i for i, n in enumerate(self.order)}
        self.consumers: list[list[int]] = [[] for _ in self.order]
        for i, node in enumerate(self.order):
            for value in node.input_values():
                self.consumers[self.src(value)].append(i)
        self.const_only = []
        for node in self.order:
            kind = node.get_type_name()
            self.const_only.append(kind == "Constant" or (
                kind not in ("Parameter", "ReadValue") and node.get_input_size() > 0
                and all(self.const_only[self.src(v)] for v in node.input_values())))
        params, results = list(model.get_parameters()), list(model.get_results())
        self.params, self.results = params, results
        self.weights = self._weights()
        self.past = [[self.index[_id(params[tokens + 2 * b + j])] for j in range(2)] for b in range(repeat.traced)]
        self.present = [[(self.src(results[1 + 2 * b + j].input_value(0)), results[1 + 2 * b + j].input_value(0)
                          .get_index()) for j in range(2)] for b in range(repeat.traced)]
        self.hidden, self.readers = zip(*(self._output(b) for b in range(repeat.traced)))
        self.body = {b: self._body(b) for b in (1, 2)}

    def src(self, value) -> int:
        return self.index[_id(value.get_node())]

    def _named(self, block: int) -> set[int]:
        tag = f"__module.{self.repeat.prefix}.{block}"
        return {i for i, n in enumerate(self.order) if n.get_friendly_name().startswith((tag + "/", tag + "."))}

    def _weights(self) -> list[dict[int, str]]:
        """Per traced block, {node index: export name} of its weight Constants: named after the
        parameter, or holding a marker's values (each small constant hashed once)."""
        prefix = self.repeat.prefix
        out: list[dict[int, str]] = [{} for _ in range(self.repeat.traced)]
        for i, node in enumerate(self.order):
            if node.get_type_name() != "Constant":
                continue
            name = node.get_friendly_name()
            if name.startswith(f"self.{prefix}."):
                name = name[len("self."):]
            elif node.get_output_element_type(0) == ov.Type.f32 and node.get_output_partial_shape(0).is_static:
                data = node.get_data()
                if not data.size or data.size >= (1 << 16):
                    continue
                name = self.repeat.markers.get(hashlib.sha1(np.ascontiguousarray(data, np.float32).tobytes())
                                               .hexdigest())
            else:
                continue
            block = name.split(".")[prefix.count(".") + 1] if name and name.startswith(prefix + ".") else ""
            if block.isdigit() and int(block) < self.repeat.traced:
                out[int(block)][i] = name
        return out

    def _reach(self, seeds, down: bool, through_shapes: bool = True) -> set[int]:
        seen, stack = set(seeds), list(seeds)
        while stack:
            i = stack.pop()
            if not through_shapes and self.order[i].get_type_name() == "ShapeOf":
                continue
            nexts = self.consumers[i] if down else [self.src(v) for v in self.order[i].input_values()]
            for j in nexts:
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
        return seen

    def _seeds(self, block: int) -> set[int]:
        return {c for i in [*self.weights[block], *self.past[block]] for c in self.consumers[i]}

    def _output(self, block: int):
        """(node index, port) of the block's hidden-state output, and the inputs reading it after it."""
        named = self._named(block)
        inner = self._reach(named | {i for i, _ in self.present[block]}, down=False)
        own = self._reach(self._seeds(block), down=True, through_shapes=False)
        ports: dict[tuple[int, int], list] = {}
        for i in named & own:
            for port, out in enumerate(self.order[i].outputs()):
                for target in out.get_target_inputs():
                    c = self.index[_id(target.get_node())]
                    if c not in named and c not in inner and self.order[c].get_type_name() != "Result":
                        ports.setdefault((i, port), []).append(target)
        if len(ports) != 1:
            raise NotRepeatable(f"block {block} has {len(ports)} outputs")
        return next(iter(ports.items()))

    def _body(self, block: int) -> list[int]:
        seeds = set(self.consumers[self.hidden[block - 1][0]]) | self._seeds(block)
        body = self._reach(seeds, down=True) & self._reach({self.hidden[block][0]} | {i for i, _ in self.present[block]},
                                                            down=False)
        stack = [self.src(v) for i in body for v in self.order[i].input_values()]
        while stack:  # constant-only nodes that feed the block (converts of scalars, shapes of weights)
            i = stack.pop()
            if self.const_only[i] and i not in body and self.order[i].get_type_name() != "Constant":
                body.add(i)
                stack.extend(self.src(v) for v in self.order[i].input_values())
        return sorted(i for i in body if self.order[i].get_type_name() not in ("Constant", "Parameter", "Result"))

    def kind(self, value, block: int, body: set[int]):
        """What a block's node reads: ("in", node, port), ("hidden",), ("weight", name with {}),
        ("past", j) or ("shared", node, port)."""
        i, port = self.src(value), value.get_index()
        if i in body:
            return ("in", i, port)
        if (i, port) == self.hidden[block - 1]:
            return ("hidden",)
        if i in self.weights[block]:
            own = f"{self.repeat.prefix}.{block}."
            return ("weight", self.weights[block][i].replace(own, f"{self.repeat.prefix}.{{}}.", 1),
                    tuple(self.order[i].get_output_shape(0)))
        if i in self.past[block]:
            return ("past", self.past[block].index(i))
        return ("shared", i, port)

    def check(self) -> None:
        """Blocks 0-2 read the same weights (by name, every marker found), and blocks 1 and 2 match
        node for node (else NotRepeatable)."""
        prefix = self.repeat.prefix
        templates = [sorted(n.replace(f"{prefix}.{b}.", f"{prefix}.{{}}.", 1) for n in self.weights[b].values())
                     for b in range(3)]
        if templates[0] != templates[1] or templates[1] != templates[2]:
            raise NotRepeatable("blocks 0, 1 and 2 read different weights")
        for name in self.repeat.markers.values():  # a marker folded into something else would stay in the model
            block = name[len(prefix) + 1:].split(".", 1)[0]
            if block in ("0", "1", "2") and name not in self.weights[int(block)].values():
                raise NotRepeatable(f"{name} was folded into another constant")
        b1, b2 = self.body[1], self.body[2]
        if len(b1) != len(b2):
            raise NotRepeatable(f"blocks 1 and 2 have {len(b1)} and {len(b2)} nodes")
        s1, s2 = set(b1), set(b2)
        tag1, tag2 = f".{self.repeat.prefix}.1", f".{self.repeat.prefix}.2"
        by_name = {self.order[i].get_friendly_name(): i for i in b2}
        match: dict[int, int] = {}
        for x in b1:
            name = self.order[x].get_friendly_name()
            if tag1 + "/" in name or tag1 + "." in name:
                y = by_name.get(name.replace(tag1, tag2, 1))
                if y is None:
                    raise NotRepeatable(f"{name} has no counterpart in block 2")
                match[x] = y
        for x in reversed(b1):  # unnamed nodes: through a matched consumer
            for target in (t for out in self.order[x].outputs() for t in out.get_target_inputs()):
                if x in match:
                    break
                z = self.index[_id(target.get_node())]
                if z in match:
                    match[x] = self.src(self.order[match[z]].input_value(target.get_index()))
            if match.get(x) not in s2:
                raise NotRepeatable(f"{self.order[x].get_friendly_name()} has no counterpart in block 2")
        if sorted(match.values()) != b2:
            raise NotRepeatable("blocks 1 and 2 do not match one to one")
        ends = [(self.hidden[1], self.hidden[2])] + list(zip(self.present[1], self.present[2]))
        if any(a[0] not in match or (match[a[0]], a[1]) != b for a, b in ends):
            raise NotRepeatable("blocks 1 and 2 end in different nodes")
        memo: dict = {}
        for x in b1:
            a, b = self.order[x], self.order[match[x]]
            if (a.get_type_name(), a.get_input_size(), a.get_output_size()) != (
                    b.get_type_name(), b.get_input_size(), b.get_output_size()) or not _same_attributes(a, b):
                raise NotRepeatable(f"{a.get_friendly_name()} differs from {b.get_friendly_name()}")
            for va, vb in zip(a.input_values(), b.input_values()):
                ka, kb = self.kind(va, 1, s1), self.kind(vb, 2, s2)
                same = ka[0] == kb[0] and (
                    (ka[0] == "in" and (match[ka[1]], ka[2]) == kb[1:]) or ka[0] == "hidden"
                    or (ka[0] in ("weight", "past") and ka[1:] == kb[1:])
                    or (ka[0] == "shared" and _same_value(va, vb, memo)))
                if not same:
                    raise NotRepeatable(f"{a.get_friendly_name()} reads {ka[0]} where block 2 reads {kb[0]}")

    def build(self) -> ov.Model:
        self.check()
        clone = [(n.get_type_name(), n.get_friendly_name()) for n in self.template.get_ordered_ops()]
        if clone != [(n.get_type_name(), n.get_friendly_name()) for n in self.order]:
            raise NotRepeatable("a clone of the graph orders its nodes differently")
        for block in range(3):  # the markers out, the real parameters in
            for i, name in self.weights[block].items():
                if name in self.repeat.markers.values():
                    _replace(self.order[i].output(0), self._constant(name, self.order[i]))
        body = self.body[2]
        inside = set(body)
        prefix = self.repeat.prefix
        previous = self.order[self.hidden[2][0]].output(self.hidden[2][1])
        new_params, new_results = [], []
        for block in range(3, self.repeat.layers):
            nodes = self.template.clone().get_ordered_ops()
            index = {_id(n): i for i, n in enumerate(nodes)}
            past = [ops.parameter(self.order[i].get_output_partial_shape(0), self.order[i].get_output_element_type(0))
                    for i in self.past[2]]
            new_params += past
            weights: dict[int, ov.Output] = {}
            for x in body:
                for target in nodes[x].inputs():
                    value = target.get_source_output()
                    i, port = index[_id(value.get_node())], value.get_index()
                    if i in inside:
                        continue
                    if (i, port) == self.hidden[1]:
                        target.replace_source_output(previous)
                    elif i in self.weights[2]:
                        if i not in weights:
                            name = self.weights[2][i].replace(f"{prefix}.2.", f"{prefix}.{block}.", 1)
                            weights[i] = self._constant(name, self.order[i])
                        target.replace_source_output(weights[i])
                    elif i in self.past[2]:
                        target.replace_source_output(past[self.past[2].index(i)].output(0))
                    else:  # shared: the main graph's node
                        target.replace_source_output(self.order[i].output(port))
            for i, port in self.present[2]:
                new_results.append(ops.result(nodes[i].output(port)))
            for x in body:  # unique node and tensor names (runtimes and NNCF find outputs by them)
                name = nodes[x].get_friendly_name()
                tag = f".{prefix}.2"
                nodes[x].set_friendly_name(name.replace(tag, f".{prefix}.{block}", 1) if tag in name
                                           else f"{name}/block{block}")
                for out in nodes[x].outputs():
                    if out.get_names():
                        out.get_tensor().set_names({f"{n}/block{block}" for n in out.get_names()})
            previous = nodes[self.hidden[2][0]].output(self.hidden[2][1])
        for target in self.readers[3]:  # the final norm reads the last block
            target.replace_source_output(previous)
        keep = 2 * 3
        params = self.params[:self.tokens + keep] + new_params
        results = self.results[:1 + keep] + new_results
        try:
            model = ov.Model(results, params, self.model.get_friendly_name())
            model.validate_nodes_and_infer_types()
        except RuntimeError as exc:  # block 3's nodes still read by the rest: not a clean cut
            raise NotRepeatable(str(exc).splitlines()[0]) from None
        return model

    def _constant(self, name: str, like) -> ov.Output:
        """A Constant of block tensor `name` (an export name), shaped and typed as `like`, sharing memory
        with the torch model's tensor and holding it (the model may outlive the source): OpenVINO keeps
        the numpy array a Constant is made from alive, not one behind an ov.Tensor."""
        tensor = self.repeat.tensor(name)
        shape = list(like.get_output_shape(0))
        element = like.get_output_element_type(0)
        if OV_DTYPES.get(tensor.dtype) != element or tensor.numel() != int(np.prod(shape)):
            raise NotRepeatable(f"{name} is {tensor.dtype} {tuple(tensor.shape)}, its constant {element} {shape}")
        tensor = tensor.contiguous()
        if tensor.dtype == torch.bfloat16:  # no numpy type: through an ov.Tensor, which would not hold it, so copied
            array = tensor.view(torch.int16).numpy().reshape(shape)
            node = ops.constant(ov.Tensor(array, ov.Shape(shape), element), shared_memory=False)
        else:
            node = ov_op.Constant(tensor.numpy().reshape(shape), shared_memory=True)
        node.set_friendly_name("self." + name)
        return node.output(0)


def _replace(old: ov.Output, new: ov.Output) -> None:
    for target in list(old.get_target_inputs()):
        target.replace_source_output(new)


def _same_attributes(a, b) -> bool:
    try:
        return a.get_attributes() == b.get_attributes()
    except Exception:  # an op whose attributes Python cannot read: not known to be the same
        return False


def _const_key(node):
    return str(node.get_output_element_type(0)), tuple(node.get_output_shape(0)), node.get_data().tobytes()


def _same_value(a, b, memo: dict) -> bool:
    """Whether two ports compute the same value from the same inputs."""
    na, nb = a.get_node(), b.get_node()
    key = (_id(na), a.get_index(), _id(nb), b.get_index())
    if key not in memo:
        if _id(na) == _id(nb) and a.get_index() == b.get_index():
            memo[key] = True
        elif (na.get_type_name(), a.get_index(), na.get_input_size()) != (nb.get_type_name(), b.get_index(),
                                                                           nb.get_input_size()):
            memo[key] = False
        elif na.get_type_name() == "Constant":
            memo[key] = _const_key(na) == _const_key(nb)
        elif na.get_type_name() in ("Parameter", "ReadValue"):
            memo[key] = False
        else:
            memo[key] = _same_attributes(na, nb) and all(
                _same_value(x, y, memo) for x, y in zip(na.input_values(), nb.input_values()))
    return memo[key]
