"""Checkpoint formats other tools load: GPTQ (v1, v2), auto_round, AWQ (GEMM) and compressed-tensors.

Each is a backend that writes a transformers folder -- `config.json` with the format's
`quantization_config`, `model.safetensors`, the tokenizer and generation config -- from the IR's
integer codes, scales and zero points as the passes left them, without quantizing again
(`layouts.encode`). Float tensors keep the model's dtype (auto-round and llm-compressor do the
same; GPTQ exporters that force float16 change what the model computes: SmolLM2's 20 greedy tokens
of the demo prompt then differ from the OpenVINO artifact's of the same codes after 12).

What a checkpoint holds: one quantization scheme (bits, symmetric or not, group size) for the
Linears it quantizes, the scheme of the most parameters among the compressed Linear weights. A
weight the format cannot hold as codes -- an embedding, a Linear in another format (the int8
backup of lm_head), a weight read by something other than one nn.Linear -- is written in float
with its decoded values (so the checkpoint computes what every other artifact of the same codes
computes), named in the format's list of modules not to convert, and listed in the report
("stored_float") with the reason. A mode no layout of the format can hold (NF4 in GPTQ, 3-bit in
AWQ) is refused before any work, naming the formats that can.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch

from qcompiler import __version__
from qcompiler.errors import QCompilerError
from qcompiler.hookspecs import hookimpl
from qcompiler.plugins.checkpoints import layouts, read
from qcompiler.quant import CompressedWeight
from qcompiler.runners import TransformersRunner

WEIGHTS = "model.safetensors"
AUTO_ROUND = "auto_round"
QUANTIZER = f"qcompiler:{__version__}"


class CheckpointBackend:
    """One checkpoint format (`fmt`, a `layouts` name) under the `--format` name `name`."""

    lowers_epilogues = False

    def __init__(self, name: str, fmt: str, bits: tuple[int, ...], holds: str) -> None:
        self.name, self.fmt, self.bits, self.holds = name, fmt, bits, holds

    def _held(self, spec) -> bool:
        if self.fmt == AUTO_ROUND and spec.asymmetric:
            return spec.integer and spec.bits == 4
        return spec.integer and spec.bits in self.bits

    def check(self, config, options: dict) -> None:
        if options:
            raise QCompilerError(f"the {self.name} format takes no backend options ({', '.join(options)}): drop them")
        if config is None:
            return
        if config.mode is None:
            if config.int8_above is None and not config.keep:  # fp32: nothing for the format's quantized layers to hold
                raise QCompilerError(f"the {self.name} format stores quantized weights, and fp32 compresses none: "
                                     "pass --weight-format int4 (or int8), or use --format openvino for a float model")
            return
        if not self._held(config.mode.spec):  # the backup format is stored in float where it is not held
            raise QCompilerError(f"the {self.name} format cannot store {config.mode} weights: {self.name} holds "
                                 f"{self.holds}; nf4 and mxfp4 go to --format openvino (or onnx)")
        if self.layout(config.mode) == layouts.AWQ and config.effective_group_size == -1:
            raise QCompilerError("awq stores groups of input channels, not one scale per output channel: pass "
                                 "--group-size 32, 64 or 128, or use --format gptq / compressed-tensors")

    def check_formats(self, graph, options: dict | None = None) -> None:
        """Right after precision assignment: the Linears of the checkpoint's scheme fit its layout."""
        plan = _plan(graph, self)
        for name, (n, k) in plan.shapes:
            if self.layout(plan.scheme[0]) == layouts.AWQ and n % 8:
                raise QCompilerError(f"awq packs 8 output channels per word; {name} has {n}: use --format gptq "
                                     "or compressed-tensors")

    def lower(self, graph, source, out_dir: Path, options: dict | None = None) -> dict:
        from safetensors.torch import save_file

        self.check(None, options or {})
        model = getattr(source, "model", None)
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise QCompilerError(f"the {self.name} format writes transformers models; this input is a "
                                 f"{type(model).__name__}: use --format openvino or onnx")
        plan = _plan(graph, self)
        if plan.scheme is None:
            raise QCompilerError(f"no Linear weight is compressed in a format {self.name} holds, so the checkpoint "
                                 "would be a float model: compress with --weight-format int4 (or int8)")
        tensors, weight_bytes = {}, {}
        layout = self.layout(plan.scheme[0])
        for path, (name, cw) in plan.linears.items():
            stored = layouts.encode(layout, cw, name)
            if self.fmt == AUTO_ROUND:
                stored.pop("g_idx", None)  # auto-round's own exporter writes none
            for suffix, value in stored.items():
                tensors[f"{path}.{suffix}"] = value.contiguous()
            weight_bytes[name] = sum(t.numel() * t.element_size() for t in stored.values())
        quantized = {f"{path}.weight" for path in plan.linears}
        state = model.state_dict()
        names_by_ptr: dict[int, list[str]] = {}
        for key, t in state.items():
            names_by_ptr.setdefault(t.data_ptr(), []).append(key)
        seen = set()
        for key, t in state.items():  # float tensors, each once (a tied weight has two names)
            aliases = names_by_ptr[t.data_ptr()]
            if key in quantized or t.data_ptr() in seen:
                continue
            if any(a in quantized for a in aliases):
                raise QCompilerError(f"{key} is shared with a quantized Linear ({', '.join(aliases)}): the "
                                     f"{self.name} format cannot store one tensor both ways; ignore it "
                                     "(--ignored-scope-name) or use --format openvino")
            seen.add(t.data_ptr())
            ir_name = next((a for a in aliases if a in plan.decoded), None)
            value = plan.decoded[ir_name] if ir_name else graph.weights.get(key, t).detach()
            tensors[key] = value.contiguous()
            weight_bytes[ir_name or key] = value.numel() * value.element_size()
        save_file(tensors, str(out_dir / WEIGHTS), metadata={"format": "pt"})
        qconfig = _quantization_config(self, plan, model)
        files = [WEIGHTS]
        side = {layouts.GPTQ: "quantize_config.json", layouts.GPTQ_V2: "quantize_config.json",
                AUTO_ROUND: "quantization_config.json"}.get(self.fmt)
        if side:  # GPTQModel and auto-round also read the config from here
            (out_dir / side).write_text(json.dumps(qconfig, indent=2))
            files.append(side)
        return {"files": files, "weight_bytes": weight_bytes, "config_json": {"quantization_config": qconfig},
                "stored_float": plan.stored_float}

    def layout(self, mode) -> str:
        """The `layouts` name this format stores `mode` in (auto_round: GPTQ's for symmetric grids,
        AWQ's for asymmetric 4-bit ones, as auto-round's `auto_round:auto_gptq` / `auto_round:auto_awq`)."""
        if self.fmt != AUTO_ROUND:
            return self.fmt
        return layouts.AWQ if mode.asymmetric else layouts.GPTQ

    def can_load(self, path: Path) -> bool:
        """A checkpoint of this format, whoever wrote it (`qcompiler eval` reads it decoded)."""
        try:
            scheme = read.scheme_of(Path(path))
        except QCompilerError:
            return False
        return scheme is not None and scheme.format == self.name

    def runner(self, path: Path):
        return TransformersRunner(read.load_decoded(path))



class _Plan:
    """Which IR weights the checkpoint stores as codes (`linears`: module path -> (IR name, weight)),
    and which in float with their decoded values (`decoded`: IR name -> tensor; `stored_float`: the
    report's list with the reasons)."""

    def __init__(self) -> None:
        self.scheme = None
        self.linears: dict[str, tuple[str, CompressedWeight]] = {}
        self.decoded: dict[str, torch.Tensor] = {}
        self.stored_float: list[dict] = []
        self.shapes: list[tuple[str, tuple[int, int]]] = []  # the scheme's weights, known before any is compressed


def _plan(graph, backend: CheckpointBackend) -> _Plan:
    """Group the compressed weights: the scheme's Linears become codes, the rest float."""
    plan = _Plan()
    candidates, others = [], []
    for const, uses in graph.uses_by_weight().items():
        name = const.attrs["weight"]
        cw = const.meta.get("compressed")
        fmt = const.meta.get("format")
        if fmt is None:
            continue
        linears = [u for u in uses if u.op.op == "MatMul"]
        reason = None
        if len(uses) != 1 or len(linears) != 1:
            reason = "read by more than one op (a tied embedding and lm_head)" if len(uses) > 1 else \
                f"an embedding ({uses[0].op.op})" if uses[0].op.op == "Gather" else f"read by {uses[0].op.op}"
        elif graph.tensor(const).dim() != 2 or tuple(linears[0].reduction_axes) != (1,) or not name.endswith(".weight"):
            reason = "not an nn.Linear weight [out, in]"
        elif not backend._held(fmt.mode.spec):
            reason = f"{fmt.mode} is not a format {backend.name} holds"
        if reason is None:
            candidates.append((const, fmt, linears[0], name))
        else:
            others.append((const, fmt, name, reason))
    counts = Counter()
    for const, fmt, _, _ in candidates:
        counts[(fmt.mode, fmt.group_size)] += graph.tensor(const).numel()
    plan.scheme = counts.most_common(1)[0][0] if counts else None
    for const, fmt, use, name in candidates:
        if (fmt.mode, fmt.group_size) == plan.scheme:
            n, k = graph.tensor(const).shape
            plan.shapes.append((name, (n, k)))
            cw = const.meta.get("compressed")
            if cw is not None:
                plan.linears[name[: -len(".weight")]] = (name, cw)
        else:
            others.append((const, fmt, name, f"{fmt} differs from the checkpoint's scheme "
                                              f"{plan.scheme[0]}/g{plan.scheme[1]}"))
    for const, fmt, name, reason in others:
        plan.stored_float.append({"weight": name, "format": str(fmt), "reason": reason})
        cw = const.meta.get("compressed")
        if cw is not None:
            plan.decoded[name] = cw.dequantize().to(graph.tensor(const).dtype)
    return plan


def _quantization_config(backend: CheckpointBackend, plan: _Plan, model) -> dict:
    mode, group = plan.scheme
    quantized = set(plan.linears)
    float_linears = sorted(path for path, m in model.named_modules()
                           if isinstance(m, torch.nn.Linear) and path not in quantized)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_path = next((path for path, m in model.named_modules() if m is head), None)
    in_blocks = [path for path in float_linears if path != head_path]  # lm_head has its own switch in GPTQ
    common = {"qcompiler_format": backend.name, "provider": QUANTIZER}
    sym = not mode.asymmetric
    if backend.fmt in (layouts.GPTQ, layouts.GPTQ_V2):
        version = "gptq" if backend.fmt == layouts.GPTQ else "gptq_v2"
        config = {"quant_method": "gptq", "bits": mode.bits, "group_size": group, "sym": sym, "desc_act": False,
                  "true_sequential": True, "damp_percent": 0.1, "static_groups": False, "format": version,
                  "checkpoint_format": version, "lm_head": head_path in quantized, "meta": {"quantizer": [QUANTIZER]}}
        if in_blocks:  # GPTQModel's per-module overrides: "-:" leaves a module unquantized
            config["dynamic"] = {f"-:^{re.escape(path)}$": {} for path in in_blocks}
        return {**config, **common}
    if backend.fmt == layouts.AWQ:
        return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
                "modules_to_not_convert": float_linears or None, **common}
    if backend.fmt == AUTO_ROUND:
        config = {"quant_method": "auto-round", "bits": mode.bits, "group_size": group, "sym": sym, "data_type": "int",
                  "packing_format": "auto_round:auto_awq" if mode.asymmetric else "auto_round:auto_gptq"}
        if float_linears:  # auto-round's per-layer schemes: 16 bits = left in float
            config["extra_config"] = {path: {"bits": 16, "data_type": "float"} for path in float_linears}
        return {**config, **common}
    weights = {"num_bits": mode.bits, "type": "int", "symmetric": sym,
               "group_size": None if group == -1 else group, "strategy": "channel" if group == -1 else "group",
               "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}, "block_structure": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": float_linears, "kv_cache_scheme": None, "global_compression_ratio": None, **common}


@hookimpl
def qcompiler_register_backends():
    ints = "2-, 3-, 4- and 8-bit integer grids"
    return [
        CheckpointBackend("gptq", layouts.GPTQ, (2, 3, 4, 8), ints),
        CheckpointBackend("gptq_v2", layouts.GPTQ_V2, (2, 3, 4, 8), ints),
        CheckpointBackend("awq", layouts.AWQ, (4,), "4-bit integer grids only (int4_sym, int4_asym)"),
        CheckpointBackend(AUTO_ROUND, AUTO_ROUND, (2, 3, 4, 8), "2-, 3-, 4- and 8-bit symmetric integer grids and "
                          "the 4-bit asymmetric one"),
        CheckpointBackend("compressed-tensors", layouts.COMPRESSED_TENSORS, (2, 3, 4, 8), ints),
    ]
