"""The float ONNX model of a torch source, and writing a model (external data over 2 GB)."""

from __future__ import annotations

from pathlib import Path

import onnx

from qcompiler.errors import export_failed
from qcompiler.output_checks import write_error
from qcompiler.plugins.onnx.onnxgraph import gemms_as_matmuls

OPSET = 21  # the first with int4/uint4 and blocked DequantizeLinear
TWO_GB = 2**31 - 1


def export_float(source, path: Path):
    """The float ONNX model of a torch source, and its export spec (whose `weight_prefix` the
    initializers carry before IR names).

    The source's `export_spec()` gives the module and its signature; a causal LM comes with its KV
    cache as inputs and outputs in optimum's ORTModelForCausalLM layout. Constant folding is off so
    initializers keep the module's names (MatMuls read them through a Transpose, which the lowering
    removes); onnxruntime folds what is left at load time.
    """
    import torch

    spec = source.export_spec()
    try:
        with torch.no_grad():
            torch.onnx.export(spec.module, spec.args, str(path), dynamo=False, input_names=spec.input_names,
                              output_names=spec.output_names or None, dynamic_axes=spec.dynamic_axes,
                              opset_version=OPSET, do_constant_folding=False)
    except Exception as exc:  # the tracer and the symbolic functions raise their own types
        raise (write_error(exc, path.parent) or export_failed("ONNX", type(source.model).__name__, exc)) from None
    model = onnx.load(str(path))
    gemms_as_matmuls(model.graph)
    return model, spec


def save(model: onnx.ModelProto, path: Path) -> list[str]:
    """Write the model; over 2 GB, its tensors go to `<name>_data` next to it (ONNX external data)."""
    for stale in (path, path.with_name(path.name + "_data")):
        stale.unlink(missing_ok=True)
    if model.ByteSize() < TWO_GB:
        onnx.save(model, str(path))
        return [path.name]
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + "_data", size_threshold=1024)
    return [path.name, path.name + "_data"]
