"""Activation quantization: which MatMul inputs the artifact quantizes to u8, and on what range.

Every MatMul whose weight is int8_sym per output channel (the weights of `--quant-mode`) and that is
not ignored, shared or other than a [out, in] linear weight, takes `meta["activation"]`
(`qcompiler.activations.ActivationQuant`) on its weight Constant; each backend lowers it to its
integer kernels (OpenVINO FakeQuantize, onnxruntime QuantizeLinear / DynamicQuantizeLinear) or
refuses it before any work. The activation-activation MatMuls of attention (QK^T, PV) stay float.

- static (`--quant-mode int8`, a block pass): the range is the min / max over the calibration tokens
  of the input as it reaches the layer (after SmoothQuant's scaling). The layer's relative output error
  ||X W^T - Qa(X) Qw(W)^T||^2 / ||X W^T||^2 on the calibration rows is measured; above `max_error`
  the layer falls back to int8 weights with float activations, and the report says so. A layer
  outside the transformer blocks (lm_head) has no statistics and stays float too. A non-finite
  calibration input is an error naming the layer.
- dynamic (`--quant-mode int8-dynamic`): no data; the runtime measures each input's range per call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompiler.activations import ActivationQuant, static_range
from qcompiler.activations import eligible as int8_eligible
from qcompiler.config import Mode
from qcompiler.errors import QCompilerError
from qcompiler.hookspecs import hookimpl
from qcompiler.ir import Graph
from qcompiler.passmanager import BlockPass, Pass, PassContext, PassResult
from qcompiler.quant import fake_quantize


@dataclass(frozen=True)
class ActivationOptions:
    # relative output error above which a layer keeps float activations. SmolLM2 with alpha auto:
    # see benchmarks/w8a8.py for the spread of the layers' errors
    max_error: float = 0.05
    rows: int = 512


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


class StaticActivations(BlockPass):
    name = "activation_quant"
    Options = ActivationOptions
    statistics = frozenset({"min_max", "rows"})
    reads_head = True

    @classmethod
    def options_from(cls, config):
        return cls.Options() if config.quant_mode == "int8" else None

    def start(self, graph: Graph, ctx: PassContext) -> None:
        self.targets, self.skipped = _targets(graph)
        self.layers: dict[str, dict] = {}

    def wants(self, graph, ctx) -> list[str]:
        return list(self.targets)

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
            x = st.rows[: self.options.rows]
            weights = [graph.weight(self.targets[n][1]).float() for n in names]
            aq = static_range(low, high)
            layers = {n: {"low": aq.low, "high": aq.high} for n in names}
            if x.numel():
                xq = aq.fake(x)
                for n, w in zip(names, weights):
                    ref = x @ w.t()
                    wq = fake_quantize(w, Mode.INT8_SYM, -1)
                    norm = float(ref.pow(2).sum()) or 1.0
                    layers[n]["error_weights"] = float((ref - x @ wq.t()).pow(2).sum()) / norm
                    layers[n]["error"] = float((ref - xq @ wq.t()).pow(2).sum()) / norm
            worst = max(v.get("error", 0.0) for v in layers.values())
            for n in names:
                if worst > self.options.max_error:
                    layers[n]["fallback"] = (f"output error {layers[n]['error']:.3g}" + (
                        f" (of a layer reading the same input: {worst:.3g})" if layers[n]["error"] < worst else "")
                        + f" > {self.options.max_error}")
                else:
                    self.targets[n][1].meta["activation"] = aq
            self.layers.update(layers)

    def finish(self, graph, ctx) -> PassResult:
        why = getattr(ctx.engine, "head_skipped", "") or "outside the transformer blocks"
        outside = {n: f"no calibration statistics ({why})" for n in self.targets if n not in self.layers}
        quantized = sum(1 for n in self.targets if "activation" in self.targets[n][1].meta)
        fallback = {n: v["fallback"] for n, v in self.layers.items() if "fallback" in v}
        return PassResult(quantized > 0, {
            "scheme": "static u8 per tensor",
            "quantized": quantized, "fallback": fallback, "float_activations": {**outside, **self.skipped},
            "layers": self.layers})


class DynamicActivations(Pass):
    name = "activation_quant_dynamic"

    @classmethod
    def options_from(cls, config):
        return cls.Options() if config.quant_mode == "int8-dynamic" else None

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        targets, skipped = _targets(graph)
        for _, const in targets.values():
            const.meta["activation"] = ActivationQuant(dynamic=True)
        return PassResult(bool(targets), {
            "scheme": "dynamic u8 per tensor",
            "quantized": len(targets), "fallback": {}, "float_activations": skipped})


@hookimpl
def qcompiler_register_passes():
    return [StaticActivations, DynamicActivations]
