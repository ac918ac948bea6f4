"""Reading a quantized checkpoint folder (GPTQ v1/v2, AWQ GEMM, auto_round, compressed-tensors
pack-quantized), whoever wrote it, from its `quantization_config` and tensors alone: which layout
each quantized Linear is stored in, and the float model its codes decode to (`load_decoded`), for
evaluating it with the same evaluator as every other artifact. Nothing in the folder runs: the
config is read as JSON, the tensors as safetensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qcompiler.config import Mode
from qcompiler.errors import QCompilerError
from qcompiler.plugins.checkpoints import layouts
from qcompiler.quant import CompressedWeight

SUFFIXES = {layouts.GPTQ: ("qweight", "qzeros", "scales", "g_idx"), layouts.GPTQ_V2: ("qweight", "qzeros", "scales", "g_idx"),
            layouts.AWQ: ("qweight", "qzeros", "scales"),
            layouts.COMPRESSED_TENSORS: ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point",
                                         "weight_g_idx")}


@dataclass(frozen=True)
class Scheme:
    """How a checkpoint stores its quantized Linears: the `--format` name it reads as, the tensor layout,
    bits, symmetric or not, group size (-1: per channel)."""

    format: str
    layout: str
    bits: int
    sym: bool
    group_size: int


def read_config(folder: Path) -> dict | None:
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def scheme_of(folder: Path) -> Scheme | None:
    """The checkpoint's scheme, None if `folder` holds no quantization_config this module reads; a
    one-line error for a known method in a layout it does not read."""
    q = (read_config(folder) or {}).get("quantization_config")
    if not isinstance(q, dict):
        return None
    method = q.get("quant_method")
    if method == "gptq":
        version = q.get("format") or q.get("checkpoint_format") or "gptq"
        if version not in ("gptq", "gptq_v2"):
            raise QCompilerError(f"{folder}: GPTQ checkpoint format {version!r} is not read (gptq and gptq_v2 are): "
                                 "convert it with GPTQModel first")
        return Scheme(version, version, int(q["bits"]), bool(q.get("sym", True)), int(q.get("group_size", 128)))
    if method == "awq":
        version = str(q.get("version") or q.get("format") or "gemm").lower()
        if version != "gemm":
            raise QCompilerError(f"{folder}: AWQ {version} checkpoints are not read (GEMM ones are)")
        return Scheme("awq", layouts.AWQ, int(q.get("bits") or q.get("w_bit")), not q.get("zero_point", True),
                      int(q.get("group_size") or q.get("q_group_size")))
    if method == "auto-round":
        packing = q.get("packing_format", "auto_round:auto_gptq")
        layout = {"auto_round:auto_gptq": layouts.GPTQ, "auto_round:auto_awq": layouts.AWQ}.get(packing)
        if layout is None or q.get("data_type", "int") != "int":
            raise QCompilerError(f"{folder}: auto-round packing {packing!r} ({q.get('data_type', 'int')}) is not read "
                                 "(auto_round:auto_gptq and auto_round:auto_awq integer ones are)")
        return Scheme("auto_round", layout, int(q["bits"]), bool(q.get("sym", True)), int(q["group_size"]))
    if method == "compressed-tensors":
        groups = q.get("config_groups") or {}
        if q.get("format") != "pack-quantized" or len(groups) != 1:
            raise QCompilerError(f"{folder}: compressed-tensors format {q.get('format')!r} with {len(groups)} config "
                                 "groups is not read (pack-quantized with one group is)")
        w = next(iter(groups.values()))["weights"]
        if w.get("type", "int") != "int" or w.get("strategy") not in ("group", "channel"):
            raise QCompilerError(f"{folder}: compressed-tensors {w.get('type')} {w.get('strategy')} weights are not "
                                 "read (int group / channel ones are)")
        group = -1 if w.get("strategy") == "channel" else int(w["group_size"])
        return Scheme("compressed-tensors", layouts.COMPRESSED_TENSORS, int(w["num_bits"]), bool(w["symmetric"]), group)
    return None


def decoded_tensors(folder: Path, scheme: Scheme, tensors: dict, shapes: dict,
                    codes: dict | None = None) -> dict[str, torch.Tensor]:
    """{module path + '.weight': float32 W [N, K]} of every quantized Linear in `tensors`, whose
    [N, K] is `shapes[path]`. With `codes` (a dict), also each weight's codes as a CompressedWeight
    (`stored_weight`), or a string saying why they cannot be kept."""
    suffixes = SUFFIXES[scheme.layout]
    out = {}
    for key in [k for k in tensors if k.endswith("." + suffixes[0])]:
        path = key[: -len(suffixes[0]) - 1]
        if path not in shapes:
            raise QCompilerError(f"{folder}: quantized tensors for {path}, which the model's config has no Linear "
                                 "of: the checkpoint does not match its config")
        n, k = shapes[path]
        parts = {s: tensors[f"{path}.{s}"] for s in suffixes if f"{path}.{s}" in tensors}
        try:
            u, z, s = layouts.decode(scheme.layout, parts, scheme.bits, n, k, not scheme.sym)
            g_idx = parts.get("g_idx", parts.get("weight_g_idx"))
            g_idx = None if g_idx is None else g_idx.numpy().astype("int64")
            w = layouts.dequantize(u, z, s, g_idx)
        except (KeyError, ValueError, IndexError) as exc:
            raise QCompilerError(f"{folder}: the tensors of {path} do not match its quantization_config "
                                 f"({scheme.format}, {scheme.bits}-bit, group {scheme.group_size}): {exc}") from None
        if w.shape != (n, k):
            raise QCompilerError(f"{folder}: {path} decodes to {list(w.shape)}, its Linear is [{n}, {k}]: the "
                                 "checkpoint does not match its config")
        out[f"{path}.weight"] = torch.from_numpy(w)
        if codes is not None:
            codes[f"{path}.weight"] = stored_weight(scheme, u, z, s, g_idx)
    return out


def stored_weight(scheme: Scheme, u, z, s, g_idx) -> CompressedWeight | str:
    """The decoded parts of one Linear as the IR's CompressedWeight (codes kept bit for bit), or why not."""
    n, k = u.shape
    groups = s.shape[1]
    g = k // groups
    if g_idx is not None and not np.array_equal(g_idx, np.arange(k) // g):
        return ("act-order (g_idx): its groups are not consecutive input channels, which no lowering stores; "
                "re-quantize it instead (--weight-format int4: the decoded weights are exact)")
    if not np.array_equal(s.astype(np.float16).astype(np.float32), s):
        return "its scales are not f16 values (the IR and every lowering store f16 scales)"
    grouped = (n, groups, g) if groups > 1 else (n, k)
    per_group = (n, groups, 1) if groups > 1 else (n, 1)
    scale = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float16).reshape(per_group))
    half = 1 << (scheme.bits - 1)
    if scheme.sym and (z == half).all():
        codes = torch.from_numpy((u.astype(np.int16) - half).astype(np.int8).reshape(grouped))
        return CompressedWeight(Mode(f"int{scheme.bits}_sym"), g if groups > 1 else -1, codes, scale, None, (n, k))
    codes = torch.from_numpy(np.ascontiguousarray(u, dtype=np.uint8).reshape(grouped))
    zero = torch.from_numpy(np.ascontiguousarray(z, dtype=np.uint8).reshape(per_group))
    return CompressedWeight(Mode(f"int{scheme.bits}_asym"), g if groups > 1 else -1, codes, scale, zero, (n, k))


def load_decoded(folder: str | Path, codes: dict | None = None):
    """The transformers model of a quantized checkpoint, its Linears decoded to float32 by `layouts`
    (independent of the loaders of the tools that wrote it). With `codes` (a dict), each quantized
    Linear weight's codes too (`decoded_tensors`)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    scheme = scheme_of(folder)
    if scheme is None:
        raise QCompilerError(f"{folder} is not a quantized checkpoint qcompiler reads (no GPTQ, AWQ, auto-round or "
                             "compressed-tensors quantization_config)")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QCompilerError(f"{folder} has no .safetensors files: qcompiler reads checkpoints in safetensors only")
    tensors = {}
    try:
        for f in files:
            tensors.update(load_file(str(f)))
    except Exception as exc:  # safetensors raises its own error types for a cut or corrupt file
        raise QCompilerError(f"cannot read {folder}: {str(exc).splitlines()[0][:200]} -- the file is damaged") from None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shapes = {path: (m.out_features, m.in_features) for path, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    state = decoded_tensors(folder, scheme, tensors, shapes, codes)
    suffixes = set(SUFFIXES[scheme.layout])
    state.update({k: v.float() for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in suffixes})
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        example = sorted((set(missing) - tied) | set(unexpected))[0]
        raise QCompilerError(f"the checkpoint in {folder} does not match its config ({len(set(missing) - tied)} tensors "
                             f"missing, {len(unexpected)} unexpected, e.g. {example})")
    model.tie_weights()
    model.eval()
    return model
