"""The OpenVINO frontend: an existing `.xml` IR (for example `optimum-cli export openvino`'s) into the IR.

Each OpenVINO op becomes one IR node through `_OPS` (anything else is `Opaque`); the weights are the
float Constants that reach a MatMul / Gather / Convolution directly or through a Convert (an f16
model's decompression to f32). The OpenVINO backend then replaces only those Constants, so every
other op, input, output and state variable (the KV cache of a stateful model) stays as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcompiler.companions import copy_companions
from qcompiler.config import LoadOptions
from qcompiler.errors import QCompilerError
from qcompiler.ir import Graph, Node

_OPS = {
    "MatMul": "MatMul", "Gather": "Gather", "Convolution": "Convolution", "Multiply": "Multiply", "Add": "Add",
    "Subtract": "Subtract", "Divide": "Divide", "Power": "Power", "Sqrt": "Sqrt", "Swish": "Swish", "Gelu": "Gelu",
    "Relu": "Relu", "Sigmoid": "Sigmoid", "Tanh": "Tanh", "Softmax": "Softmax", "ReduceMean": "ReduceMean",
    "Concat": "Concat", "Reshape": "Reshape", "Transpose": "Transpose", "Slice": "Slice", "StridedSlice": "Slice",
    "Convert": "Convert", "Negative": "Negative", "Parameter": "Parameter",
    "ScaledDotProductAttention": "ScaledDotProductAttention",
}
WEIGHT_PORT = {"MatMul": 1, "Gather": 0, "Convolution": 1}
FLOAT_TYPES = ("f32", "f16", "bf16")


@dataclass
class OpenVINOSource:
    model: Any  # ov.Model
    path: Path
    example_input: dict = field(default_factory=dict)
    tokenizer: Any = None
    is_causal_lm: bool = False
    constants: dict = field(default_factory=dict)  # IR weight name -> ov Constant, filled by trace


class OpenVINOFrontend:
    name = "openvino"
    default_backend = "openvino"

    def can_load(self, model: Any) -> bool:
        return isinstance(model, (str, Path)) and _model_file(Path(model)) is not None

    def load(self, model: Any, *, example_input: Any = None, options: LoadOptions | None = None) -> OpenVINOSource:
        import openvino as ov

        path = _model_file(Path(model))
        if not path.with_suffix(".bin").is_file():
            raise QCompilerError(f"{path.with_suffix('.bin')} is missing: an OpenVINO IR needs the .bin next to "
                                 "its .xml; copy both")
        from qcompiler.plugins.openvino import check_ir_xml, openvino_reason

        check_ir_xml(path, "cannot read the OpenVINO model", "the file is corrupt or truncated; export it again")
        try:
            ov_model = ov.Core().read_model(str(path))
        except RuntimeError as exc:
            raise QCompilerError(f"cannot read the OpenVINO model {path}: {openvino_reason(exc)} -- the .xml/.bin "
                                 "pair is corrupt or truncated; export it again") from None
        source = OpenVINOSource(ov_model, path, is_causal_lm=bool(ov_model.get_sinks()))
        if not any(op.get_type_name() == "MatMul" for op in _weight_ops(ov_model)):
            raise QCompilerError(f"the OpenVINO model {path} has no MatMul with a constant float weight, so there "
                                 "is nothing to compress (is it already compressed?)")
        return source

    def trace(self, source: OpenVINOSource) -> Graph:
        graph, source.constants = trace_openvino(source.model, source.path.stem)
        return graph

    def runner(self, source: OpenVINOSource):
        from qcompiler.plugins.openvino import OpenVINORunner

        return OpenVINORunner(source.path)

    def save_companions(self, source: OpenVINOSource, out_dir: Path) -> list[str]:
        return copy_companions(source.path.parent, out_dir)


def _model_file(path: Path) -> Path | None:
    if path.is_file() and path.suffix == ".xml":
        return path
    if path.is_dir() and (path / "openvino_model.xml").is_file():
        return path / "openvino_model.xml"
    return None


def _weight_source(op) -> Any | None:
    """The float Constant feeding `op`'s weight port directly or through one Convert, or None."""
    port = WEIGHT_PORT.get(op.get_type_name())
    if port is None or op.get_input_size() <= port:
        return None
    node = op.input_value(port).get_node()
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant" or node.get_element_type().get_type_name() not in FLOAT_TYPES:
        return None
    if len(node.get_output_partial_shape(0)) < 2:
        return None
    if op.get_type_name() == "Gather" and _gather_axis(op) != 0:
        return None
    return node


def _gather_axis(op) -> int | None:
    axis = op.input_value(2).get_node()
    return int(axis.get_data().reshape(-1)[0]) if axis.get_type_name() == "Constant" else None


def _weight_ops(model) -> list:
    return [op for op in model.get_ordered_ops() if _weight_source(op) is not None]


def trace_openvino(model, name: str = "openvino") -> tuple[Graph, dict]:
    """The IR of `model`, and the OpenVINO Constant behind each IR weight."""
    graph = Graph(name)
    values: dict[str, Node] = {}  # keyed by OpenVINO's unique node name (Python wrappers are not stable)
    weights: dict[str, Node] = {}  # ov Constant name -> IR Constant
    constants: dict[str, Any] = {}
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind in ("Constant", "Result"):
            continue
        source = _weight_source(op)
        inputs = []
        for i in range(op.get_input_size()):
            producer = op.input_value(i).get_node()
            if i == WEIGHT_PORT.get(kind) and source is not None:
                if source.get_name() not in weights:
                    weight_name = graph.unique_name(source.get_friendly_name())
                    tensor = torch.from_numpy(np.array(source.get_data()))
                    weights[source.get_name()] = graph.add_weight(weight_name, tensor)
                    constants[weight_name] = source
                inputs.append(weights[source.get_name()])
            elif producer.get_name() in values:
                inputs.append(values[producer.get_name()])
        op_name = _OPS.get(kind, "Opaque")
        attrs = {} if op_name != "Opaque" else {"type": kind}
        if kind == "MatMul":
            attrs = {"transpose_b": bool(op.get_attributes().get("transpose_b", False))}
        elif kind == "Gather":
            attrs = {"axis": _gather_axis(op)}
        values[op.get_name()] = graph.add(op_name, inputs, attrs, name=op.get_friendly_name())
    graph.outputs = [values[r.input_value(0).get_node().get_name()] for r in model.get_results()
                     if r.input_value(0).get_node().get_name() in values]
    return graph, constants
