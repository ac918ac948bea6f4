"""Where a per-input-channel scale s folds exactly into the op before a MatMul, found by the pattern
language (no per-architecture table), and the fold itself. AWQ (data-free and with data) and
SmoothQuant share them:
- `gated` / `relu`: MatMul -> Multiply -> MatMul (a gated MLP's down projection; also with gate and up
  fused in one weight whose output is split, as phi3's) and MatMul -> [Add bias] -> Relu -> MatMul (OPT):
  W2[:, k] *= s_k, and the first MatMul's output channel k (and bias) is divided by s_k;
- `norm`: Multiply(gamma, y) -> MatMuls (q/k/v after an RMSNorm, gate/up after the second one): every
  target's W[:, k] *= s_k, and gamma_k /= s_k. All consumers of the norm must be targets.
A Site without a fold weight (SmoothQuant's `explicit`) only scales its targets' weights: the pass that
made it carries 1 / s elsewhere (in the activation quantizer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcompiler.activations import scale_input_channels
from qcompiler.ir import Graph
from qcompiler.pattern import P, Var, Weight, find_matches
from qcompiler.quant import matrix_view, restore

PATTERN = P.MatMul(P.Multiply(P.MatMul(Var("x"), Weight("w1"), name="first"), Var("y"), name="mul"),
                   Weight("w2"), name="second")
# gate and up fused in one weight (phi3): its output split in two, the up half multiplied
FUSED = P.MatMul(P.Multiply(P.GetItem(P.Opaque(P.MatMul(Var("x"), Weight("w1"), name="first"), name="split"),
                                      name="half"), Var("y"), name="mul"), Weight("w2"), name="second")
# fc1 -> ReLU -> fc2 (OPT): relu(z / s) = relu(z) / s for s > 0, so the scale folds into fc1's rows and bias
RELU = P.MatMul(P.Relu(P.Add(P.MatMul(Var("x"), Weight("w1"), name="first"), Weight("b1"), name="add"),
                       name="act"), Weight("w2"), name="second")
RELU_NO_BIAS = P.MatMul(P.Relu(P.MatMul(Var("x"), Weight("w1"), name="first"), name="act"), Weight("w2"),
                        name="second")


def gated_matches(graph: Graph) -> tuple[list[dict], dict[str, str]]:
    """Where a per-channel scale s on the second MatMul's input channels folds exactly into the first
    MatMul: gated MLPs (MatMul -> Multiply -> MatMul, also with gate and up fused in one weight whose
    output is split) and ReLU MLPs (MatMul -> [Add bias] -> Relu -> MatMul). Each match has "rows":
    the slice of the first weight's output channels (rows) that take 1/s (None: all; a fused
    weight's up half), "bias": the first MatMul's bias Constant that takes 1/s too (or None), and
    "path": the nodes from the first MatMul to the second, each of which must feed only the next.
    Also returns the candidates refused, with why."""
    users, refused, out = graph.consumers(), {}, []
    for m in (find_matches(graph, PATTERN)[0] + find_matches(graph, FUSED)[0] + find_matches(graph, RELU)[0]
              + find_matches(graph, RELU_NO_BIAS)[0]):
        if any(len(graph.tensor(m[w]).shape) != 2 for w in ("w1", "w2")):
            refused[m["second"].name] = "batched (mixture-of-experts) weights: one scale per expert is not done yet"
            continue
        if "act" in m:  # ReLU
            bias = m.get("b1")
            width = (m["first"].meta.get("shape") or (0,))[-1]
            if bias is not None and (tuple(graph.tensor(bias).shape) != (width,) or users.get(bias) != [m["add"]]):
                refused[m["second"].name] = "relu: the first MatMul's bias is not a 1-D weight of its own"
                continue
            path = [m["first"], m["add"], m["act"]] if bias is not None else [m["first"], m["act"]]
            out.append({**m, "rows": None, "bias": bias, "path": path, "pattern": "relu"})
            continue
        if "split" not in m:
            out.append({**m, "rows": None, "bias": None, "path": [m["first"], m["mul"]], "pattern": "gated"})
            continue
        split, half, first, mul = m["split"], m["half"], m["first"], m["mul"]
        halves = users.get(split, [])
        width = (mul.meta.get("shape") or (0,))[-1]
        shape = first.meta.get("shape") or (0,)
        if split.attrs.get("fn") != "chunk" or width <= 0:
            continue  # not a split of the first MatMul's output (or no shapes recorded)
        if (sorted(u.attrs.get("index", -1) for u in halves) != [0, 1] or any(u.op != "GetItem" for u in halves)
                or shape[-1] != 2 * width or users.get(first) != [split] or users.get(half) != [mul]):
            refused[m["second"].name] = "fused gate_up: not an even split of the first MatMul's last axis, used once"
            continue
        start = half.attrs["index"] * width
        out.append({**m, "rows": (start, start + width), "bias": None, "path": [mul], "pattern": "gated"})
    return out, refused

NORM = P.MatMul(P.Multiply(Weight("gamma"), Var("y"), name="norm"), Weight("w"), name="mm")


@dataclass
class Site:
    """A place a scale s on the targets' input channels folds into, leaving the float function unchanged."""

    pattern: str
    targets: list  # (MatMul node, weight Constant)
    fold: object  # the Constant whose values absorb 1/s (None: the caller carries 1/s)
    fold_rows: bool  # True: the fold weight's output channels (rows); False: a 1-D norm weight
    rows: tuple[int, int] | None = None  # the fold weight's rows that take 1/s (a fused gate_up's up half)
    bias: object = None  # the fold MatMul's bias Constant, which takes 1/s too (ReLU MLPs)


def sites(graph: Graph, eligible) -> tuple[list[Site], dict[str, str]]:
    """The places a per-input-channel scale folds into (see the module docstring); `eligible(const, op,
    users)` says why a target weight cannot take one ("" when it can: each pass has its own rule)."""
    users = graph.consumers()
    taken = set()
    matches, refused = gated_matches(graph)
    sites, skipped = [], dict(refused)
    for m in matches:
        path = m["path"] + [m["second"]]
        reason = eligible(m["w2"], m["second"], users) or next(
            (f"%{a.name} has other consumers" for a, b in zip(path, path[1:]) if users[a] != [b]), "") or (
            "the first MatMul's weight is shared or not [out, in]" if users[m["w1"]] != [m["first"]]
            or not m["first"].attrs.get("transpose_b") else "")
        if reason:
            skipped[m["second"].name] = f"{m['pattern']}: {reason}"
            continue
        sites.append(Site(m["pattern"], [(m["second"], m["w2"])], m["w1"], True, m["rows"], m["bias"]))
        taken.add(m["second"])
    by_norm: dict = {}
    for m in find_matches(graph, NORM)[0]:
        by_norm.setdefault(m["norm"], (m["gamma"], []))[1].append((m["mm"], m["w"]))
    for norm, (gamma, targets) in by_norm.items():
        readers = users[norm]
        reason = ""
        if len(graph.tensor(gamma).shape) != 1 or users[gamma] != [norm]:
            reason = "the norm weight is not a 1-D weight read only by the norm"
        elif len(readers) != len(targets) or any(op in taken for op, _ in targets):
            reason = "the norm's output feeds ops other than the target MatMuls"
        else:
            reason = next((r for op, c in targets if (r := eligible(c, op, users))), "")
        if reason:
            skipped[targets[0][0].name] = f"norm: {reason}"
            continue
        sites.append(Site("norm", targets, gamma, False))
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites.sort(key=lambda s: order[s.targets[0][0]])
    return sites, skipped


def apply(graph: Graph, site: Site, s: torch.Tensor, mark: str = "awq") -> None:
    """W * s on every target's input channels and 1 / s folded into the site's fold weight (and bias);
    the targets' MatMuls are marked `meta[mark]`."""
    for op, c in site.targets:
        graph.set_weight(c, scale_input_channels(graph.weight(c), op, s))
        op.meta[mark] = True
    if site.fold is None:
        return
    fold = graph.weight(site.fold)
    if site.fold_rows:
        matrix, transposed = matrix_view(fold.float(), (1,))
        start, stop = site.rows or (0, matrix.shape[0])
        matrix = matrix.clone()
        matrix[start:stop] /= s[:, None]
        new = restore(matrix, graph.tensor(site.fold).shape, transposed)
        if site.bias is not None:
            bias = graph.weight(site.bias)
            graph.set_weight(site.bias, (bias.float() / s).to(bias.dtype))
    else:
        new = fold.float() / s
    graph.set_weight(site.fold, new.to(fold.dtype))
