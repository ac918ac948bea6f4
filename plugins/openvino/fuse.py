"""Compressed MatMuls that read the same activation (q/k/v, gate/up) become one MatMul and a split.

On an AVX2 CPU without VNNI, OpenVINO decompresses 4-bit weights to f32 inside its FullyConnected
kernel, and a small layer (SmolLM2's 576 x 192 k/v projections) is dominated by per-call cost:
one FullyConnected over the concatenated weights [N1 + N2 + ..., K] and a VariadicSplit of its
output compute the same numbers and made decoding 5-8% faster (float layers gain nothing and are
left alone). Weights are concatenated along the output channels, so each keeps its own codes,
scales and zero points bit for bit; only weights of one format, group size and width fuse.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import torch

from qcompiler.quant import CompressedWeight


def fusable_groups(targets: dict[str, ov.Node], compressed: dict[str, CompressedWeight]) -> list[list[tuple]]:
    """Groups of (weight name, MatMul) with the same activation input and compatible weights."""
    groups: dict[tuple, list[tuple]] = {}
    for name, const in targets.items():
        cw = compressed.get(name)
        consumers = list(const.output(0).get_target_inputs())
        if cw is None or cw.transposed or len(cw.shape) != 2 or len(consumers) != 1:
            continue
        matmul = consumers[0].get_node()
        if (matmul.get_type_name() != "MatMul" or consumers[0].get_index() != 1
                or not matmul.get_attributes().get("transpose_b") or matmul.get_attributes().get("transpose_a")):
            continue
        x = matmul.input_value(0)
        key = (x.get_node().get_name(), x.get_index(), cw.mode, cw.group_size, cw.matrix_shape[1],
               cw.zero_point is None, const.get_element_type().get_type_name())
        groups.setdefault(key, []).append((name, matmul))
    return [g for g in groups.values() if len(g) > 1]


def concatenate(weights: list[CompressedWeight]) -> CompressedWeight:
    first = weights[0]
    zero_point = None if first.zero_point is None else torch.cat([w.zero_point for w in weights])
    codes = torch.cat([w.codes for w in weights])
    return CompressedWeight(first.mode, first.group_size, codes, torch.cat([w.scale for w in weights]), zero_point,
                            (codes.shape[0], first.matrix_shape[1]))


def replace_with_split(matmuls: list[ov.Node], weight: ov.Output, name: str) -> None:
    """One MatMul of the shared input by `weight`, split back into each MatMul's output."""
    widths = [m.get_output_partial_shape(0)[-1].get_length() for m in matmuls]
    fused = ops.matmul(matmuls[0].input_value(0), weight, transpose_a=False, transpose_b=True, name=name)
    split = ops.variadic_split(fused, ops.constant(np.int64(-1)), ops.constant(np.array(widths, np.int64)),
                               name=f"{name}/split")
    for i, matmul in enumerate(matmuls):
        for target in list(matmul.output(0).get_target_inputs()):
            target.replace_source_output(split.output(i))
