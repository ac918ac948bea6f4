"""Precision assignment: which weights get the primary format, which the backup, which stay float.

NNCF's rules, data-free:
- INT8 modes: every weight (MatMul, Gather, Convolution) per-channel in that mode.
- 4-bit modes: the ratio-defining weights are the MatMul weights except the last MatMul's
  (embeddings and the last MatMul join with `all_layers`; convolutions never do). Every other
  weight takes the backup mode (per-channel INT8, or float with backup NONE).
- Group size: a ratio-defining weight whose K the group size does not divide follows the
  fallback policy: ADJUST takes the largest power of two dividing K if it is >= 32 (NNCF's rule;
  it also suits the ONNX and torch int4 kernels), else backup; IGNORE sends it to backup; ERROR fails.
- weights in the config's backup scope (marked "to_backup") are not ratio-defining: they take the
  backup mode, as in a two-stage config's first stage; so do mixture-of-experts routers (a MatMul
  whose output reaches a top-k, `_routers`). Batched expert weights [experts, out, in] are
  ratio-defining, compressed per expert.
- ratio < 1: each weight's score is 1 / (backup int8 error + eps), error = max over output channels
  of the mean squared int8 error; weights in ascending score order go primary while the primary
  share of ratio-defining parameters stays below `ratio` (the loop stops at the first that would not).
- with calibration data, NNCF's data-aware metrics multiply that score by a statistic of the
  weight's input x [seq, K] per sample, averaged over samples: max_activation_variance = max over
  channels of var over the sequence, mean_activation_variance = its mean over channels,
  mean_activation_magnitude = mean over channels of max |x| over the sequence;
  hessian_input_activation = ||deq_int8(W) - W||_F * 2 mean(x^2). Embeddings score 0 (4-bit first);
  a weight outside the transformer blocks has no statistics and stays in backup.
Results go to the weight Constant's meta: "format" (WeightFormat or None = float) and "role".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from qcompiler.config import CompressionConfig, GroupSizeFallback, Mode, SensitivityMetric, WeightFormat
from qcompiler.errors import QCompilerError
from qcompiler.hookspecs import hookimpl
from qcompiler.ir import Graph, Node
from qcompiler.passmanager import Pass, PassContext, PassResult
from qcompiler.quant import EPS, matrix_view, quantization_error

MIN_ADJUSTED_GROUP_SIZE = 32


@dataclass(frozen=True)
class PrecisionOptions:
    mode: Mode
    group_size: int
    ratio: float
    backup: Mode | None
    all_layers: bool
    fallback: GroupSizeFallback
    strict: bool = False  # the user's group size must divide at least one ratio-defining layer
    metric: SensitivityMetric = SensitivityMetric.WEIGHT_QUANTIZATION_ERROR


class PrecisionAssignment(Pass):
    name = "precision"
    Options = PrecisionOptions
    assigns_formats = True

    @classmethod
    def options_from(cls, config: CompressionConfig):
        if config.mode is None:
            return None  # fp32: no weight gets a format
        return PrecisionOptions(
            config.mode, config.effective_group_size, config.ratio, config.backup_mode.mode,
            config.all_layers, config.fallback, config.strict_group_size, config.metric,
        )

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o: PrecisionOptions = self.options
        uses = graph.weight_uses()
        by_const = graph.uses_by_weight()
        float_consts = [c for c, us in by_const.items() if _ignored(c, us)]
        consts = [c for c in by_const if c not in float_consts]
        for c in float_consts:
            _assign(c, None, "ignored")
        if ctx.format_policy is not None:  # the backend's own rule (GGUF: llama.cpp's type choice)
            formats = ctx.format_policy(graph, {c: by_const[c] for c in consts})
            roles = Counter()
            for c in consts:  # an integer grid is one the data-aware passes tune (GGUF blocks' grids with data)
                role = "primary" if formats[c] is not None and formats[c].mode.integer else "format_policy"
                _assign(c, formats[c], role)
                roles[role] += 1
            chosen = Counter(str(f.mode) if f else "float" for f in formats.values())
            primary = roles["primary"]
            return PassResult(True, {"primary": primary, "backup": 0,
                                     "float": len(float_consts) + chosen.pop("float", 0), "format_policy": dict(chosen)})

        if not o.mode.low_bit:
            for c in consts:
                _assign(c, WeightFormat(o.mode, -1), "primary")
            return PassResult(True, {"primary": len(consts), "backup": 0, "float": len(float_consts)})

        last_matmul = next((u.op for u in reversed(uses) if u.op.op == "MatMul"), None)
        routers = _routers(graph)
        defining = [c for c in consts if _is_ratio_defining(by_const[c], last_matmul, o.all_layers)
                    and not _to_backup(c, by_const[c]) and not any(u.op in routers for u in by_const[c])]
        group_sizes, adjusted, fallen_back = self._group_sizes(graph, defining, by_const)
        defining = [c for c in defining if c in group_sizes]
        for c in defining:
            c.meta["ratio_defining"] = True
        primary = self._select(graph, defining, by_const, ctx, group_sizes) if o.ratio < 1.0 else defining

        backup = WeightFormat(o.backup, -1) if o.backup else None
        for c in consts:
            if c in primary:
                _assign(c, WeightFormat(o.mode, group_sizes[c]), "primary")
            else:
                _assign(c, backup, "backup")
        return PassResult(True, {
            "primary": len(primary), "backup": len(consts) - len(primary), "float": len(float_consts),
            "ratio_defining": len(defining) + len(fallen_back),
            "adjusted_group_size": adjusted, "group_size_fallback_to_backup": fallen_back,
            "routers_in_backup": sorted(c.attrs["weight"] for c in consts if any(u.op in routers for u in by_const[c])),
            **({"sensitivity_metric": o.metric.value} if o.ratio < 1.0 else {}),
        })

    def _group_sizes(self, graph, defining, by_const):
        o: PrecisionOptions = self.options
        sizes, adjusted, fallen_back, bad = {}, {}, [], []
        for c in defining:
            k = matrix_view(graph.tensor(c), by_const[c][0].reduction_axes)[0].shape[1]
            if o.group_size == -1 or k % o.group_size == 0:
                sizes[c] = o.group_size
                continue
            power_of_two = k & -k
            if o.fallback is GroupSizeFallback.ADJUST and o.mode.spec.block is None and (
                power_of_two >= MIN_ADJUSTED_GROUP_SIZE
            ):
                sizes[c] = adjusted[c.name] = power_of_two
            elif o.fallback is GroupSizeFallback.ERROR:
                bad.append(f"{c.name} (K={k})")
            else:
                fallen_back.append(c.name)
        if o.strict and defining and len(sizes) == len(adjusted):
            ks = sorted({matrix_view(graph.tensor(c), by_const[c][0].reduction_axes)[0].shape[1] for c in defining})
            raise QCompilerError(
                f"group size {o.group_size} divides none of the {len(defining)} layers' input channels "
                f"({', '.join(map(str, ks[:6]))}): pick one that divides them (such as {ks[0] & -ks[0]}), or add "
                "--group-size-fallback adjust to let every layer take the largest power of two dividing it"
            )
        if bad:
            raise QCompilerError(
                f"group size {o.group_size} does not divide the input channels of {len(bad)} layers "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): pick a group size that divides them, "
                "or use --group-size-fallback adjust (or ignore)"
            )
        return sizes, adjusted, fallen_back

    def _select(self, graph, defining, by_const, ctx, group_sizes) -> list[Node]:
        o: PrecisionOptions = self.options
        error_mode = o.backup or Mode.INT8_ASYM
        batched = [c.attrs["weight"] for c in defining if len(c.meta.get("shape", ())) > 2
                   and any(u.op.op == "MatMul" for u in by_const[c])]
        if o.metric.data_aware and batched:
            raise QCompilerError(
                f"--sensitivity-metric {o.metric.value} needs each weight's input, and the batched MoE expert weights "
                f"({batched[0]}, ...) have no module input the calibration engine can read yet: use --sensitivity-metric "
                "weight_quantization_error with --ratio, or --ratio 1.0")
        activations = {}
        if o.metric.data_aware:
            # the sweep also collects what the block passes after this one will want of the weights that may
            # get the primary format, so the float model runs once (`PassContext.statistics_ahead`)
            ahead = ctx.statistics_ahead(graph, {c.attrs["weight"]: WeightFormat(o.mode, group_sizes[c]) for c in defining})
            activations = _activation_scores(graph, defining, by_const, ctx, o.metric, ahead)
        scores = []
        for c in defining:
            axes = by_const[c][0].reduction_axes
            if o.metric is SensitivityMetric.HESSIAN_INPUT_ACTIVATION:
                weight_score = _frobenius_error(graph.weight(c), axes, error_mode)
            else:
                weight_score = 1.0 / (quantization_error(graph.weight(c), axes, error_mode, -1) + EPS)
            if o.metric.data_aware:
                if all(u.op.op == "Gather" for u in by_const[c]):
                    weight_score = 0.0  # embeddings: no activation statistics, 4-bit first (as NNCF)
                elif c.attrs["weight"] in activations:
                    weight_score *= activations[c.attrs["weight"]]
                else:
                    weight_score = float("inf")  # outside the blocks: no statistics, stays in backup
            scores.append(weight_score)
        total = sum(graph.tensor(c).numel() for c in defining)
        chosen, in_primary = [], 0
        for i in sorted(range(len(defining)), key=lambda i: scores[i]):
            if scores[i] == float("inf"):
                continue  # no statistics (outside the blocks): stays in backup
            size = graph.tensor(defining[i]).numel()
            if (in_primary + size) / total >= o.ratio:
                break
            chosen.append(defining[i])
            in_primary += size
        return chosen


def _activation_scores(graph, defining, by_const, ctx, metric: SensitivityMetric, ahead: dict) -> dict[str, float]:
    """Each defining MatMul weight's activation statistic for `metric`, from one engine sweep (which keeps
    the statistics `ahead` for the next sweep)."""
    if ctx.engine is None:
        raise QCompilerError(f"--sensitivity-metric {metric.value} needs calibration data: add --dataset FILE")
    wanted = {c.attrs["weight"]: frozenset({"sequence"}) for c in defining
              if any(u.op.op == "MatMul" for u in by_const[c])}
    column = {SensitivityMetric.MAX_ACTIVATION_VARIANCE: 0, SensitivityMetric.MEAN_ACTIVATION_VARIANCE: 1,
              SensitivityMetric.MEAN_ACTIVATION_MAGNITUDE: 2, SensitivityMetric.HESSIAN_INPUT_ACTIVATION: 3}[metric]
    out = {}

    def on_block(block, stats) -> None:
        for name, st in stats.items():
            if st.sequence:
                value = sum(row[column] for row in st.sequence) / len(st.sequence)
                out[name] = 2.0 * value if metric is SensitivityMetric.HESSIAN_INPUT_ACTIVATION else value

    ctx.engine.sweep(wanted, on_block, keep=ahead)
    return out


def _frobenius_error(weight, axes, mode: Mode) -> float:
    from qcompiler.quant import quantize

    matrix = matrix_view(weight.float(), axes)[0]
    return float((quantize(matrix, (1,), mode, -1).dequantize() - matrix).norm())


ROUTER_PATH = frozenset({"Add", "Softmax", "Sigmoid", "Convert", "GetItem"})  # between a router MatMul and top-k


def _routers(graph: Graph) -> set[Node]:
    """The MatMuls of mixture-of-experts routers: their output reaches a top-k selection through at
    most three of the ROUTER_PATH ops. Their weights take the backup precision, not 4-bit (as in
    optimum-intel's gpt-oss config): every token's choice of experts depends on them."""
    consumers = graph.consumers()
    out = set()
    for node in graph.nodes:
        if node.op != "MatMul":
            continue
        frontier = [node]
        for _ in range(4):
            frontier = [r for n in frontier for r in consumers.get(n, [])]
            if any(r.op == "Opaque" and (r.attrs.get("fn") == "topk" or r.attrs.get("type") == "TopK")
                   for r in frontier):  # torch's topk; an imported ONNX / OpenVINO graph's TopK
                out.add(node)
                break
            frontier = [r for r in frontier if r.op in ROUTER_PATH]
    return out


def _ignored(const: Node, uses) -> bool:
    return "ignored" in const.meta or any("ignored" in u.op.meta for u in uses)


def _to_backup(const: Node, uses) -> bool:
    return "to_backup" in const.meta or any("to_backup" in u.op.meta for u in uses)


def _is_ratio_defining(uses, last_matmul, all_layers: bool) -> bool:
    if any(u.op.op == "Convolution" for u in uses):
        return False
    if all_layers:
        return True
    return all(u.op.op == "MatMul" and u.op is not last_matmul for u in uses)


def _assign(const: Node, fmt: WeightFormat | None, role: str) -> None:
    const.meta["format"] = fmt
    const.meta["role"] = role


@hookimpl
def qcompiler_register_passes():
    return [PrecisionAssignment]
