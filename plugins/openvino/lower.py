"""Lowering compressed weights into an OpenVINO model.

The float graph comes from OpenVINO's PyTorch frontend on the source module (weights shared, not
copied; `torch_to_openvino`). Each IR weight with codes replaces its OpenVINO Constant by the
decompression subgraph OpenVINO's CPU plugin fuses into its compressed FullyConnected / Gather kernels:

    Constant(codes: u8|i8|u4|i4|nf4|f4e2m1 [N, K/g, g]) -> Convert(f16)
      -> [Subtract(Convert(zero point u8|u4 [N, K/g, 1]))] -> Multiply(scale f16 | Convert(f8e8m0))
      -> [Reshape [N, K]] -> [Transpose] -> Convert(f32)

4-bit codes are packed two per byte, element 2i in the low nibble (OpenVINO's layout).
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import openvino as ov
import openvino.opset13 as ops
import torch

from qcompiler import memory
from qcompiler.config import Mode
from qcompiler.errors import QCompilerError, export_failed
from qcompiler.ir import Graph
from qcompiler.plugins.openvino.fuse import concatenate, fusable_groups, replace_with_split
from qcompiler.bitpack import pack_nibbles
from qcompiler.quant import CompressedWeight
from qcompiler.rewrites import rewritten_params

CODE_TYPES = {
    Mode.INT8_ASYM: ov.Type.u8, Mode.INT8_SYM: ov.Type.i8, Mode.INT4_ASYM: ov.Type.u4,
    Mode.INT4_SYM: ov.Type.i4, Mode.NF4: ov.Type.nf4, Mode.MXFP4: ov.Type.f4e2m1,
}


FUSE_ACTIVATED = False  # fuse MatMuls on u8 activations too (for measuring what apart costs or saves)


def convert(source, stateful: bool = True) -> tuple[ov.Model, str]:
    """The float OpenVINO model, and the prefix its weight constants carry before the IR's names.

    A causal LM becomes a stateful model with its KV cache (see stateful.py; `stateful=False`: the
    cache as inputs and outputs); an encoder takes its export signature (encoder.py's, through the
    source's `export_spec()`); any other module is converted as it is, with the activations' last
    dimension static so its MatMuls fuse.
    """
    if source.is_causal_lm:
        from qcompiler.plugins.openvino.stateful import convert_stateful

        spec = source.export_spec()
        return convert_stateful(spec, type(source.model).__name__, stateful), spec.weight_prefix
    if getattr(source, "is_encoder", False):  # named inputs and output, batch and sequence dynamic (optimum's layout)
        spec = source.export_spec()
        shapes = [ov.PartialShape([-1] * t.dim()) for t in spec.args]
        model = torch_to_openvino(spec.module, dict(zip(spec.input_names, spec.args)), shapes,
                                  type(source.model).__name__)
        for port, name in zip(model.inputs, spec.input_names):
            port.get_tensor().set_names({name})
        for port, name in zip(model.outputs, spec.output_names):
            port.get_tensor().set_names({name})
        return model, spec.weight_prefix
    example = source.example_input
    shapes = [ov.PartialShape([-1] * (t.dim() - 1) + [t.shape[-1]]) for t in example.values()]
    return torch_to_openvino(source.model, example, shapes, type(source.model).__name__), ""


def torch_to_openvino(module, example, shapes: list, what: str) -> ov.Model:
    """What `openvino.convert_model(module, example_input=example, input=shapes)` returns, in half its
    time: the module is traced once, without TorchScript's trace check (a second and third forward,
    5 s of 16 on SmolLM2), and the input shapes are set on the frontend's places before conversion
    instead of by a pre-/post-processing step that re-infers every shape (1.7 s); then the same
    MOC transformations the converter applies."""
    from openvino._offline_transformations import (apply_fused_names_cleanup, apply_moc_transformations,
                                                   compress_quantize_weights_transformation)
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    no_telemetry()
    try:
        with torch.no_grad():
            decoder = TorchScriptPythonDecoder(module, example_input=example, trace_kwargs={"check_trace": False})
        frontend = FrontEndManager().load_by_framework("pytorch")
        model_input = frontend.load(decoder)
        for index, shape in enumerate(shapes):
            model_input.set_partial_shape(model_input.get_place_by_input_index(index), shape)
        model = frontend.convert(model_input)
        apply_moc_transformations(model, cf=False, smart_reshape=True)
        compress_quantize_weights_transformation(model)
        apply_fused_names_cleanup(model)
    except Exception as exc:  # TorchScript tracing and OpenVINO's op conversion raise their own types
        raise export_failed("OpenVINO", what, exc) from None
    return model


def no_telemetry() -> None:
    """The converter's telemetry becomes its own no-op stub (see the note in this plugin's __init__),
    also in a process that imported openvino_telemetry before qcompiler's plugins loaded."""
    from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils

    telemetry_utils.tm = convert_impl.tm = telemetry_stub


def apply_weights(model: ov.Model, graph: Graph, keep: list, prefix: str = "", consts: dict | None = None,
                  converted=(), fused: dict | None = None) -> dict[str, int]:
    """Replace rewritten weights in `model`; return bytes stored per IR weight. The new constants
    share memory with the arrays appended to `keep`: hold it until the model is saved. `consts` maps
    IR weight names to the model's Constants; by default they are found by name. `converted` names
    rewritten parameters the model was converted with already (see `qcompiler.rewrites`); `fused`, when
    given, receives the name of each fused group's codes Constant -> the IR weights in it."""
    consts = consts if consts is not None else _constants_by_name(model, "self." + prefix)
    compressed = {c.attrs["weight"]: c.meta["compressed"] for c in graph.weight_constants() if "compressed" in c.meta}
    missing = [name for name in compressed if name not in consts]
    missing += [c.attrs["weight"] for c in graph.weight_constants() if c.attrs["weight"] not in consts
                and (c.meta.get("rewritten") or c.attrs["weight"] in graph.placeholders)]
    folded = _folded_transposes(model, graph, missing)
    for name, const in folded.items():  # the converter stored W.T under a new name: decode straight to it
        consts[name] = const
        if name in compressed:
            cw = compressed[name]
            compressed[name] = dataclasses.replace(cw, transposed=False, shape=cw.matrix_shape)
    missing = [name for name in missing if name not in folded]
    if missing:
        raise QCompilerError(
            f"weight {missing[0]} was not found in the converted OpenVINO model: this model's conversion "
            "renames its weights; please report it with the model's name"
        )
    stored: dict[str, int] = {}
    by_name = {c.attrs["weight"]: c for c in graph.weight_constants()}
    release = bool(graph.placeholders)  # a lazily loaded model: drop each weight's codes once packed
    packs = 0

    def packed(names: list[str]) -> None:
        nonlocal packs
        if release:
            for name in names:
                by_name[name].meta.pop("compressed", None)
            graph.released = "the codes were packed into the OpenVINO model and dropped from the IR"
            packs += 1
            if packs % 4 == 0:
                memory.trim()  # the freed codes are heap blocks the C library would keep

    # weights whose MatMuls take u8 activations stay apart: their int8 kernels gain nothing from one wide
    # FullyConnected and a split (benchmarks/w8a8_fusion.py: fused took 1.06-1.08x the time on MiniLM,
    # 1.07-1.09x on SmolLM2's prefill)
    activated = {c.attrs["weight"] for c in graph.weight_constants() if "activation" in c.meta and not FUSE_ACTIVATED}
    for group in fusable_groups({n: consts[n] for n in compressed if n not in activated}, compressed):
        names = [name for name, _ in group]
        weights = [compressed.pop(name) for name in names]
        out, _ = _decompression(concatenate(weights), f"{names[0]}/fused", consts[names[0]].get_element_type(), keep)
        if fused is not None:
            fused[f"{names[0]}/fused"] = names
        replace_with_split([matmul for _, matmul in group], out, f"{group[0][1].get_friendly_name()}/fused")
        for name, cw in zip(names, weights):
            stored[name] = -(-cw.storage_bits() // 8)
        del weights
        packed(names)
    for const in graph.weight_constants():
        name = const.attrs["weight"]
        if name in stored:
            continue
        cw: CompressedWeight | None = compressed.pop(name, None)
        if cw is None and not const.meta.get("rewritten") and name not in graph.placeholders:
            stored[name] = graph.tensor(const).numel() * graph.tensor(const).element_size()
            continue
        target = consts[name]
        if cw is None:  # a rewritten float weight, or a placeholder's values read now
            tensor = graph.weight(const)
            tensor = tensor.t() if name in folded else tensor
            new_output, nbytes = _float_constant(tensor.float().contiguous().numpy(), name), tensor.numel() * 4
        else:
            new_output, nbytes = _decompression(cw, name, target.get_element_type(), keep)
            cw = None
            packed([name])
        for target_input in list(target.output(0).get_target_inputs()):
            target_input.replace_source_output(new_output)
        stored[name] = nbytes
    for const in rewritten_params(graph, set(stored) | set(converted)):  # a norm weight AWQ scaled, ...
        name = const.attrs["weight"]
        target = consts.get(name)
        if target is None:
            raise QCompilerError(f"the rewritten weight {name} was not found in the converted OpenVINO model (the "
                                 "converter folded it into another constant): use --backend torch, or report it")
        values = graph.weight(const).float().numpy()
        if tuple(target.get_output_shape(0)) != values.shape:
            values = values.reshape(tuple(target.get_output_shape(0)))
        new_output = ops.constant(values.astype(target.get_element_type().to_dtype())).output(0)
        new_output.get_node().set_friendly_name(target.get_friendly_name())
        for target_input in list(target.output(0).get_target_inputs()):
            target_input.replace_source_output(new_output)
        stored[name] = values.nbytes
    model.validate_nodes_and_infer_types()
    return stored


def insert_activation_quantizers(model: ov.Model, graph: Graph, fused: dict) -> list[str]:
    """A FakeQuantize (256 levels, the static u8 range of `meta["activation"]`) on the activation input
    of each MatMul whose weight has one (after a Multiply by 1 / s where it carries SmoothQuant's scale),
    shared by MatMuls that read the same tensor on the same quantizer;
    OpenVINO's CPU plugin then runs u8 x i8 FullyConnected kernels. A fused group (q/k/v in one MatMul)
    is quantized when all its weights have the same range, else left float. Returns the IR weights
    whose MatMuls were quantized."""
    wanted = {c.attrs["weight"]: c.meta["activation"] for c in graph.weight_constants() if "activation" in c.meta}
    if not wanted:
        return []
    if any(aq.dynamic for aq in wanted.values()):
        raise QCompilerError("OpenVINO has no dynamic activation quantization for int8 weights: use --quant-mode int8 "
                             "(static, with --dataset) or --backend onnx")
    shared: dict = {}
    done: list[str] = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        node = op.input_value(1).get_node()
        while node.get_type_name() in ("Convert", "Multiply", "Subtract", "Reshape", "Transpose"):
            node = node.input_value(0).get_node()
        if node.get_type_name() != "Constant":
            continue
        names = fused.get(node.get_friendly_name(), [node.get_friendly_name()])
        quants = {wanted.get(n) for n in names}
        if len(quants) != 1 or None in quants:
            continue
        aq = quants.pop()
        source = op.input_value(0)
        key = (source.get_node().get_friendly_name(), source.get_index(), aq)
        if key not in shared:
            if aq.smooth is not None:  # SmoothQuant's scale without a fold: x / s, then quantized (NNCF's form)
                kind = source.get_element_type().to_dtype()
                inverse = ops.constant((1.0 / np.asarray(aq.smooth, np.float64)).astype(kind))
                source = ops.multiply(source, inverse, name=f"{names[0]}/activation/smooth").output(0)
            shared[key] = _fake_quantize(source, aq, f"{names[0]}/activation/fq")
        op.input(0).replace_source_output(shared[key])
        done += names
    model.validate_nodes_and_infer_types()
    return done


def _fake_quantize(source, aq, name: str):
    """A FakeQuantize of 256 levels on `aq`'s static range [low, high] (its output, to connect)."""
    kind = source.get_element_type().to_dtype()
    low, high = ops.constant(np.array(aq.low, kind)), ops.constant(np.array(aq.high, kind))
    return ops.fake_quantize(source, low, high, low, high, 256, name=name).output(0)


def insert_attention_quantizers(model: ov.Model, graph: Graph) -> list[str]:
    """A FakeQuantize (256 levels, the static i8 ranges of `meta["attention_quant"]`) on the query and key
    of each ScaledDotProductAttention whose IR node has them; OpenVINO's CPU plugin then computes the
    scores in int8. The OpenVINO op is the one whose name starts with the IR node's module path (convert_model
    names ops `__module.<prefix><path>/aten::...`). Returns the IR nodes lowered."""
    wanted = {n.name.split("/")[0]: n for n in graph.nodes if "attention_quant" in n.meta}
    if not wanted:
        return []
    done = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "ScaledDotProductAttention":
            continue
        module = op.get_friendly_name().split("/")[0]
        path = next((p for p in wanted if module == p or module.endswith("." + p)), None)
        if path is None:
            continue
        node = wanted.pop(path)
        for index, aq in enumerate(node.meta["attention_quant"]):
            # before the heads' Reshape / Transpose (a per-tensor quantizer commutes with them), where NNCF puts
            # it: the CPU plugin then moves u8 through them into its int8 attention (measured: after them, the
            # FakeQuantize runs on its own)
            target = op.input(index)
            while (target.get_source_output().get_node().get_type_name() in ("Reshape", "Transpose")
                   and len(target.get_source_output().get_target_inputs()) == 1):
                target = target.get_source_output().get_node().input(0)
            target.replace_source_output(_fake_quantize(target.get_source_output(), aq, f"{path}/attention/fq{index}"))
        done.append(node.name)
    model.validate_nodes_and_infer_types()
    return done


def _folded_transposes(model: ov.Model, graph: Graph, names: list[str]) -> dict[str, ov.Node]:
    """For IR weights W [K, N] read as `x @ W` (GPT-2's Conv1D), the Constants holding W.T that
    convert_model folded from a Transpose (losing W's name), found by content."""
    wanted = {}
    for const in graph.weight_constants():
        name = const.attrs["weight"]
        if name in names and graph.tensor(const).dim() == 2:
            tensor = graph.weight(const)
            wanted.setdefault((tuple(tensor.shape[::-1]), _digest(tensor.t())), []).append(name)
    if not wanted:
        return {}
    found = {}
    for op in model.get_ops():
        if op.get_type_name() != "Constant" or op.get_output_partial_shape(0).rank.get_length() != 2:
            continue
        shape = tuple(op.get_output_shape(0))
        if any(key[0] == shape for key in wanted):
            key = (shape, _digest(torch.from_numpy(op.get_data().astype(np.float32))))
            for name in wanted.get(key, []):
                found.setdefault(name, op)
    return found


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.float().contiguous().numpy().tobytes()).hexdigest()


def _constants_by_name(model: ov.Model, prefix: str) -> dict[str, ov.Node]:
    out = {}
    for op in model.get_ops():
        if op.get_type_name() == "Constant":
            name = op.get_friendly_name()
            out[name[len(prefix):] if name.startswith(prefix) else name] = op
    return out


def _float_constant(array: np.ndarray, name: str):
    node = ops.constant(array)
    node.set_friendly_name(name)
    return node.output(0)


def _decompression(cw: CompressedWeight, name: str, out_type: ov.Type, keep: list):
    codes = _constant(cw.codes, CODE_TYPES[cw.mode], name, keep)
    w = ops.convert(codes, ov.Type.f16)
    nbytes = codes.get_byte_size()
    if cw.zero_point is not None and cw.zero_point.is_floating_point():  # a float zero point (GGUF q4_1 / q4_k)
        zp = ops.constant(np.ascontiguousarray(cw.zero_point.half().numpy()), name=f"{name}/zero_point")
        w = ops.subtract(w, zp, name=f"{name}/zero_point/subtract")
        nbytes += zp.get_byte_size()
    elif cw.zero_point is not None:
        zp_type = ov.Type.u8 if cw.mode.bits == 8 else ov.Type.u4
        zp = _constant(cw.zero_point, zp_type, f"{name}/zero_point", keep)
        w = ops.subtract(w, ops.convert(zp, ov.Type.f16), name=f"{name}/zero_point/subtract")
        nbytes += zp.get_byte_size()
    if cw.mode is Mode.MXFP4:
        scale = _constant(cw.scale, ov.Type.f8e8m0, f"{name}/scale", keep)
        w = ops.multiply(w, ops.convert(scale, ov.Type.f16), name=f"{name}/fq_weights_1")
    else:
        scale = ops.constant(np.ascontiguousarray(cw.scale.numpy()), name=f"{name}/scale")  # OV reads a strided f16 array as int16
        w = ops.multiply(w, scale, name=f"{name}/fq_weights_1")
    nbytes += scale.get_byte_size()
    n, k = cw.matrix_shape
    if cw.codes.dim() == 3:
        w = ops.reshape(w, ops.constant(np.array([n, k], dtype=np.int64)), special_zero=False)
    if cw.transposed and len(cw.shape) > 2:  # batched [..., in, out] weights (MoE experts): the last two swapped
        batched = [*cw.shape[:-2], cw.shape[-1], cw.shape[-2]]
        w = ops.reshape(w, ops.constant(np.array(batched, dtype=np.int64)), special_zero=False)
        perm = [*range(len(batched) - 2), len(batched) - 1, len(batched) - 2]
        w = ops.transpose(w, ops.constant(np.array(perm, dtype=np.int64)))
    elif cw.transposed:
        w = ops.transpose(w, ops.constant(np.array([1, 0], dtype=np.int64)))
    elif tuple(cw.shape) != (n, k):
        w = ops.reshape(w, ops.constant(np.array(cw.shape, dtype=np.int64)), special_zero=False)
    if out_type != ov.Type.f16:
        w = ops.convert(w, out_type, name=f"{name}/fq_weights_1/convert")
    return w.output(0), nbytes


def _constant(values, element_type: ov.Type, name: str, keep: list) -> ov.Node:
    """A Constant of `element_type` holding the integer codes in torch tensor `values`, one per element.

    4-bit codes are packed two per byte (`bitpack.pack_nibbles`); the bytes are shared with the
    Constant, not copied, and `keep` holds them until the model is saved.
    """
    raw = pack_nibbles(values) if element_type.bitwidth == 4 else values.contiguous().view(torch.uint8).reshape(-1)
    array = raw.numpy()
    keep.append(array)
    node = ops.constant(ov.Tensor(array, ov.Shape(list(values.shape)), element_type), shared_memory=True)
    node.set_friendly_name(name)
    return node
