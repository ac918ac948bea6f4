"""The float ONNX model of a torch source, and writing a model (external data over 2 GB)."""

from __future__ import annotations

from pathlib import Path

import onnx

OPSET = 21  # the first with int4/uint4 and blocked DequantizeLinear
TWO_GB = 2**31 - 1


def export_float(source, path: Path) -> tuple[onnx.ModelProto, str]:
    """The float ONNX model of a torch source, and the prefix its initializers carry before IR names.

    A causal LM is exported with its KV cache as inputs and outputs in optimum's ORTModelForCausalLM
    layout. Constant folding is off so initializers keep the module's names (MatMuls read them
    through a Transpose, which the lowering removes); onnxruntime folds what is left at load time.
    """
    import torch

    if source.is_causal_lm:
        from qcompiler.plugins.torch.kvcache import KVCacheForward, example, io_names

        past, present = io_names(source.model.config)
        names = ["input_ids", "attention_mask", "position_ids"]
        dynamic = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "total"},
                   "position_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
        dynamic.update({n: {0: "batch", 2: "past"} for n in past})
        dynamic.update({n: {0: "batch", 2: "total"} for n in present})
        module, args, prefix = KVCacheForward(source.model), example(source.model.config), "model."
        inputs, outputs = names + past, ["logits"] + present
    else:
        module, args, prefix = source.model, tuple(source.example_input.values()), ""
        inputs, outputs = list(source.example_input), None
        dynamic = {n: {d: f"{n}_{d}" for d in range(t.dim() - 1)} for n, t in source.example_input.items()}
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=False, input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=False)
    return onnx.load(str(path)), prefix


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
