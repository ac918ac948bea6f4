"""The compression report: NNCF's bit-width table, output size and bits per weight.

How the numbers are computed (stated in the report's "method"):
- parameters are counted per weight tensor, once even when shared (a tied embedding / lm_head),
  as NNCF counts them; "ratio-defining" are the weights the ratio applies to; "parameters" adds
  the non-weight-bearing ones (norms, biases) to give the model's total; "float_weights" lists
  every weight-bearing tensor left in float with the reason;
- bits per weight (compressed) = 8 x bytes stored for the compressed weights' codes, scales and zero
  points / their parameter count; the theoretical figure is b + scale_bits/g (+ b/g for a zero point)
  per weight, averaged over parameters;
- bits per weight (all weights) = 8 x bytes stored for every weight-bearing tensor / their parameters
  (llama.cpp's BPW restricted to weights);
- weights a pass adds (LoRA correction's adapters) are counted apart ("adapters": tensors,
  parameters, bytes stored), in neither the table nor the bits per weight; the model size
  includes them;
- model size = the bytes of the backend's files (for OpenVINO the .xml and .bin: the "IR size");
  output size = the bytes of every file in the artifact folder but this report.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter, defaultdict
from pathlib import Path

from qcompiler.coverage import float_weights, parameter_counts
from qcompiler.quant import matrix_view, theoretical_bits_per_weight

REPORT_FILE = "qcompiler_report.json"
METHOD = __doc__.split("How the numbers are computed (stated in the report's \"method\"):\n", 1)[1].strip()


def build_report(compressed, lowered: dict, out_dir: Path, backend: str) -> dict:
    graph = compressed.graph
    axes = {u.const: u.reduction_axes for u in graph.weight_uses()}
    rows = defaultdict(lambda: {"params": 0, "layers": 0, "ratio_params": 0, "ratio_layers": 0})
    total = comp_params = comp_bytes = all_bytes = 0
    theory_bits = 0.0
    adapters = {"tensors": 0, "params": 0, "bytes": 0}
    for const in graph.weight_constants():
        numel = graph.tensor(const).numel()
        if const.meta.get("adapter_of"):  # a pass's new weight (LoRA correction): not one of the model's
            adapters["tensors"] += 1
            adapters["params"] += numel
            adapters["bytes"] += lowered["weight_bytes"].get(const.attrs["weight"], 0)
            continue
        fmt = const.meta.get("format")
        row = rows[_label(fmt)]
        row["params"] += numel
        row["layers"] += 1
        if const.meta.get("ratio_defining"):
            row["ratio_params"] += numel
            row["ratio_layers"] += 1
        total += numel
        stored = lowered["weight_bytes"].get(const.attrs["weight"], 0)
        all_bytes += stored
        if fmt is not None:
            k = matrix_view(graph.tensor(const), axes[const])[0].shape[1]
            theory_bits += theoretical_bits_per_weight(fmt.mode, fmt.group_size, k) * numel
            comp_params += numel
            comp_bytes += stored
    ratio_total = sum(r["ratio_params"] for r in rows.values()) or 1
    table = [
        {"format": label, **r, "percent_params": 100 * r["params"] / total,
         "percent_ratio_params": 100 * r["ratio_params"] / ratio_total}
        for label, r in sorted(rows.items())
    ]
    files = sorted(p.name for p in out_dir.iterdir()
                   if p.is_file() and p.name != REPORT_FILE and not p.name.startswith(".qcompiler"))
    return {
        "source": str(Path(compressed.source.path).resolve()) if getattr(compressed.source, "path", None) else None,
        "backend": backend,
        "config": _config_dict(compressed.config),
        "table": table,
        "weights": {"tensors": sum(1 for c in graph.weight_constants() if not c.meta.get("adapter_of")),
                    "params": total},
        "parameters": parameter_counts(graph),
        "adapters": adapters if adapters["tensors"] else None,
        "float_weights": float_weights(graph),
        # compressed weights a checkpoint format stores in float, with their decoded values, and why
        "stored_float": lowered.get("stored_float") or None,
        "model_bytes": sum((out_dir / f).stat().st_size for f in lowered["files"]),
        "output_bytes": sum((out_dir / f).stat().st_size for f in files),
        "bits_per_weight": {
            "compressed_measured": 8 * comp_bytes / comp_params if comp_params else None,
            "compressed_theoretical": theory_bits / comp_params if comp_params else None,
            "all_weights": 8 * all_bytes / total if total else None,
        },
        "defaults": compressed.defaults.as_dict() if compressed.defaults is not None else None,
        "model_spec": spec.as_dict() if (spec := getattr(compressed.source, "spec", None)) is not None else None,
        "calibration": compressed.calibration,
        "activations": _activations(graph, compressed.config, lowered),
        "backend_notes": lowered.get("notes") or None,  # lines the backend adds about what it wrote
        "passes": {name: r.summary for name, r in compressed.results.items()},
        "seconds": {k: round(v, 3) for k, v in compressed.seconds.items()},
        "backend_seconds": {k: round(v, 3) for k, v in lowered.get("seconds", {}).items()},
        "files": files,
        "method": METHOD,
    }


def _activations(graph, config, lowered: dict) -> dict | None:
    """Which Linear layers' activations the artifact quantizes: what the passes marked, checked against
    what the backend lowered (a layer marked but left float by the backend is listed, never hidden)."""
    if config.quant_mode is None:
        return None
    marked = [c.attrs["weight"] for c in graph.weight_constants() if "activation" in c.meta]
    lowered_names = set(lowered.get("activations_quantized") or [])
    matmuls = sum(1 for u in graph.weight_uses() if u.op.op == "MatMul")
    attention = [n.name for n in graph.nodes if "attention_quant" in n.meta]
    lowered_attention = set(lowered.get("attention_quantized") or [])
    return {"quant_mode": config.quant_mode, "marked": len(marked), "lowered": len(lowered_names & set(marked)),
            "linear_layers": matmuls, "left_float_by_backend": sorted(set(marked) - lowered_names),
            "attention": {"ops": sum(1 for n in graph.nodes if n.op == "ScaledDotProductAttention"),
                          "marked": len(attention), "lowered": len(lowered_attention & set(attention)),
                          "left_float_by_backend": sorted(set(attention) - lowered_attention)}}


def format_report(report: dict) -> str:
    head = f"{'Weight compression mode':<28} {'% all parameters (layers)':<28} {'% ratio-defining parameters (layers)'}"
    lines = [head, "-" * len(head)]
    total_layers = sum(r["layers"] for r in report["table"])
    ratio_layers = sum(r["ratio_layers"] for r in report["table"])
    for r in report["table"]:
        lines.append(
            f"{r['format']:<28} {r['percent_params']:>3.0f}% ({r['layers']} / {total_layers})".ljust(57)
            + f" {r['percent_ratio_params']:>3.0f}% ({r['ratio_layers']} / {ratio_layers})"
        )
    bpw = report["bits_per_weight"]
    counts = report.get("parameters")
    lines.append("")
    if counts:
        dropped = f" + {counts['not_exported']} not exported (not needed for the model's output)" \
            if counts.get("not_exported") else ""
        lines.append(f"parameters: {counts['weight_bearing']} in weight-bearing layers (the table) + {counts['other']} "
                     f"other (norms, biases){dropped} = {counts['total']}")
    adapters = report.get("adapters")
    if adapters:
        lines.append(f"adapters added by passes (LoRA correction): {adapters['tensors']} tensors, {adapters['params']} "
                     f"parameters, {adapters['bytes'] / 2**20:.2f} MiB (not in the table)")
    floats = report.get("float_weights") or []
    if floats and any(r["reason"] != "no compression asked (fp32)" for r in floats):
        shown = ", ".join(f"{r['name']} ({r['reason']})" for r in floats[:4])
        lines.append(f"left in float: {len(floats)} weights: {shown}{', ...' if len(floats) > 4 else ''}")
    stored = report.get("stored_float") or []
    if stored:
        shown = ", ".join(f"{r['weight']} ({r['format']}: {r['reason']})" for r in stored[:3])
        lines.append(f"stored in float with their decoded values ({report['backend']} holds them no other way): "
                     f"{len(stored)} weights: {shown}{', ...' if len(stored) > 3 else ''}")
    lines.append(f"model size: {report['model_bytes'] / 2**20:.1f} MiB ({report['model_bytes']} bytes); "
                 f"with config and tokenizer: {report['output_bytes'] / 2**20:.1f} MiB")
    if bpw["compressed_measured"] is not None:
        lines.append(
            f"bits per weight, compressed weights: {bpw['compressed_measured']:.3f} "
            f"(theoretical {bpw['compressed_theoretical']:.3f}); all weights: {bpw['all_weights']:.3f}"
        )
    spec = report.get("model_spec")
    if spec:
        lines.append("model spec " + spec["name"] + ": " + "; ".join(f"{k} {v}" for k, v in spec.items() if k != "name"))
    awq = report["passes"].get("awq")
    if awq is not None:
        lines.append(f"AWQ: {awq['matched']} patterns matched, {awq['applied']} applied")
    lines += _keep_lines(report["passes"].get("keep"))
    policy = report["passes"].get("precision", {}).get("format_policy")
    if policy:
        lines.append(f"types chosen by the {report['backend']} format's rule: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(policy.items())))
    lines += report.get("backend_notes") or []
    lines += _data_aware_lines(report)
    lines += _activation_lines(report)
    adjusted = report["passes"].get("precision", {}).get("adjusted_group_size") or {}
    if adjusted:
        sizes = sorted(set(adjusted.values()))
        lines.append(f"group size adjusted for {len(adjusted)} layers (to {', '.join(map(str, sizes))})")
    fallen = report["passes"].get("precision", {}).get("group_size_fallback_to_backup") or []
    if fallen:
        lines.append(f"group size does not divide {len(fallen)} layers: they use the backup precision")
    return "\n".join(lines)


def _keep_lines(keep: dict | None) -> list[str]:
    """What --weight-format keep took from the input, what it lowered approximately and what it left float."""
    if keep is None:
        return []
    lines = ["kept the input's codes: " + ", ".join(f"{k} {v}" for k, v in sorted(keep["kept"].items()))]
    approx = keep.get("approximate") or []
    if approx:
        worst = max(approx, key=lambda a: a["rel_rms_diff"])
        lines.append(f"  {len(approx)} of them not bit-exact ({worst['from']} -> {worst['to']}): worst relative RMS "
                     f"difference from the input's values {worst['rel_rms_diff']:.2e} ({worst['weight']})")
    floats = keep.get("stored_float") or []
    if floats:
        reasons = sorted({f["reason"] for f in floats})
        lines.append(f"  {len(floats)} weights decoded to float instead: {'; '.join(reasons)[:240]}")
    return lines


def _data_aware_lines(report: dict) -> list[str]:
    """The calibration data and what each data-aware pass did, with the mean per-layer output error."""
    lines = []
    calib = report.get("calibration")
    if calib:
        cache = calib.get("statistics_cache")
        lines.append(f"calibration: {calib['source']} ({calib['samples']} samples, {calib['tokens']} tokens, sha1 "
                     f"{calib['sha1'][:12]}), {_plural(calib['blocks'], 'block')}, {_plural(calib['block_forwards'], 'block run')}"
                     + (f"; statistics {', '.join(cache)}" if cache else ""))
    passes = report["passes"]
    metric = passes.get("precision", {}).get("sensitivity_metric")
    if metric:
        lines.append(f"ratio: layers chosen by {metric}")
    awq = passes.get("awq_data")
    if awq is not None:
        found = ", ".join(f"{k} {awq['applied'][k]}/{v}" for k, v in awq["matched"].items())
        refit = sum(1 for v in (awq.get("layers") or {}).values() if "error_refit" in v)
        lines.append(f"AWQ (data-aware): applied / matched per pattern: {found}{_errors(awq.get('layers'), 'error_before')}"
                     + (f"; {refit} scales chosen by the error after scale estimation's refit" if refit else ""))
    tuned = passes.get("autoround")
    if tuned is not None:
        blocks = [b for b in (tuned.get("blocks") or {}).values() if b.get("loss_first")]
        ratio = (sum(b["loss_best"] / b["loss_first"] for b in blocks) / len(blocks)) if blocks else None
        lines.append(f"AutoRound ({tuned['recipe']}): {tuned['tuned']} layers in {len(tuned.get('blocks') or {})} blocks, "
                     f"{tuned['iters']} iterations of batch {tuned['batch_size']} over {tuned['samples']} samples"
                     + (f"; block output error, best / first step: {ratio:.3f} on average" if ratio is not None else ""))
    for name, label, count in (("scale_estimation", "scale estimation", "estimated"), ("gptq", "GPTQ", "quantized"),
                               ("lora_correction", "LoRA correction", "corrected")):
        summary = passes.get(name)
        if summary is not None:
            skipped = summary.get("skipped") or {}
            missing = sum(1 for why in skipped.values() if why.startswith("no calibration statistics"))
            other = len(skipped) - missing
            lines.append(f"{label}: {summary[count]} layers{_errors(summary.get('layers'), 'error_rtn')}"
                         + (f"; {missing} without statistics, rounded to nearest" if missing else "")
                         + (f"; {other} not taken (report: passes.{name}.skipped)" if other else "")
                         + (("; on by default with a dataset (--no-scale-estimation: round to nearest, as NNCF)"
                             if name == "scale_estimation" else "; group scales refitted (scale estimation, on by "
                             "default with a dataset; --no-scale-estimation turns it off)")
                            if summary.get("by_default") else ""))
    return lines


def _activation_lines(report: dict) -> list[str]:
    """SmoothQuant's scales and activation quantization: how many Linear layers, which stay float and why."""
    acts = report.get("activations")
    if not acts:
        return []
    lines = []
    passes = report["passes"]
    sq = passes.get("smooth_quant")
    if sq is not None:
        found = ", ".join(f"{k} {sq['applied'][k]}/{v}" for k, v in sq["matched"].items() if v) or \
            "none (no place to fold a scale into)"
        layers = (sq.get("layers") or {}).values()
        alphas = Counter(str(v["alpha"]) for v in layers)
        chosen = ", ".join(f"{a} x{n}" for a, n in sorted(alphas.items()))
        scales = [v for v in layers if "scale_min" in v]
        spread = (f"; scales {min(v['scale_min'] for v in scales):.3g} to {max(v['scale_max'] for v in scales):.3g}"
                  if scales else "")
        errors = [v for v in layers if "error_before" in v]
        lines.append(f"SmoothQuant (alpha {sq['alpha']}): applied / matched per pattern: {found}; alpha chosen: "
                     f"{chosen}{spread}" + (_errors({i: v for i, v in enumerate(errors)}, "error_before")
                                            if errors else ""))
    act = passes.get("activation_quant") or passes.get("activation_quant_dynamic") or {}
    floats = {**(act.get("float_activations") or {}), **(act.get("fallback") or {})}
    layers = [v for v in (act.get("layers") or {}).values() if "error" in v]
    error = (f"; mean relative output error {sum(v['error_weights'] for v in layers) / len(layers):.4f} with int8 "
             f"weights, {sum(v['error'] for v in layers) / len(layers):.4f} with u8 activations too" if layers else "")
    lines.append(f"activations: {act.get('scheme', acts['quant_mode'])} in {acts['lowered']} of {acts['linear_layers']} "
                 f"Linear layers (weights int8_sym per channel){error}")
    if floats:
        reasons = Counter(floats.values())
        lines.append("  float activations: " + "; ".join(f"{why}: {n}" for why, n in reasons.most_common()))
    att, att_pass = acts.get("attention") or {}, act.get("attention") or {}
    if att.get("ops"):
        reasons = att_pass.get("float") or {}
        why = reasons["*"] if "*" in reasons else "; ".join(f"{w}: {n}" for w, n in Counter(reasons.values()).most_common())
        lines.append(f"  attention: query and key u8 in {att['lowered']} of {att['ops']} attention ops"
                     + (f" (float: {why})" if why else ""))
        if att["left_float_by_backend"]:
            lines.append(f"  {len(att['left_float_by_backend'])} attention ops marked for u8 query and key run float "
                         f"in the {report['backend']} artifact (the backend has no lowering for them)")
    if acts["left_float_by_backend"]:
        lines.append(f"  {len(acts['left_float_by_backend'])} layers marked for u8 activations run float in the "
                     f"{report['backend']} artifact (the backend did not lower them): "
                     + ", ".join(acts["left_float_by_backend"][:4]))
    return lines


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _errors(layers: dict | None, before_key: str) -> str:
    if not layers:
        return ""
    before = sum(v[before_key] for v in layers.values()) / len(layers)
    after = sum(v["error_after"] for v in layers.values()) / len(layers)
    return f"; mean relative output error {before:.4f} -> {after:.4f} (report: passes.*.layers)"


def _label(fmt) -> str:
    if fmt is None:
        return "float (not compressed)"
    return f"{fmt.mode}, " + ("per-channel" if fmt.group_size == -1 else f"group size {fmt.group_size}")


def _config_dict(config) -> dict:
    out = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    from qcompiler.config import SWITCHES

    for name in SWITCHES:  # the switch in force, a default resolved (scale estimation with a dataset)
        out[name] = config.switch(name)
    if config.mode is not None:
        out["group_size"] = config.effective_group_size
        out["group_size_fallback"] = config.fallback.value
    return out
