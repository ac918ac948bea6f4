"""Keeping an already-quantized input's own codes (`--weight-format keep`): each weight the input
stores quantized (a GGUF's blocks, a GPTQ / AWQ / auto_round / compressed-tensors checkpoint's
codes, as the frontend's `stored_weights` gives them) gets that CompressedWeight and its format,
instead of precision assignment and round to nearest; every other weight stays float.

GGUF blocks go to the integer grid a lowering stores (`quant.integer_form`): q4_0 -> int4_sym g32
and q8_0 -> int8_sym g32 exactly; q4_1 and q4_k -> int4_asym g32 with a float (f16) zero point,
close but not exact, so the report gives each such weight's largest difference from the file's
values; q5_*/q6_k have no such grid and stay float (decoded), listed with the reason. Weights in the
ignored scope stay float too.
"""

from __future__ import annotations

from collections import Counter

from qcompiler.config import WeightFormat
from qcompiler.errors import QCompilerError
from qcompiler.hookspecs import hookimpl
from qcompiler.ir import Graph
from qcompiler.passmanager import NoOptions, Pass, PassContext, PassResult
from qcompiler.quant import BlockWeight, integer_form


class KeepStoredCodes(Pass):
    name = "keep"
    assigns_formats = True

    @classmethod
    def options_from(cls, config):
        return NoOptions() if config.keep else None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        stored = ctx.stored_weights or {}
        if not stored:
            raise QCompilerError("--weight-format keep lowers an already-quantized model (a GGUF, GPTQ, AWQ, "
                                 "auto_round or compressed-tensors checkpoint) with its own codes; this input stores "
                                 "none: pick a --weight-format such as int4")
        kept, approximate, floats = Counter(), [], []
        for const, uses in graph.uses_by_weight().items():
            name = const.attrs["weight"]
            cw = stored.get(name)
            ignored = "ignored" in const.meta or any("ignored" in u.op.meta for u in uses)
            const.meta["format"], const.meta["role"] = None, "float"
            if cw is None:
                continue
            if ignored or isinstance(cw, str):
                floats.append({"weight": name, "reason": "in the ignored scope" if ignored else cw})
                continue
            target = cw
            if isinstance(cw, BlockWeight):
                form = integer_form(cw)
                if form is None:
                    floats.append({"weight": name, "reason": f"{cw.mode} blocks have no 4- or 8-bit integer grid a "
                                                              "lowering stores: decoded to float"})
                    continue
                target, exact = form
                if not exact:
                    original, lowered = cw.dequantize(), target.dequantize()
                    diff = (lowered - original).abs()
                    approximate.append({"weight": name, "from": str(cw.mode),
                                        "to": f"{target.mode} g32, f16 zero point",
                                        "max_abs_diff": float(diff.max()),
                                        "rel_rms_diff": float(diff.square().mean().sqrt()
                                                              / original.square().mean().sqrt().clamp_min(1e-12))})
            const.meta["compressed"] = target
            const.meta["format"], const.meta["role"] = WeightFormat(target.mode, target.group_size), "kept"
            kept[f"{cw.mode}" if not isinstance(cw, BlockWeight) else f"{cw.mode} -> {target.mode}"] += 1
        if not kept:
            raise QCompilerError("none of this input's stored codes can be kept (" + "; ".join(
                sorted({f["reason"] for f in floats}))[:300] + "): re-quantize it with --weight-format int4 or int8")
        return PassResult(True, {"kept": dict(kept), "approximate": approximate, "stored_float": floats})


@hookimpl
def qcompiler_register_passes():
    return [KeepStoredCodes]
