"""The ONNX frontend: an existing `.onnx` model (for example one optimum exported) into the IR.

Each ONNX node becomes one IR node through the table `_OPS` (anything else is `Opaque`); the
weights are the float initializers (or Constant tensors) that reach a MatMul / Gather / Conv
through Cast / Identity / Transpose chains, named as in the file. The ONNX backend rewrites only
those weights' ops and keeps everything else, so the model's inputs, outputs and KV cache stay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch

from qcompiler.companions import copy_companions, load_tokenizer
from qcompiler.config import LoadOptions
from qcompiler.errors import QCompilerError
from qcompiler.ir import Graph, Node
from qcompiler.plugins.onnx.onnxgraph import GraphIndex, attribute, gemms_as_matmuls, to_array

_OPS = {
    "MatMul": "MatMul", "Gather": "Gather", "Conv": "Convolution", "Mul": "Multiply", "Add": "Add",
    "Sub": "Subtract", "Div": "Divide", "Pow": "Power", "Sqrt": "Sqrt", "Sigmoid": "Sigmoid", "Tanh": "Tanh",
    "Relu": "Relu", "Gelu": "Gelu", "Softmax": "Softmax", "ReduceMean": "ReduceMean", "Concat": "Concat",
    "Reshape": "Reshape", "Transpose": "Transpose", "Slice": "Slice", "Cast": "Convert", "Neg": "Negative",
}


@dataclass
class ONNXSource:
    model: onnx.ModelProto
    path: Path
    example_input: dict = field(default_factory=dict)
    tokenizer: Any = None
    is_causal_lm: bool = False

    @property
    def is_encoder(self) -> bool:
        """Token ids in, no KV cache: calibration text is one sentence per line, as for a transformers encoder."""
        return not self.is_causal_lm and any(i.name == "input_ids" for i in self.model.graph.input)


class ONNXFrontend:
    name = "onnx"
    default_backend = "onnx"
    # the passes its executor serves: it runs the model as it is, with taps (see calibrate.py)
    calibration_passes = ("smooth_quant", "activation_quant")

    def can_load(self, model: Any) -> bool:
        return isinstance(model, (str, Path)) and _model_file(Path(model)) is not None

    def load(self, model: Any, *, example_input: Any = None, options: LoadOptions | None = None) -> ONNXSource:
        path = _model_file(Path(model))
        try:
            proto = onnx.load(str(path))
            onnx.checker.check_model(proto, full_check=False)
        except Exception as exc:  # protobuf DecodeError, ValidationError, a missing external-data file
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise QCompilerError(f"cannot read the ONNX model {path}: {first} -- the file is corrupt or "
                                 "truncated; export it again") from None
        gemms_as_matmuls(proto.graph)  # an exporter's Gemm weights are weights too
        index = GraphIndex(proto.graph)
        if not any(u.node.op_type == "MatMul" for uses in index.weights().values() for u in uses):
            raise QCompilerError(f"the ONNX model {path} has no MatMul with a constant float weight, so there is "
                                 "nothing to compress (is it already quantized?)")
        inputs = {i.name for i in proto.graph.input}
        return ONNXSource(proto, path, tokenizer=load_tokenizer(path.parent),
                          is_causal_lm=any(n.startswith("past_key_values.") for n in inputs))

    def trace(self, source: ONNXSource) -> Graph:
        return trace_onnx(source.model, source.path.stem)

    def executor(self, source: ONNXSource, graph: Graph):
        """The calibration engine's executor: the whole model as one block, on onnxruntime."""
        from qcompiler.plugins.onnx.calibrate import ONNXExecutor

        return ONNXExecutor(source.model, source.path, [c.attrs["weight"] for c in graph.parameter_constants()])

    def runner(self, source: ONNXSource):
        from qcompiler.plugins.onnx import ONNXRunner

        return ONNXRunner(source.path)

    def save_companions(self, source: ONNXSource, out_dir: Path) -> list[str]:
        return copy_companions(source.path.parent, out_dir)


def _model_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".onnx":
        return path
    if path.is_dir() and (path / "model.onnx").is_file():
        return path / "model.onnx"
    return None


def trace_onnx(model: onnx.ModelProto, name: str = "onnx") -> Graph:
    graph = Graph(name)
    index = GraphIndex(model.graph)
    values: dict[str, Node] = {}
    for inp in model.graph.input:
        if inp.name not in index.initializers:
            values[inp.name] = graph.add("Parameter", name=inp.name)
    weight_of: dict[int, tuple[Node, bool]] = {}  # id(op node) -> (weight Constant, transposed)
    skip: set[int] = set()
    for tname, uses in index.weights().items():
        array = to_array(index.tensor(tname))
        const = graph.add_weight(tname, torch.from_numpy(array.copy()))
        for use in uses:
            weight_of[id(use.node)] = (const, use.transposed)
            skip.update(id(n) for n in use.chain)
    for node in model.graph.node:
        if id(node) in skip or node.op_type == "Constant":
            continue
        op = _OPS.get(node.op_type, "Opaque")
        inputs = [values[i] for i in node.input if i in values]
        attrs = {} if op != "Opaque" else {"type": node.op_type}
        if id(node) in weight_of:
            const, transposed = weight_of[id(node)]
            activation = [values[i] for i in node.input[:2] if i in values]
            if op == "Gather":
                inputs, attrs = [const, *activation], {"axis": attribute(node, "axis", 0)}
            else:
                inputs = [*activation, const] + [values[i] for i in node.input[2:] if i in values]
                attrs = {"transpose_b": transposed} if op == "MatMul" else {}
        ir_node = graph.add(op, inputs, attrs, name=node.name or f"{node.op_type}_{len(graph.nodes)}")
        for out in node.output:
            values[out] = ir_node
    graph.outputs = [values[o.name] for o in model.graph.output if o.name in values]
    return graph
