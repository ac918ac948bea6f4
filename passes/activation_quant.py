"""Activation quantization: which MatMul inputs the artifact quantizes to u8, and on what range.

Every MatMul whose weight is int8_sym per output channel (the weights of `--quant-mode`) and that is
not ignored, shared or other than a 2-D linear weight, takes `meta["activation"]`
(`qcompiler.activations.ActivationQuant`) on its weight Constant; each backend lowers it to its
integer kernels (OpenVINO FakeQuantize, onnxruntime QuantizeLinear / DynamicQuantizeLinear) or
refuses it before any work.

- static (`--quant-mode int8`, a block pass): the range is the min / max over the calibration tokens
  of the input as it reaches the layer (after SmoothQuant's scaling), or with `--activation-range
  percentile` its (100 - P)-th and P-th percentiles over all values (`--activation-percentile`, 99.99). The layer's relative output error
  ||X W^T - Qa(X) Qw(W)^T||^2 / ||X W^T||^2 on the calibration rows is measured; above `max_error`
  the layer falls back to int8 weights with float activations, and the report says so (the output
  layer after the blocks, lm_head, whose error is the model's output error: above `max_error_output`). A layer
  outside the transformer blocks (lm_head) has no statistics and stays float too. A non-finite
  calibration input is an error naming the layer.
- attention (static, encoders): the query and key of each `ScaledDotProductAttention` take static
  signed (i8) ranges from what the attention module hands to it on the calibration data (NNCF quantizes the same
  two inputs); the node takes `meta["attention_quant"]` (query, key). Falls back to float above
  `max_error` on the scores; `--ignored-scope-type ScaledDotProductAttention` keeps them all float.
  Models with a KV cache keep their attention float.
- dynamic (`--quant-mode int8-dynamic`): no data; the runtime measures each input's range per call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from qcompiler.activations import ActivationQuant, linear, scale_input_channels, static_range, symmetric_range
from qcompiler.activations import eligible as int8_eligible
from qcompiler.config import Mode
from qcompiler.engine import ATTENTION_INPUTS, HEAD, attention_tap, extremes
from qcompiler.errors import QCompilerError
from qcompiler.hookspecs import hookimpl
from qcompiler.ir import Graph
from qcompiler.passmanager import BlockPass, Pass, PassContext, PassResult
from qcompiler.quant import fake_quantize
from qcompiler.tasks import ENCODER_TASKS


@dataclass(frozen=True)
class ActivationOptions:
    # relative output error above which a layer keeps float activations. SmolLM2 with alpha auto:
    # see benchmarks/w8a8.py for the spread of the layers' errors
    max_error: float = 0.05
    # the same for the layer after the blocks (lm_head), whose error is the model's output error: SmolLM2's
    # lm_head at 4.8e-4 with u8 input cost 0.7% held-out perplexity (21.29 against 21.15,
    # benchmarks/measured/w8a8-head-2026-11-28-s14.json)
    max_error_output: float = 1e-4
    rows: int = 512
    # the range: None, min / max over the calibration tokens; a number P, the (100 - P)-th and P-th percentiles of
    # all the input's values (NNCF's quantile estimator and onnxruntime's Percentile calibration clip the same way)
    percentile: float | None = None


def eligible(const, op, users) -> str:
    """`activations.eligible`, except that a weight the embedding Gather shares (a tied lm_head) is taken:
    only the MatMul's activation input is quantized."""
    readers = [u for u in users[const] if u is op or u.op != "Gather"]
    return int8_eligible(const, op, {**users, const: readers})


def _targets(graph: Graph) -> tuple[dict[str, tuple], dict[str, str]]:
    users = graph.consumers()
    targets, skipped = {}, {}
    for const, uses in graph.uses_by_weight().items():
        for use in uses:
            if use.op.op != "MatMul":
                continue
            reason = eligible(const, use.op, users)
            if reason:
                skipped[const.attrs["weight"]] = reason
            else:
                targets[const.attrs["weight"]] = (use.op, const)
    return targets, skipped


def _smoothed(aq: ActivationQuant, const) -> ActivationQuant:
    """The quantizer of a weight SmoothQuant scaled without a fold (`smooth_input`: s): it divides the input by s."""
    s = const.meta.get("smooth_input")
    return aq if s is None else replace(aq, smooth=tuple(float(v) for v in s))


def unsmooth(graph: Graph) -> list[str]:
    """Weights SmoothQuant multiplied by s for an activation quantizer that then did not take them (a
    layer that fell back to float activations): W / s again, so the float function is unchanged."""
    undone = []
    for use in graph.weight_uses():
        const = use.const
        s = const.meta.get("smooth_input")
        if s is not None and "activation" not in const.meta and use.op.op == "MatMul":
            graph.set_weight(const, scale_input_channels(graph.weight(const), use.op, 1.0 / s))
            del const.meta["smooth_input"]
            undone.append(const.attrs["weight"])
    return undone


def _attention_targets(graph: Graph, ctx: PassContext) -> tuple[dict, dict[str, str]]:
    """{module path: ScaledDotProductAttention node} whose query and key take static i8 quantizers (NNCF
    quantizes the same two inputs; OpenVINO then runs the scores in int8), and {path or "*": why not}
    for the others. Encoders only: in a model with a KV cache the keys of past tokens would be quantized
    again at every step (NNCF's LLM IR, which does, decodes at 1.06x fp32 against qcompiler's 1.7-2.1x:
    benchmarks/measured/w8a8-2026-11-27-s12.json)."""
    nodes = [n for n in graph.nodes if n.op == "ScaledDotProductAttention"]
    if not nodes:
        return {}, {}
    if ctx.task not in ENCODER_TASKS:
        return {}, {"*": "a model with a KV cache (the attention's query and key are quantized in encoders only)"}
    if not getattr(getattr(ctx.engine, "executor", None), "attention_taps", False):
        return {}, {"*": "the frontend's block executor cannot tap the attention's inputs"}
    targets, skipped, seen = {}, {}, set()
    for node in nodes:
        path = node.name.split("/")[0] if "/" in node.name else ""
        if "ignored" in node.meta:
            skipped[path or node.name] = "in the ignored scope"
        elif not path or path in seen:
            skipped[path or node.name] = "not the one attention of a module"
            targets.pop(path, None)
        else:
            targets[path] = node
        seen.add(path)
    return targets, skipped


class StaticActivations(BlockPass):
    name = "activation_quant"
    Options = ActivationOptions
    statistics = frozenset({"min_max", "rows"})
    reads_head = True

    @classmethod
    def options_from(cls, config):
        if config.quant_mode != "int8":
            return None
        return cls.Options(max_error=cls.Options.max_error if config.activation_max_error is None
                           else config.activation_max_error, percentile=config.range_percentile)

    def start(self, graph: Graph, ctx: PassContext) -> None:
        self.targets, self.skipped = _targets(graph)
        self.layers: dict[str, dict] = {}
        self.attention, self.attention_float = _attention_targets(graph, ctx)
        self.attention_layers: dict[str, dict] = {}

    def wants(self, graph, ctx) -> dict[str, frozenset]:
        kinds = self.statistics | extremes(self.options.percentile)
        return {**dict.fromkeys(self.targets, kinds),
                **{attention_tap(path, w): self.statistics for path in self.attention for w in ATTENTION_INPUTS}}

    def run_block(self, graph: Graph, block, stats, ctx) -> None:
        groups: dict[int, list[str]] = {}  # the layers reading one input (q/k/v) take one range and one decision
        for name in [n for n in self.targets if n in stats]:
            groups.setdefault(id(stats[name]), []).append(name)
        for names in groups.values():
            st = stats[names[0]]
            if st.min is None:
                continue
            if not (torch.isfinite(st.min).all() and torch.isfinite(st.max).all()):
                raise QCompilerError(f"the input of {names[0]} is not finite (inf or NaN) on the calibration data: "
                                     "the model overflows in its dtype there; load it in float32 or ignore the layer "
                                     f"(--ignored-scope-name {names[0]})")
            low, high = float(st.min.min()), float(st.max.max())
            if self.options.percentile is not None:
                aq = static_range(*st.percentile_range(self.options.percentile))
                layers = {n: {"low": aq.low, "high": aq.high, "min": low, "max": high} for n in names}
            else:
                aq = static_range(low, high)
                layers = {n: {"low": aq.low, "high": aq.high} for n in names}
            x = st.rows[: self.options.rows]
            weights = [linear(graph, self.targets[n][1], self.targets[n][0]) for n in names]
            if x.numel():
                xq = aq.fake(x)
                for n, w in zip(names, weights):
                    ref = x @ w.t()
                    wq = fake_quantize(w, Mode.INT8_SYM, -1)
                    norm = float(ref.pow(2).sum()) or 1.0
                    layers[n]["error_weights"] = float((ref - x @ wq.t()).pow(2).sum()) / norm
                    layers[n]["error"] = float((ref - xq @ wq.t()).pow(2).sum()) / norm
            worst = max(v.get("error", 0.0) for v in layers.values())
            limit = self.options.max_error_output if block.name == HEAD else self.options.max_error
            for n in names:
                if worst > limit:
                    layers[n]["fallback"] = (f"output error {layers[n]['error']:.3g}" + (
                        f" (of a layer reading the same input: {worst:.3g})" if layers[n]["error"] < worst else "")
                        + f" > {limit}" + (" (the model's output layer)" if block.name == HEAD else ""))
                else:
                    self.targets[n][1].meta["activation"] = _smoothed(aq, self.targets[n][1])
            self.layers.update(layers)
        for path, node in self.attention.items():
            if attention_tap(path, "query") in stats:
                self._attention_block(path, node, stats)

    def _attention_block(self, path: str, node, stats) -> None:
        """The query and key of one attention on static i8 ranges (`symmetric_range`), unless the scores' relative error
        ||q k^T - Qa(q) Qa(k)^T||^2 / ||q k^T||^2 over the calibration rows (head-dim vectors) exceeds
        `max_error`."""
        q, k = (stats[attention_tap(path, w)] for w in ATTENTION_INPUTS)
        if q.min is None or k.min is None:
            self.attention_float[path] = "its module did not call scaled_dot_product_attention on the calibration data"
            return
        for which, st in (("query", q), ("key", k)):
            if not (torch.isfinite(st.min).all() and torch.isfinite(st.max).all()):
                raise QCompilerError(f"the {which} of {path}'s attention is not finite (inf or NaN) on the calibration "
                                     "data: load the model in float32 or ignore the attention (--ignored-scope-type "
                                     "ScaledDotProductAttention)")
        aq = [symmetric_range(float(st.min.min()), float(st.max.max())) for st in (q, k)]
        layer = {"query": [aq[0].low, aq[0].high], "key": [aq[1].low, aq[1].high]}
        rows = [st.rows[: self.options.rows] for st in (q, k)]
        if all(r.numel() for r in rows):
            ref = rows[0] @ rows[1].t()
            norm = float(ref.pow(2).sum()) or 1.0
            layer["error"] = float((ref - aq[0].fake(rows[0]) @ aq[1].fake(rows[1]).t()).pow(2).sum()) / norm
        if layer.get("error", 0.0) > self.options.max_error:
            self.attention_float[path] = f"scores' output error {layer['error']:.3g} > {self.options.max_error}"
        else:
            node.meta["attention_quant"] = tuple(aq)
        self.attention_layers[path] = layer

    def finish(self, graph, ctx) -> PassResult:
        for name in unsmooth(graph):
            self.layers.setdefault(name, {})["smoothing"] = "undone: float activations take no scale"
        why = getattr(ctx.engine, "head_skipped", "") or "outside the transformer blocks"
        outside = {n: f"no calibration statistics ({why})" for n in self.targets if n not in self.layers}
        quantized = sum(1 for n in self.targets if "activation" in self.targets[n][1].meta)
        fallback = {n: v["fallback"] for n, v in self.layers.items() if "fallback" in v}
        for path in self.attention:
            if path not in self.attention_layers and path not in self.attention_float:
                self.attention_float[path] = "no calibration statistics"
        attention = {"quantized": sum(1 for n in self.attention.values() if "attention_quant" in n.meta),
                     "float": self.attention_float, "layers": self.attention_layers}
        return PassResult(quantized > 0, {
            "scheme": "static u8 per tensor", "range": "min / max" if self.options.percentile is None else
            f"percentiles {100 - self.options.percentile:g} and {self.options.percentile:g} of all values",
            "quantized": quantized, "fallback": fallback, "float_activations": {**outside, **self.skipped},
            "layers": self.layers, "attention": attention})


class DynamicActivations(Pass):
    name = "activation_quant_dynamic"

    @classmethod
    def options_from(cls, config):
        return cls.Options() if config.quant_mode == "int8-dynamic" else None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        targets, skipped = _targets(graph)
        for _, const in targets.values():
            const.meta["activation"] = _smoothed(ActivationQuant(dynamic=True), const)
        unsmooth(graph)
        return PassResult(bool(targets), {
            "scheme": "dynamic u8 per tensor",
            "quantized": len(targets), "fallback": {}, "float_activations": skipped})


@hookimpl
def qcompiler_register_passes():
    return [StaticActivations, DynamicActivations]
