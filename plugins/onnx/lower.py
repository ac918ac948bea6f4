"""Lowering to ONNX: the float graph, then each compressed weight's ops replaced by onnxruntime's.

- MatMul: `com.microsoft::MatMulNBits` (4- and 8-bit integer modes; accuracy_level 4 by default,
  onnxruntime's fast CPU path with int8-quantized activations), `com.microsoft::MatMulBnb4` for NF4,
  or with format "qdq" a standard opset-21 `DequantizeLinear` (int4/uint4 blocked, int8/uint8 per
  channel) feeding the MatMul, which onnxruntime fuses into MatMulNBits at load time. A per-channel
  8-bit weight with too few inputs for a MatMulNBits block (a rank-8 LoRA adapter) is always qdq.
- Gather (embeddings): `com.microsoft::GatherBlockQuantized` on the same packed bytes as
  MatMulNBits, so a tied embedding and lm_head store their codes once.
MXFP4 has no onnxruntime CPU kernel (nothing takes e8m0 scales) and is refused before any work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompiler.config import CompressionConfig, Mode
from qcompiler.errors import QCompilerError
from qcompiler.formats import LOW_BIT_FIX, refuse_float_zero_point, refuse_modes
from qcompiler.ir import Graph
from qcompiler.rewrites import rewritten_params
from qcompiler.plugins.onnx import layout
from qcompiler.plugins.onnx.export import OPSET
from qcompiler.plugins.onnx.onnxgraph import GraphIndex, WeightUse

MS_DOMAIN = "com.microsoft"
FORMATS = ("nbits", "qdq")
DQ_MODES = (Mode.INT4_SYM, Mode.INT4_ASYM, Mode.INT8_SYM, Mode.INT8_ASYM)  # what DequantizeLinear decodes


@dataclass(frozen=True)
class ONNXOptions:
    format: str = "nbits"  # MatMulNBits, or "qdq": standard DequantizeLinear -> MatMul
    accuracy_level: int | None = None  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 (default)

    @classmethod
    def from_dict(cls, options: dict) -> ONNXOptions:
        unknown = set(options) - {"format", "accuracy_level"}
        if unknown:
            raise QCompilerError(f"unknown ONNX backend options {sorted(unknown)}: use format and accuracy_level")
        o = cls(**options)
        if o.format not in FORMATS:
            raise QCompilerError(f"unknown ONNX format '{o.format}': choose nbits (MatMulNBits) or qdq")
        if o.format == "qdq" and o.accuracy_level is not None:
            raise QCompilerError("a qdq model carries no accuracy level (onnxruntime's session option "
                                 "session.qdq_matmulnbits_accuracy_level chooses it, default 4): drop "
                                 "--onnx-accuracy-level or use --onnx-format nbits")
        if o.accuracy_level is None:
            return dataclasses.replace(o, accuracy_level=4)
        if o.accuracy_level not in range(5):
            raise QCompilerError(f"accuracy level {o.accuracy_level} is not 0..4: use 4 (int8, fastest on CPU) or 0")
        return o


def check_config(config: CompressionConfig, options: ONNXOptions) -> None:
    """Refuse, before any work, a mode onnxruntime cannot run."""
    refuse_modes(config, "onnx", lambda spec: spec.bits in (4, 8), LOW_BIT_FIX)
    modes = {config.mode, config.backup_mode.mode} - {None}
    if Mode.MXFP4 in modes:
        raise QCompilerError(
            "mxfp4 has no onnxruntime CPU kernel (no matmul op takes e8m0 scales): use --backend openvino "
            "for mxfp4, or for ONNX a 4-bit mode such as int4_sym --group-size 32 or nf4"
        )
    if options.format == "qdq" and Mode.NF4 in modes:
        raise QCompilerError("nf4 has no standard DequantizeLinear type: drop --onnx-format qdq (nf4 is written "
                             "as MatMulBnb4) or use int4_sym / int4_asym")


def check_formats(graph: Graph, options: ONNXOptions) -> None:
    """The refusals `apply_weights` would give, from the assigned formats alone, before any expensive pass."""
    from qcompiler.quant import matrix_view

    for const, uses in graph.uses_by_weight().items():
        fmt = const.meta.get("format")
        if fmt is None:
            continue
        name = const.attrs["weight"]
        if any(use.op.op == "Gather" for use in uses):  # GatherBlockQuantized takes integer zero points only
            refuse_float_zero_point(const, "onnxruntime's GatherBlockQuantized (an embedding)",
                                    f"keep it float (--ignored-scope-name {const.attrs['weight']})")
        for use in uses:
            if use.op.op == "Gather" and fmt.mode is Mode.NF4:
                raise QCompilerError(f"NF4 embeddings have no onnxruntime kernel ({name}): leave them in backup "
                                     "precision (drop --all-layers) or ignore them (--ignored-scope-type)")
            if use.op.op not in ("MatMul", "Gather"):
                raise QCompilerError(f"compressed {use.op.op} weights have no onnxruntime kernel ({name}): ignore "
                                     "them (--ignored-scope-type) or use --backend openvino")
            if use.op.op == "MatMul" and graph.tensor(const).dim() > 2:  # batched experts: DequantizeLinear
                if fmt.mode not in DQ_MODES:
                    raise QCompilerError(f"onnxruntime has no DequantizeLinear for {fmt.mode} ({name}, batched "
                                         "mixture-of-experts weights): use int4 or int8, or --backend openvino")
                continue
            if fmt.mode is Mode.NF4 or (use.op.op == "MatMul" and options.format == "qdq"):
                continue
            k = matrix_view(graph.tensor(const), use.reduction_axes)[0].shape[1]
            if fmt.group_size == -1 and not (fmt.mode.bits == 8 and use.op.op == "MatMul"):
                layout.block_for(k, name)
            elif fmt.group_size != -1 and (fmt.group_size < layout.MIN_BLOCK or fmt.group_size & (fmt.group_size - 1)):
                raise QCompilerError(
                    f"group size {fmt.group_size} of {name} is not a power of two >= {layout.MIN_BLOCK}, which "
                    "onnxruntime's MatMulNBits needs: use --group-size 32, 64 or 128, or --backend openvino")


def apply_weights(model: onnx.ModelProto, graph: Graph, prefix: str, options: ONNXOptions, converted=(),
                  facts: dict | None = None) -> dict[str, int]:
    """Rewrite `model` in place with the graph's compressed weights; return bytes stored per weight.
    `converted` names rewritten parameters the model was exported with already (`qcompiler.rewrites`)."""
    index = GraphIndex(model.graph)
    edit = _Edit(model, index, options)
    stored: dict[str, int] = {}
    for const in graph.weight_constants():
        name = const.attrs["weight"]
        cw = const.meta.get("compressed")
        tensor_name = prefix + name
        tensor = index.tensor(tensor_name)
        if tensor is None:
            if cw is not None or const.meta.get("rewritten"):
                raise QCompilerError(f"weight {name} was not found in the ONNX model: its export renamed it; "
                                     "please report it with the model's name")
            stored[name] = graph.tensor(const).numel() * graph.tensor(const).element_size()
            continue
        if cw is None:
            if const.meta.get("rewritten"):
                edit.replace_tensor(tensor_name, graph.weight(const).float().numpy().astype(
                    helper.tensor_dtype_to_np_dtype(tensor.data_type)))
            stored[name] = _nbytes(tensor)
            continue
        uses = index.weight_uses(tensor_name)
        if not uses:
            raise QCompilerError(f"weight {name} feeds an op other than MatMul / Gather in the ONNX model, so it "
                                 "cannot be compressed there: add it to the ignored scope")
        stored[name] = edit.compress(tensor_name, tensor, uses, cw, const.meta.get("activation"))
    for const in rewritten_params(graph, set(stored) | set(converted)):  # a norm weight AWQ scaled, ...
        name = const.attrs["weight"]
        tensor = index.tensor(prefix + name)
        if tensor is None:
            raise QCompilerError(f"the rewritten weight {name} was not found in the ONNX model (the exporter folded "
                                 "it into another constant): use --backend torch, or report it")
        edit.replace_tensor(prefix + name, graph.weight(const).float().numpy().astype(
            helper.tensor_dtype_to_np_dtype(tensor.data_type)).reshape(tuple(tensor.dims)))
        stored[name] = _nbytes(tensor)
    edit.commit()
    if facts is not None and edit.activations_quantized:  # the IR weights whose MatMuls run on u8 activations
        facts["activations_quantized"] = [n[len(prefix):] for n in edit.activations_quantized]
    return stored


def _no_nbits_block(cw) -> bool:
    """A per-channel 8-bit weight whose K no power-of-two block >= 16 divides (a rank-8 LoRA adapter):
    MatMulNBits cannot hold it, a per-axis DequantizeLinear -> MatMul can."""
    k = cw.matrix_shape[1]
    return cw.mode.bits == 8 and cw.group_size == -1 and (k & -k) < layout.MIN_BLOCK


class _Edit:
    """Collects new nodes and initializers, then rewrites the graph once."""

    def __init__(self, model: onnx.ModelProto, index: GraphIndex, options: ONNXOptions) -> None:
        self.model, self.index, self.options = model, index, options
        self.replace: dict[int, list[onnx.NodeProto]] = {}
        self.drop_nodes: set[int] = set()
        self.drop_tensors: set[str] = set()
        self.new_initializers: list[onnx.TensorProto] = []
        self.need_ms_domain = False
        self.prepend: list[onnx.NodeProto] = []  # nodes producing a dropped initializer's name (run first)
        self.activations: dict[tuple, list[str]] = {}  # (input, range) -> the quantized input's names
        self.activations_quantized: list[str] = []
        self.after: dict[str, list[onnx.NodeProto]] = {}  # tensor -> nodes placed right after its producer
        self.drop_tensors_only: set[str] = set()  # initializers dropped whose name a new node produces

    def replace_tensor(self, name: str, array: np.ndarray) -> None:
        self.drop_tensors.add(name)
        self.new_initializers.append(numpy_helper.from_array(array, name))

    def compress(self, tname: str, tensor: onnx.TensorProto, uses: list[WeightUse], cw, activation=None) -> int:
        stored_before = len(self.new_initializers)
        if len(tensor.dims) > 2 and all(u.node.op_type == "MatMul" for u in uses):
            self._dequantize_in_place(tname, tensor, cw)  # batched MoE expert weights [experts, out, in]
            return sum(_nbytes(t) for t in self.new_initializers[stored_before:])
        shared: dict = {}
        for use in uses:
            op = use.node.op_type
            if op == "MatMul" and activation is not None:
                self._w8a8(tname, use, cw, activation)
            elif op == "MatMul" and cw.mode is Mode.NF4:
                self._bnb4(tname, use, cw)
            elif op == "MatMul" and (self.options.format == "qdq" or _no_nbits_block(cw)):
                self._qdq(tname, use, cw)
            elif op == "MatMul":
                self._nbits(tname, use, cw, shared)
            elif op == "Gather" and cw.mode is not Mode.NF4:
                self._gather(tname, use, cw, shared)
            else:
                what = "NF4 embeddings" if op == "Gather" else f"compressed {op} weights"
                raise QCompilerError(f"{what} have no onnxruntime kernel ({tname}): leave them in backup precision "
                                     "(drop --all-layers) or ignore them (--ignored-scope-type)")
            self.drop_nodes.update(id(n) for n in use.chain)
        self.drop_tensors.add(tname)
        return sum(_nbytes(t) for t in self.new_initializers[stored_before:])

    def _add(self, name: str, array: np.ndarray) -> str:
        self.new_initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def _blocks(self, tname: str, cw, shared: dict) -> tuple[layout.Blocks, str]:
        if "blocks" not in shared:
            blocks = layout.to_blocks(cw, tname)
            shared["blocks"] = blocks, self._add(f"{tname}_Q{blocks.bits}", blocks.data)
        return shared["blocks"]

    def _nbits(self, tname: str, use: WeightUse, cw, shared: dict) -> None:
        blocks, data = self._blocks(tname, cw, shared)
        inputs = [use.node.input[0], data, self._add(f"{tname}_scales", blocks.scale)]
        zp = blocks.packed_zero_point()
        if zp is not None:
            inputs.append(self._add(f"{tname}_zp", zp))
        node = helper.make_node(
            "MatMulNBits", inputs, list(use.node.output), name=f"{use.node.name}_Q{blocks.bits}", domain=MS_DOMAIN,
            K=blocks.k, N=blocks.n, bits=blocks.bits, block_size=blocks.block,
            accuracy_level=self.options.accuracy_level,
        )
        self._swap(use.node, [node])

    def _gather(self, tname: str, use: WeightUse, cw, shared: dict) -> None:
        blocks, data = self._blocks(tname, cw, shared)
        inputs = [data, use.node.input[1], self._add(f"{tname}_gather_scales", blocks.scale[..., None])]
        if blocks.zero_point is not None:
            inputs.append(self._add(f"{tname}_gather_zp", blocks.zero_point[..., None]))
        out, base = use.node.output[0], use.node.name or tname
        blocked, shape, k = f"{out}_blocks", f"{out}_shape", self._add(f"{tname}_K", np.array([blocks.k], np.int64))
        nodes = [
            helper.make_node("GatherBlockQuantized", inputs, [blocked], name=f"{base}_Q{blocks.bits}",
                             domain=MS_DOMAIN, gather_axis=0, quantize_axis=2, block_size=blocks.block,
                             bits=blocks.bits),
            helper.make_node("Shape", [use.node.input[1]], [f"{out}_indices_shape"], name=f"{base}_Q/shape"),
            helper.make_node("Concat", [f"{out}_indices_shape", k], [shape], name=f"{base}_Q/concat", axis=0),
            helper.make_node("Reshape", [blocked, shape], [out], name=f"{base}_Q/reshape"),
        ]
        self._swap(use.node, nodes)

    def _w8a8(self, tname: str, use: WeightUse, cw, aq) -> None:
        """An int8 x u8 MatMul: the activation quantized once per input tensor and range (static:
        QuantizeLinear on the calibration range; dynamic: DynamicQuantizeLinear), then
        MatMulIntegerToFloat (onnxruntime's u8 x s8 kernel, what its QDQ fusion produces); with
        --onnx-format qdq the standard QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear."""
        if cw.mode is not Mode.INT8_SYM or cw.group_size != -1:
            raise QCompilerError(f"activation quantization of {tname} needs int8_sym per-channel weights, not "
                                 f"{cw.mode} group {cw.group_size}")
        codes, scale, _, _ = layout.qdq(cw)  # [K, N] int8, [N]
        x, base = use.node.input[0], use.node.name or tname
        key = (x, aq)
        static_qdq = self.options.format == "qdq" and not aq.dynamic
        if key not in self.activations:
            name = f"{x}_u8_{len(self.activations)}"
            nodes = []
            if aq.smooth is not None:  # SmoothQuant's scale without a fold: x / s, then quantized
                inverse = self._add(f"{name}_smooth", (1.0 / np.asarray(aq.smooth, np.float64)).astype(np.float32))
                nodes.append(helper.make_node("Mul", [x, inverse], [f"{name}_smoothed"], name=f"{name}/smooth"))
            source = f"{name}_smoothed" if nodes else x
            if aq.dynamic:
                outs = [name, f"{name}_scale", f"{name}_zero_point"]
                nodes += [helper.make_node("DynamicQuantizeLinear", [source], outs, name=f"{name}/quantize")]
            else:
                s = self._add(f"{name}_scale", np.array(aq.scale, np.float32))
                z = self._add(f"{name}_zero_point", np.array(aq.zero_point, np.uint8))
                outs = [name, s, z]
                nodes += [helper.make_node("QuantizeLinear", [source, s, z], [name], name=f"{name}/quantize")]
                if static_qdq:
                    nodes.append(helper.make_node("DequantizeLinear", outs, [f"{name}_dq"], name=f"{name}/dequantize"))
                    outs = [f"{name}_dq"]
            self.activations[key] = outs
            self.prepend_after(x, nodes)
        outs = self.activations[key]
        w = self._add(f"{tname}_s8", codes.astype(np.int8))
        w_scale = self._add(f"{tname}_s8_scale", scale.astype(np.float32))
        if static_qdq:
            dq = f"{tname}_dequantized_{use.node.name}"
            nodes = [helper.make_node("DequantizeLinear", [w, w_scale], [dq], name=f"{base}_DQ", axis=1),
                     helper.make_node("MatMul", [outs[0], dq], list(use.node.output), name=base)]
        else:
            nodes = [helper.make_node("MatMulIntegerToFloat", [outs[0], w, outs[1], w_scale, outs[2]],
                                      list(use.node.output), name=f"{base}_W8A8", domain=MS_DOMAIN)]
        self.activations_quantized.append(tname)
        self._swap(use.node, nodes)

    def prepend_after(self, tensor: str, nodes: list[onnx.NodeProto]) -> None:
        """Nodes that read `tensor`, placed right after its producer (or first, for a graph input)."""
        self.after.setdefault(tensor, []).extend(nodes)
        self.need_ms_domain |= any(n.domain == MS_DOMAIN for n in nodes)

    def _bnb4(self, tname: str, use: WeightUse, cw) -> None:
        packed, absmax = layout.bnb4(cw)
        n, k = cw.matrix_shape
        inputs = [use.node.input[0], self._add(f"{tname}_nf4", packed), self._add(f"{tname}_absmax", absmax)]
        node = helper.make_node("MatMulBnb4", inputs, list(use.node.output), name=f"{use.node.name}_NF4",
                                domain=MS_DOMAIN, K=k, N=n, block_size=cw.group_size, quant_type=1)
        self._swap(use.node, [node])

    def _qdq(self, tname: str, use: WeightUse, cw) -> None:
        opset = self._opset()
        if opset < OPSET and cw.mode.bits == 4:
            raise QCompilerError(f"this ONNX model is opset {opset}; blocked int4 DequantizeLinear needs opset "
                                 f"{OPSET}: drop --onnx-format qdq (MatMulNBits works at any opset)")
        codes, scale, zp, axis = layout.qdq(cw)
        inputs = self._dq_inputs(tname, cw.mode, codes, scale, zp)
        attrs = {"axis": axis}
        if cw.group_size != -1:
            attrs["block_size"] = cw.group_size
        dq_out = f"{tname}_dequantized_{use.node.name}"
        nodes = [helper.make_node("DequantizeLinear", inputs, [dq_out], name=f"{use.node.name}_DQ", **attrs),
                 helper.make_node("MatMul", [use.node.input[0], dq_out], list(use.node.output), name=use.node.name)]
        self._swap(use.node, nodes)

    def _dequantize_in_place(self, tname: str, tensor: onnx.TensorProto, cw) -> None:
        """Batched expert weights [experts, out, in] (`cw` holds them as [experts * out, in]): a blocked
        DequantizeLinear along the input axis produces the float tensor under the initializer's own
        name, so the Transpose and batched MatMul reading it stay as exported (MatMulNBits takes 2-D
        weights only)."""
        if cw.mode not in DQ_MODES:
            raise QCompilerError(f"onnxruntime has no DequantizeLinear for {cw.mode} ({tname}): use int4 or int8, "
                                 "or --backend openvino")
        opset = self._opset()
        if opset < OPSET:
            raise QCompilerError(f"this ONNX model is opset {opset}; the blocked DequantizeLinear its batched expert "
                                 f"weights ({tname}) need is opset {OPSET}: re-export it at opset {OPSET}, or "
                                 "compress the transformers model")
        shape = tuple(cw.shape)
        rows = (*shape[:-2], shape[-1], shape[-2]) if cw.transposed else shape  # [..., out, in] as cw holds it
        k = rows[-1]
        block = k if cw.group_size == -1 else cw.group_size
        codes = cw.codes.numpy().reshape(rows)
        scale = cw.scale.numpy().astype(np.float16).reshape(*rows[:-1], k // block)  # f16 as stored; Cast after
        zp = None if cw.zero_point is None else cw.zero_point.numpy().reshape(*rows[:-1], k // block)
        if cw.transposed:  # the tensor is [..., in, out]: blocks along its axis -2
            codes, scale = np.ascontiguousarray(codes.swapaxes(-1, -2)), np.ascontiguousarray(scale.swapaxes(-1, -2))
            zp = None if zp is None else np.ascontiguousarray(zp.swapaxes(-1, -2))
        inputs = self._dq_inputs(tname, cw.mode, codes, scale, zp)
        self.prepend += [helper.make_node("DequantizeLinear", inputs, [f"{tname}_f16"], name=f"{tname}_DQ",
                                          axis=len(shape) - (2 if cw.transposed else 1), block_size=block),
                         helper.make_node("Cast", [f"{tname}_f16"], [tname], name=f"{tname}_DQ/cast",
                                          to=tensor.data_type)]  # the weight's own float type
        self.drop_tensors_only.add(tname)

    def _dq_inputs(self, tname: str, mode: Mode, codes: np.ndarray, scale: np.ndarray, zp) -> list[str]:
        """DequantizeLinear's inputs as new initializers: the codes (int4/uint4 packed, or int8/uint8,
        keeping the mode's signedness), the scale, and the zero point of asymmetric modes."""
        signed = not mode.asymmetric
        if mode.bits == 4:
            q = helper.make_tensor(f"{tname}_q4", TensorProto.INT4 if signed else TensorProto.UINT4, codes.shape,
                                   layout.pack_int4(codes), raw=True)
            self.new_initializers.append(q)
            inputs = [q.name, self._add(f"{tname}_scale", scale)]
            if zp is not None:
                z = helper.make_tensor(f"{tname}_zp4", TensorProto.UINT4, zp.shape, layout.pack_int4(zp), raw=True)
                self.new_initializers.append(z)
                inputs.append(z.name)
            return inputs
        inputs = [self._add(f"{tname}_q8", codes.astype(np.int8 if signed else np.uint8)),
                  self._add(f"{tname}_scale", scale)]
        if zp is not None:
            inputs.append(self._add(f"{tname}_zp8", zp.astype(np.uint8)))
        return inputs

    def _opset(self) -> int:
        return next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def _swap(self, old: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
        self.replace[id(old)] = new
        self.need_ms_domain |= any(n.domain == MS_DOMAIN for n in new)

    def commit(self) -> None:
        g = self.model.graph
        nodes = list(self.prepend)
        for name in [i.name for i in g.input] + [t.name for t in g.initializer]:
            nodes.extend(self.after.pop(name, []))
        for node in g.node:
            if id(node) in self.replace:
                nodes.extend(self.replace[id(node)])
            elif id(node) not in self.drop_nodes and not (
                node.op_type == "Constant" and node.output[0] in (self.drop_tensors | self.drop_tensors_only)
            ):
                nodes.append(node)
            for out in node.output:
                nodes.extend(self.after.pop(out, []))
        if self.after:
            raise QCompilerError(f"the ONNX tensor {next(iter(self.after))} that a quantized MatMul reads has no "
                                 "producer in the graph: please report it with the model's name")
        del g.node[:]
        g.node.extend(nodes)
        dropped = self.drop_tensors | self.drop_tensors_only
        kept = [t for t in g.initializer if t.name not in dropped]
        del g.initializer[:]
        g.initializer.extend(kept + self.new_initializers)
        if self.need_ms_domain and not any(o.domain == MS_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _nbytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return int(np.prod(tensor.dims)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
