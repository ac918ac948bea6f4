"""SmoothQuant: activation outliers moved into the weights before the activations are quantized.

For the MatMuls that read one input x (q/k/v after an RMSNorm, gate/up after the second one, a
gated MLP's down projection after its Multiply), with per-channel calibration statistics
max|x_j| (over all calibration tokens) and max|W_j| (over the rows of every such MatMul):

    s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)   (clamped to >= 1e-5; INC's and the paper's formula)

and x / s, W * s leave the float function unchanged. The places a scale folds into are found by the
pattern language (`qcompiler.scale_sites`, shared with AWQ): the norm's weight gamma / s,
or the rows of the MatMul before a gated Multiply (up_proj's rows / s), or v_proj's rows for o_proj
(through the attention, which weights each value channel; grouped-query heads share one scale,
`_value_sites`); no per-architecture table. Where none of these is found (a post-LN encoder's LayerNorm
feeds the residual too; GELU is not linear), the site is `explicit`: the weights take s and the
activation quantizer divides the input by s (a Multiply before it in the artifact, as NNCF writes).
The final norm before lm_head is one of them (its statistics come from the engine's head pass); a
lm_head tied to the embeddings scales the embedding's columns too, so the embedding's output is
multiplied back by 1 / s (an inserted Multiply, the embedding module's epilogue, which every backend
lowers).

alpha: a number in [0, 1], or "auto": per site, each alpha of 0.2, 0.3, ..., 1 and no smoothing at all
are measured by the output error of the quantized layers on the calibration rows X,
sum over targets ||X W^T - Qa(X / s) Qw(W s)^T||^2, Qa the static u8 per-tensor quantizer of the
smoothed input's range (min / max, or the percentiles of `--activation-range percentile`) and Qw
int8_sym per output channel, and the best is kept (INC's auto-alpha,
layer-wise). For a tied lm_head the embedding's relative error ||Qw(W s) / s - W||^2 / ||W||^2 is added,
weighted as the head's relative output error (SmolLM2: alpha 0.3 takes the head's error from 1.2e-3
to 5.3e-4 and the embedding's from 1.4e-4 to 1.6e-4; 0.7 would take the embedding's to 1.5e-3). The statistics of the smoothed input are updated (x / s) for activation quantization.
The summary gives, per site, the alpha, the spread of s (min, max) and the errors before and after.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompiler.activations import eligible, linear, static_range
from qcompiler.config import Mode
from qcompiler.engine import extremes
from qcompiler.hookspecs import hookimpl
from qcompiler.ir import Graph
from qcompiler.pattern import P, Var, Weight, find_matches
from qcompiler.passmanager import BlockPass, PassContext, PassResult
from qcompiler.quant import fake_quantize
from qcompiler.scale_sites import NORM, Site, apply, sites

# alphas of the auto search: SmolLM2's sites chose 0.4 to 1.0; a grid twice as fine near 1 moved its held-out
# perplexity by 0.1% (noise)
GRID = tuple(i / 10 for i in range(2, 11))
PATTERNS = ("gated", "relu", "norm", "tied_head", "value", "explicit")
ROW_BUDGET, MIN_ROWS = 1 << 21, 64  # calibration rows x output channels the auto search measures on, at most


@dataclass(frozen=True)
class SmoothQuantOptions:
    alpha: float | str = "auto"
    rows: int = 256  # calibration rows the auto search measures on (512: the same alphas on SmolLM2, twice the time)
    percentile: float | None = None  # the activation ranges' percentile (`--activation-range percentile`), else min/max


class SmoothQuant(BlockPass):
    name = "smooth_quant"
    Options = SmoothQuantOptions
    statistics = frozenset({"min_max", "rows"})
    reads_head = True

    @classmethod
    def options_from(cls, config):
        alpha = config.smoothing
        return None if alpha is None else cls.Options(alpha=alpha, percentile=config.range_percentile)

    def start(self, graph: Graph, ctx: PassContext) -> None:
        self.sites, self.skipped = sites(graph, eligible)
        taken = {op for site in self.sites for op, _ in site.targets}
        heads = [(site, gather) for site, gather in _head_sites(graph) if site.targets[0][0] not in taken]
        self.tied = {id(site): gather for site, gather in heads if gather is not None}  # -> the embedding Gather
        for site, _ in heads:
            self.skipped.pop(site.targets[0][0].name, None)
            self.sites.append(site)
        taken |= {op for site, _ in heads for op, _ in site.targets}
        values = [(site, g) for site, g in _value_sites(graph) if site.targets[0][0] not in taken]
        self.value_groups = {id(site): g for site, g in values}  # site -> (kv heads, head dim, repeats)
        self.sites += [site for site, _ in values]
        taken |= {op for site, _ in values for op, _ in site.targets}
        self.sites += _explicit_sites(graph, taken)
        self.layers: dict[str, dict] = {}
        self.applied = dict.fromkeys(PATTERNS, 0)

    def wants(self, graph, ctx) -> dict[str, frozenset]:
        kinds = self.statistics | extremes(self.options.percentile)
        return {c.attrs["weight"]: kinds for site in self.sites for _, c in site.targets}

    def run_block(self, graph: Graph, block, stats, ctx) -> None:
        for site in [s for s in self.sites if s.targets[0][1].attrs["weight"] in stats]:
            st = stats[site.targets[0][1].attrs["weight"]]
            if st.max is None:
                continue
            weights = [linear(graph, c, op) for op, c in site.targets]
            x_max = torch.maximum(st.max.abs(), st.min.abs()).clamp(min=1e-5)
            w_max = torch.cat(weights).abs().amax(0).clamp(min=1e-5)
            outputs = sum(w.shape[0] for w in weights)  # rows x outputs bounds each candidate's cost (lm_head)
            x = st.rows[: max(MIN_ROWS, min(self.options.rows, ROW_BUDGET // outputs))]

            groups = self.value_groups.get(id(site))  # v -> o: one scale per value channel (GQA)

            def scale(alpha: float) -> torch.Tensor:
                if groups is None:
                    return (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
                xg, wg = _per_value_channel(x_max, groups), _per_value_channel(w_max, groups)
                return _expand((xg.pow(alpha) / wg.pow(1 - alpha)).clamp(min=1e-5), groups)

            tied = id(site) in self.tied
            outs = [x @ w.t() for w in weights]  # the float products, computed once
            reference = sum(float(o.pow(2).sum()) for o in outs) if tied else 0.0

            def loss(s: torch.Tensor) -> float:
                if self.options.percentile is not None:  # the range activation quantization will take
                    aq = static_range(*st.percentile_range(self.options.percentile, 1.0 / s))
                else:
                    aq = static_range(float((st.min / s).min()), float((st.max / s).max()))
                xq = aq.fake(x / s)
                total = 0.0
                for w, out in zip(weights, outs):
                    wq = fake_quantize(w * s, Mode.INT8_SYM, -1)
                    total += float((out - xq @ wq.t()).pow(2).sum())
                    if tied:  # the embedding's rows decode as Q(W s) / s: its relative error counts as much
                        total += reference * float((wq / s - w).pow(2).sum() / w.pow(2).sum())
                return total

            layer = {"pattern": site.pattern}
            ones = torch.ones_like(x_max)
            if self.options.alpha == "auto" and x.numel():
                norm = sum(float(o.pow(2).sum()) for o in outs) or 1.0
                candidates = [(loss(ones), None, ones)] + [(loss(scale(a)), a, scale(a)) for a in GRID]
                best = min(candidates, key=lambda c: c[0])
                _, alpha, s = best
                layer.update(error_before=candidates[0][0] / norm, error_after=best[0] / norm)
            else:
                alpha = float(self.options.alpha)
                s = scale(alpha)
                if x.numel():
                    norm = sum(float(o.pow(2).sum()) for o in outs) or 1.0
                    layer.update(error_before=loss(ones) / norm, error_after=loss(s) / norm)
            layer["alpha"] = alpha
            if alpha is not None:
                layer["scale_min"], layer["scale_max"] = float(s.min()), float(s.max())
                if groups is None:
                    apply(graph, site, s, mark="smooth_quant")
                    if site.fold is None:  # the activation quantizer divides the input by s
                        for _, c in site.targets:
                            c.meta["smooth_input"] = s
                else:
                    _apply_value(graph, site, s, groups)
                if id(site) in self.tied:  # the embedding reads W * s too: its output times 1 / s
                    _unscale(graph, self.tied[id(site)], s)
                for seen in {id(stats[c.attrs["weight"]]): stats[c.attrs["weight"]] for _, c in site.targets}.values():
                    seen.scale_channels(1.0 / s)
                self.applied[site.pattern] += 1
            self.layers[", ".join(c.attrs["weight"] for _, c in site.targets)] = layer

    def finish(self, graph, ctx) -> PassResult:
        counts = {p: sum(1 for s in self.sites if s.pattern == p) for p in PATTERNS}
        return PassResult(any(self.applied.values()), {
            "alpha": self.options.alpha, "matched": counts, "applied": dict(self.applied),
            "skipped": self.skipped, "layers": self.layers})


def _explicit_sites(graph: Graph, taken: set) -> list[Site]:
    """The MatMuls reading one input that no other site covers (q/k/v and the intermediate layer after a
    post-LN encoder's LayerNorm, whose output also feeds the residual; the output layer after a GELU): one
    `explicit` site per input, without a fold weight. Their weights take s and their activation quantizer
    divides the input by s (`ActivationQuant.smooth`; NNCF inserts the same Multiply)."""
    users = graph.consumers()
    groups: dict = {}
    for const, uses in graph.uses_by_weight().items():
        for use in uses:
            if use.op.op == "MatMul" and use.op not in taken and not eligible(const, use.op, users):
                groups.setdefault(use.op.inputs[0], []).append((use.op, const))
    return [Site("explicit", targets, None, False) for targets in groups.values()]


NORM_SLICED = P.MatMul(P.Slice(P.Multiply(Weight("gamma"), Var("y"), name="norm"), name="slice"), Weight("w"),
                      name="mm")  # lm_head after the final norm, through transformers' logits_to_keep slice


def _head_sites(graph: Graph) -> list:
    """(site, Gather or None) for a norm -> [Slice ->] MatMul whose norm feeds that MatMul alone: the
    final norm before lm_head. With a weight an embedding Gather shares (a tied lm_head), the Gather."""
    users = graph.consumers()
    out = []
    for m in [*find_matches(graph, NORM)[0], *find_matches(graph, NORM_SLICED)[0]]:
        const, op, gamma = m["w"], m["mm"], m["gamma"]
        path = [m["norm"], *([m["slice"]] if "slice" in m else []), op]
        if any(users[a] != [b] for a, b in zip(path, path[1:])) or users[gamma] != [m["norm"]]:
            continue
        gathers = [u for u in users[const] if u.op == "Gather"]
        if len(gathers) > 1 or len(graph.tensor(gamma).shape) != 1 or eligible(const, op, {**users, const: [op]}) or (
                [u for u in users[const] if u is not op and u.op != "Gather"]):
            continue
        pattern = "tied_head" if gathers else "norm"
        out.append((Site(pattern, [(op, const)], gamma, False), gathers[0] if gathers else None))
    return out


PASS_THROUGH = ("Reshape", "Transpose", "Opaque")  # Opaque: only torch's `contiguous` (checked below)


def _value_sites(graph: Graph) -> list:
    """(site, (kv heads, head dim, repeats)) for v_proj -> attention -> o_proj: o_proj's input channel
    h * D + d is the attention's weighting of value channel (h // repeats) * D + d (grouped-query
    attention repeats each value head), so o_proj's columns take the scales of the value channels and
    v_proj's rows (and bias) the inverse. Found by walking from a weight MatMul through Reshape /
    Transpose / contiguous and the attention's value input to the next weight MatMul, each read by the
    next only; the head sizes come from the shape the first Reshape records."""
    users = graph.consumers()
    matmuls = {u.op: u.const for u in graph.weight_uses() if u.op.op == "MatMul"}
    out = []
    for v, v_const in matmuls.items():
        node, shape, chain, attention = v, None, [v], False
        while len(users[node]) == 1:
            nxt = users[node][0]
            if nxt.op == "ScaledDotProductAttention" and not attention and len(nxt.inputs) >= 3 and nxt.inputs[2] is node:
                attention = True
            elif nxt.op in PASS_THROUGH and (nxt.op != "Opaque" or nxt.attrs.get("fn") == "contiguous"):
                if nxt.op == "Reshape" and shape is None:
                    shape = nxt.meta.get("shape")
            else:
                break
            node = nxt
            chain.append(node)
        o = users[node][0] if len(users[node]) == 1 else None
        if not attention or o not in matmuls or o.inputs[0] is not node or shape is None or len(shape) < 2:
            continue
        o_const, (heads, dim) = matmuls[o], shape[-2:]
        if not v.attrs.get("transpose_b") or not o.attrs.get("transpose_b") or eligible(o_const, o, users):
            continue
        v_out, o_in = graph.tensor(v_const).shape[0], graph.tensor(o_const).shape[-1]
        if users[v_const] != [v] or v_out != heads * dim or o_in % v_out:
            continue
        bias = None  # a bias Add between v and the reshape would sit in the chain: not walked, so none
        out.append((Site("value", [(o, o_const)], v_const, True, None, bias), (heads, dim, o_in // v_out)))
    return out


def _per_value_channel(values: torch.Tensor, groups) -> torch.Tensor:
    """Per o_proj input channel [Hq * D] -> per value channel [Hkv * D]: the max over the heads sharing it."""
    heads, dim, repeats = groups
    return values.reshape(heads, repeats, dim).amax(1).reshape(-1)


def _expand(values: torch.Tensor, groups) -> torch.Tensor:
    heads, dim, repeats = groups
    return values.reshape(heads, 1, dim).expand(heads, repeats, dim).reshape(-1)


def _apply_value(graph: Graph, site, s: torch.Tensor, groups) -> None:
    """o_proj's columns times s (per o input channel), v_proj's rows divided by the value channel's s."""
    (op, const), = site.targets
    w = graph.weight(const)
    graph.set_weight(const, (w.float() * s[None, :]).to(w.dtype))
    heads, dim, repeats = groups
    s_value = s.reshape(heads, repeats, dim)[:, 0].reshape(-1)
    v = graph.weight(site.fold)
    graph.set_weight(site.fold, (v.float() / s_value[:, None]).to(v.dtype))
    op.meta["smooth_quant"] = True


def _unscale(graph: Graph, gather, s: torch.Tensor) -> None:
    """The embedding module's output times 1 / s (an epilogue of its Gather, `qcompiler.rewrites`)."""
    path = gather.name.split("/")[0]
    inverse = graph.insert_weight(f"{path}.smooth_quant_inverse", (1.0 / s).float())
    scaled = graph.insert("Multiply", [gather, inverse], name=f"{path}/smooth_quant_inverse",
                          meta={"epilogue_of": path})
    graph.replace_uses(gather, scaled)


@hookimpl
def qcompiler_register_passes():
    return [SmoothQuant]
