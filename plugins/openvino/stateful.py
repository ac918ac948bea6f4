"""A transformers causal LM as a stateful OpenVINO model: the KV cache lives in OpenVINO state.

The layout is the one `optimum-cli export openvino --task text-generation-with-past` writes, so
optimum-intel's OVModelForCausalLM and openvino_genai's LLMPipeline run it:
inputs input_ids, attention_mask, position_ids [batch, seq] (i64) and beam_idx [batch] (i32);
output logits [batch, seq, vocab]; per layer two variables holding past keys and values
[batch, kv_heads, past, head_dim], read at the start of a call (reordered by beam_idx, zeros of
length 0 after a reset) and written with the new cache at its end.

The float graph is traced by OpenVINO's PyTorch frontend (`lower.torch_to_openvino`) through the
source's export module, whose forward takes the past as plain tensors and returns the present ones
(`Source.export_spec()`); when the source's blocks are alike, only four are traced and the rest
repeated (repeat.py).
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from qcompiler.plugins.openvino.lower import torch_to_openvino
from qcompiler.plugins.openvino.repeat import repeated
from qcompiler.protocols import ExportSpec


def convert_stateful(spec: ExportSpec, what: str, stateful: bool = True) -> ov.Model:
    """`spec`: a causal LM's export signature with its cache (`Source.export_spec()`). With
    `stateful=False`, the layout optimum-cli writes with --disable-stateful: the past keys and values
    are inputs (`past_key_values.N.key` / `.value`, [batch, kv_heads, past, head_dim]) and the new
    cache is output (`present.N.key` / `.value`), with no beam_idx."""
    token_inputs = len(spec.input_names) - len(spec.cache)
    shapes = [ov.PartialShape([-1, -1])] * token_inputs + [ov.PartialShape([-1, h, -1, d]) for h, d in spec.past_shapes]
    ov_model = repeated(spec.repeat, what) if spec.repeat is not None else None
    if ov_model is None:
        ov_model = torch_to_openvino(spec.module, spec.args, shapes, what)

    past_names, present_names = [p for p, _ in spec.cache], [p for _, p in spec.cache]
    for port, name in zip(ov_model.inputs, spec.input_names):
        port.get_tensor().set_names({name})
    for port, name in zip(ov_model.outputs, spec.output_names):
        port.get_tensor().set_names({name})
    if not stateful:
        _float_attention_masks(ov_model)
        return ov_model
    _add_beam_idx(ov_model, past_names)
    _float_attention_masks(ov_model)
    from openvino._offline_transformations import apply_make_stateful_transformation

    apply_make_stateful_transformation(ov_model, dict(zip(past_names, present_names)))
    _zero_initial_state(ov_model)
    return ov_model


def _add_beam_idx(ov_model: ov.Model, past_names: list[str]) -> None:
    """beam_idx [batch] selects, for each row of the new batch, the cache row it continues."""
    beam_idx = ops.parameter(ov.PartialShape([-1]), ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    ov_model.add_parameters([beam_idx])
    for name in past_names:
        port = ov_model.input(name)
        consumers = list(port.get_target_inputs())
        gathered = ops.gather(port, beam_idx, ops.constant(np.int64(0)))
        for consumer in consumers:
            consumer.replace_source_output(gathered.output(0))
    ov_model.validate_nodes_and_infer_types()


def _float_attention_masks(ov_model: ov.Model) -> None:
    """Boolean SDPA masks become additive f32 ones (0 / f32 min), as optimum's export has them: the CPU
    plugin's attention with a boolean mask took 1.1 s of a 2 s prefill of 512 tokens, 0.2 s with f32."""
    converted: dict[str, ov.Output] = {}
    for op in ov_model.get_ordered_ops():
        if op.get_type_name() != "ScaledDotProductAttention" or op.get_input_size() < 4:
            continue
        mask = op.input_value(3)
        if mask.get_element_type() != ov.Type.boolean:
            continue
        key = mask.get_node().get_name() + f":{mask.get_index()}"
        if key not in converted:
            lowest = np.float32(np.finfo(np.float32).min)
            converted[key] = ops.select(mask, ops.constant(np.float32(0.0)), ops.constant(lowest)).output(0)
        op.input(3).replace_source_output(converted[key])
    ov_model.validate_nodes_and_infer_types()


def _zero_initial_state(ov_model: ov.Model) -> None:
    """After a reset, each cache variable reads as zeros of shape [batch, kv_heads, 0, head_dim]."""
    batch = ops.gather(ops.shape_of(ov_model.input("input_ids"), output_type="i64"),
                       ops.constant(np.array([0], np.int64)), ops.constant(np.int64(0)))
    for op in ov_model.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        dims = [batch] + [ops.constant(np.array([d.get_min_length()], np.int64))
                          for d in list(op.get_output_partial_shape(0))[1:]]
        zeros = ops.broadcast(ops.constant(0.0, dtype=op.get_output_element_type(0)), ops.concat(dims, axis=0))
        op.set_arguments([zeros])
    ov_model.validate_nodes_and_infer_types()
