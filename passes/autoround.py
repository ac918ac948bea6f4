"""AutoRound (SignRound, Cheng et al. 2023): tune each weight's rounding and clipping on calibration
data, one transformer block at a time, by sign gradient descent on the block's output error.

Per block, for every weight of an integer format inside it, W [N, K] in groups of g:
- trainable offsets V [N, K] (init 0) added before rounding, and per-group factors alpha, beta
  (init 1, clamped to [0, 1]) on the group's min and max (`--autoround-minmax`);
- the weight the block computes with is Q(W) decoded, with the scale and zero point of round to
  nearest computed from alpha * min and beta * max (the formulas of `qcompiler.quant`, full-range
  symmetric or asymmetric), codes round(W / s + V) (+ z) clipped to the grid, the scale rounded
  to the f16 it is stored in; rounding by the straight-through estimator;
- loss: the mean squared error between the block with those weights on the quantized inputs (the
  outputs of the blocks already tuned) and the float block on the float inputs;
- `iters` steps; each draws `batch_size` samples from a seeded shuffling sampler and moves every
  parameter by -lr * sign(gradient), lr decaying linearly to 0 (lr = 1 / iters by default, 2 /
  iters for 3 bits or fewer with 1000 iterations or more); the parameters of the step with the
  lowest loss are kept.
The codes, f16 scales and zero points then computed from them are the weight's compressed form, so
every backend and checkpoint format writes exactly what the loss measured. Weights outside the
blocks (lm_head, embeddings) are rounded to nearest by the precision pass's formats.

Recipes (AutoRound's numbers): best = 1000 iterations on 512 samples, default = 200 on 128, light =
50 on 128 with lr 5e-3; opt-rtn = no tuning: each group's grid is searched as llama.cpp's quantizers do
(`quant.search_quantize`), the error weighted per input channel by the mean squared input of the layer
(read on the quantized stream, 128 samples); `--iters`, `--lr`, `--batch-size`, `--num-samples` and `--seqlen` override them; with
none given the samples are 2048 tokens long, as AutoRound's. It composes with data-aware AWQ
(which rescales the weights first); it replaces scale estimation and GPTQ (one rounding wins).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from qcompiler.config import Mode
from qcompiler.errors import QCompilerError
from qcompiler.hookspecs import hookimpl
from qcompiler.passmanager import Pass, PassContext, PassResult
from qcompiler.quant import CompressedWeight, code_dtype, matrix_view, quantize, search_quantize

# iterations, samples, learning rate (None: 1 / iterations, 2 / iterations for <= 3 bits with >= 1000 of them)
RECIPES = {"best": (1000, 512, None), "default": (200, 128, None), "light": (50, 128, 5e-3), "opt-rtn": (0, 128, None)}
SEQLEN = 2048  # AutoRound's default sample length
MODES = tuple(m for m in Mode if m.integer)


@dataclass(frozen=True)
class AutoRoundOptions:
    recipe: str = field(default="default", metadata={"help": "AutoRound's recipe: best (1000 iterations, 512 samples), "
                                                            "default (200, 128), light (50, 128) or opt-rtn (no "
                                                            "tuning: each group's scale searched, weighted by the "
                                                            "input's energy)",
                                                     "flag": "--recipe", "choices": tuple(RECIPES)})
    iters: int = field(default=-1, metadata={"help": "tuning steps per block (-1: the recipe's)", "flag": "--iters",
                                             "min": -1})
    lr: float = field(default=-1.0, metadata={"help": "sign-SGD learning rate (-1: the recipe's: light 5e-3, else "
                                                      "1/iters, 2/iters for <= 3 bits with >= 1000 iterations)",
                                              "flag": "--lr"})
    batch_size: int = field(default=8, metadata={"help": "samples per tuning step", "flag": "--batch-size", "min": 1})
    minmax: bool = field(default=True, metadata={"help": "also tune each group's min/max clipping factors"})
    seed: int = field(default=42, metadata={"help": "seed of the sample order", "min": 0})

    @property
    def steps(self) -> int:
        return RECIPES[self.recipe][0] if self.iters == -1 else self.iters

    def learning_rate(self, bits: int) -> float:
        if self.lr > 0:
            return self.lr
        if RECIPES[self.recipe][2] is not None:
            return RECIPES[self.recipe][2]
        steps = max(self.steps, 1)
        return 2.0 / steps if steps >= 1000 and bits <= 3 else 1.0 / steps


class AutoRound(Pass):
    name = "autoround"
    Options = AutoRoundOptions
    flag = "--autoround"
    help = "AutoRound (SignRound): tune rounding and clipping block by block on calibration data (--recipe, --iters)"
    needs_data = True
    switched_on_by_options = True  # --recipe / --iters / --lr / --batch-size alone switch it on, as in AutoRound
    conflicts = ("gptq", "scale_estimation")
    modes = MODES
    modes_reason = "AutoRound tunes integer grids (int2-int8, symmetric or asymmetric)"

    @staticmethod
    def calibration_defaults(options: dict) -> tuple[int, int]:
        """(num_samples, seqlen) when the user gives neither: the recipe's samples of 2048 tokens."""
        return RECIPES[options.get("recipe", "default")][1], SEQLEN

    def run(self, graph, ctx: PassContext) -> PassResult:
        engine = ctx.engine
        if engine is None:
            raise QCompilerError("AutoRound needs calibration data: add --dataset FILE (or --dataset auto)")
        executor = engine.executor
        if getattr(executor, "hidden", None) is None:
            raise QCompilerError("this model's frontend cannot run a block with gradients, which AutoRound needs: "
                                 "start from the transformers model, or drop --recipe/--autoround")
        o = self.options
        steps = o.steps
        if o.recipe == "opt-rtn" and (o.iters not in (-1, 0) or o.lr > 0):
            raise QCompilerError("--recipe opt-rtn tunes nothing (it searches each group's scale): drop --iters and "
                                 "--lr, or pick --recipe light, default or best")
        consts = {c.attrs["weight"]: c for c in graph.parameter_constants()}
        uses = {c.attrs["weight"]: us for c, us in graph.uses_by_weight().items()}
        samples = len(engine.data.samples)
        self.skipped = {}
        generator = torch.Generator().manual_seed(o.seed)
        fp_inputs = q_inputs = engine.first_inputs()
        engine.release_first_inputs()  # held here only: one copy of the activations less
        summary_blocks, layers = {}, {}
        bar = tqdm(total=len(engine.blocks) * max(steps, 1), desc="AutoRound", unit="step", leave=False)
        for index, block in enumerate(engine.blocks):
            current = {n: graph.weight(consts[n]) for n in block.weights
                       if n in consts and consts[n].meta.get("rewritten")}
            targets = self._targets(graph, block, consts, uses)
            fp_outputs = executor.run(block, fp_inputs, current, {})
            engine.block_forwards += 1
            fp_inputs = None  # the float stream moves on: its outputs are the next block's inputs
            if o.recipe == "opt-rtn":
                self._search(graph, executor, block, current, targets, consts, q_inputs, layers)
                engine.block_forwards += 1
                tuners = {}
            else:
                tuners = {name: _Tuner(graph.weight(consts[name]).float(), axes, fmt, o.minmax)
                          for name, (axes, fmt) in targets.items()}
            record = {"layers": len(tuners) or len(targets)}
            if tuners and steps > 0:
                record.update(self._tune(executor, engine, block, current, tuners, fp_outputs, q_inputs, samples,
                                         generator, steps, bar, index))
            for name, tuner in tuners.items():
                cw = tuner.compressed(tuple(graph.tensor(consts[name]).shape))
                consts[name].meta["compressed"] = cw
                layers[name] = {"changed_codes": tuner.changed_fraction(cw)}
            weights = dict(current)
            for name in block.weights:
                cw = consts[name].meta.get("compressed") if name in consts else None
                if cw is not None:
                    weights[name] = cw.dequantize().to(graph.tensor(consts[name]).dtype)
            q_inputs = executor.run(block, q_inputs, weights, {})
            engine.block_forwards += 1
            fp_inputs = fp_outputs
            summary_blocks[block.name] = record
            engine.release(block)  # freed activations and tuning state, the float weights' pages
            if steps <= 0:
                bar.update(1)
        bar.close()
        return PassResult(bool(layers), {"tuned": len(layers), "iters": steps, "batch_size": o.batch_size,
                                         "samples": samples, "recipe": o.recipe, "blocks": summary_blocks,
                                         "layers": layers, "skipped": self.skipped})

    def _search(self, graph, executor, block, current, targets, consts, q_inputs, layers) -> None:
        """opt-RTN: one run of the block reads each target's mean squared input per channel, then each
        weight takes the searched grid of least energy-weighted error."""
        energy = {name: [0.0, 0] for name in targets}

        def tap(name):
            def add(x):
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                energy[name][0] = energy[name][0] + flat.square().sum(0)
                energy[name][1] += flat.shape[0]
            return add

        executor.run(block, q_inputs, current, {name: tap(name) for name in targets})
        for name, (axes, fmt) in targets.items():
            matrix, transposed = matrix_view(graph.weight(consts[name]).float(), axes)
            total, count = energy[name]
            importance = total / max(count, 1) if count else None
            cw = search_quantize(matrix, fmt.mode, fmt.group_size, importance)
            cw = dataclasses.replace(cw, shape=tuple(graph.tensor(consts[name]).shape), transposed=transposed)
            consts[name].meta["compressed"] = cw
            rtn = quantize(matrix, (1,), fmt.mode, fmt.group_size)
            layers[name] = {"changed_codes": float((rtn.codes.reshape(-1) != cw.codes.reshape(-1)).float().mean())}

    def _targets(self, graph, block, consts, uses) -> dict:
        """The block's weights AutoRound tunes: 2-D MatMul weights of an integer format, not yet compressed."""
        out = {}
        for name in block.weights:
            const = consts.get(name)
            fmt = None if const is None else const.meta.get("format")
            if fmt is None or "compressed" in const.meta:
                continue
            us = uses.get(name, [])
            if not fmt.mode.integer or len(us) != 1 or us[0].op.op != "MatMul" or graph.tensor(const).dim() != 2:
                self.skipped[name] = "not a 2-D MatMul weight of an integer format: rounded to nearest"
                continue
            out[name] = (us[0].reduction_axes, fmt)
        return out

    def _tune(self, executor, engine, block, current, tuners, fp_outputs, q_inputs, samples, generator, steps, bar,
              index) -> dict:
        o = self.options
        bits = min(t.fmt.mode.bits for t in tuners.values())
        lr = o.learning_rate(bits)
        reference = executor.hidden(fp_outputs)
        where = [(entry, row) for entry, h in enumerate(reference) for row in range(h.shape[0])]  # sample -> entry, row
        params = [p for t in tuners.values() for p in t.parameters()]
        order, position = torch.randperm(samples, generator=generator), 0
        best_loss, best_state, first_loss, best_step = math.inf, None, None, 0
        for step in range(steps):
            if position + o.batch_size > samples:
                order, position = torch.randperm(samples, generator=generator), 0
            picked = order[position:position + o.batch_size].tolist()
            position += o.batch_size
            batch = executor.select(q_inputs, picked)
            weights = dict(current)
            weights.update({name: t.qdq() for name, t in tuners.items()})
            outputs = executor.run(block, batch, weights, {}, grad=True)
            engine.block_forwards += 1
            got = torch.cat([h.float() for h in executor.hidden(outputs)])
            target = torch.cat([reference[where[i][0]][where[i][1]][None] for i in picked]).float()
            loss = torch.nn.functional.mse_loss(got, target)
            value = loss.item()
            if first_loss is None:
                first_loss = value
            if value < best_loss:
                best_loss, best_state, best_step = value, [p.detach().clone() for p in params], step
            for p in params:
                p.grad = None
            loss.backward()
            rate = lr * (1 - step / steps)
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.add_(torch.sign(p.grad), alpha=-rate)
                for t in tuners.values():
                    t.clamp_()
            bar.set_description(f"AutoRound block {index + 1}/{len(engine.blocks)} loss {value:.3g}")
            bar.update(1)
        with torch.no_grad():
            for p, best in zip(params, best_state):
                p.copy_(best)
        return {"loss_first": first_loss, "loss_best": best_loss, "best_step": best_step, "lr": lr}


class _Tuner:
    """One weight's trainable rounding (V) and clipping (alpha, beta), and its quantize-dequantize."""

    def __init__(self, weight: torch.Tensor, axes, fmt, minmax: bool) -> None:
        self.w, self.transposed = matrix_view(weight, axes)
        self.w = self.w.contiguous()
        self.fmt = fmt
        n, k = self.w.shape
        self.g = k if fmt.group_size == -1 else fmt.group_size
        if k % self.g:
            raise QCompilerError(f"group size {self.g} does not divide {k} input channels")
        self.wg = self.w.reshape(n, k // self.g, self.g)
        self.lo = self.wg.amin(-1, keepdim=True).clamp(max=0.0)  # the group's min and max, before alpha and beta
        self.hi = self.wg.amax(-1, keepdim=True).clamp(min=0.0)
        self.v = torch.zeros_like(self.wg, requires_grad=True)
        self.alpha = torch.ones(n, k // self.g, 1, requires_grad=minmax)
        self.beta = torch.ones(n, k // self.g, 1, requires_grad=minmax)
        self.minmax = minmax

    def parameters(self) -> list[torch.Tensor]:
        return [self.v, self.alpha, self.beta] if self.minmax else [self.v]

    def clamp_(self) -> None:
        self.alpha.clamp_(0.0, 1.0)
        self.beta.clamp_(0.0, 1.0)

    def _scale(self):
        mode = self.fmt.mode
        lo = self.lo * self.alpha
        s = _raw_scale(lo, self.hi * self.beta, mode.bits, mode.asymmetric)[0]
        s = torch.where(s.abs() < SCALE_FLOOR, torch.full_like(s, SCALE_FLOOR), s)
        return s + (s.half().float() - s).detach(), lo  # the f16 scale it is stored as, straight through

    def qdq(self) -> torch.Tensor:
        """The decoded weight in the model's layout, differentiable in V, alpha and beta (`_QDQ`: the
        gradients of `qdq_reference` in one fused forward and backward)."""
        mode = self.fmt.mode
        w = _QDQ.apply(self.wg, self.v, self.alpha, self.beta, self.lo, self.hi, mode.bits, mode.asymmetric,
                       mode.spec.code_range).reshape(self.w.shape)
        return w.t() if self.transposed else w

    def qdq_reference(self) -> torch.Tensor:
        """`qdq` through autograd's own graph of the straight-through formulas (the definition `_QDQ` follows)."""
        mode = self.fmt.mode
        s, lo = self._scale()
        low, high = mode.spec.code_range
        x = self.wg / s + self.v
        q = x + (x.round() - x).detach()
        if mode.asymmetric:
            z = -lo / s
            z = (z + (z.round() - z).detach()).clamp(0, high)
            w = s * ((q + z).clamp(low, high) - z)
        else:
            w = s * q.clamp(low, high)
        w = w.reshape(self.w.shape)
        return w.t() if self.transposed else w

    @torch.no_grad()
    def compressed(self, shape) -> CompressedWeight:
        mode = self.fmt.mode
        s, lo = self._scale()
        s16 = s.half()
        low, high = mode.spec.code_range
        x = (self.wg / s16.float() + self.v).round()
        zero = None
        if mode.asymmetric:
            zero = (-lo / s16.float()).round().clamp(0, high)
            x = (x + zero).clamp(low, high)
            zero = zero.to(torch.uint8)
        else:
            x = x.clamp(low, high)
        codes = x.to(code_dtype(mode))
        group = self.fmt.group_size
        if group == -1:
            codes, s16 = codes.reshape(codes.shape[0], -1), s16.reshape(-1, 1)
            zero = None if zero is None else zero.reshape(-1, 1)
        return CompressedWeight(mode, group, codes, s16, zero, shape, self.transposed)

    def changed_fraction(self, cw: CompressedWeight) -> float:
        """Codes that differ from plain round to nearest (V = 0, alpha = beta = 1)."""
        rtn = quantize(self.w, (1,), self.fmt.mode, self.fmt.group_size)
        return float((rtn.codes.reshape(-1) != cw.codes.reshape(-1)).float().mean())


SCALE_FLOOR = 1e-5  # the smallest scale magnitude (AutoRound's clamp)


def _raw_scale(lo_a, hi_b, bits: int, asymmetric: bool):
    """(scale before its floor and f16 rounding, and for a symmetric grid where the group's clipped min
    sets it): asymmetric (max - min) / (2^b - 1); full-range symmetric, the extreme value maps to
    -2^(b-1), so the scale is negative when it is the max."""
    if asymmetric:
        return (hi_b - lo_a) / (2**bits - 1), None
    pick = -lo_a >= hi_b
    return torch.where(pick, -lo_a, -hi_b) / 2 ** (bits - 1), pick


class _QDQ(torch.autograd.Function):
    """Quantize-dequantize of weight groups `wg` [N, G, g] with offsets V and clipping factors alpha, beta
    [N, G, 1], as `_Tuner.qdq_reference` defines it (rounding straight through, the scale rounded to f16
    straight through, no gradient where a clamp holds), with a hand-written backward: a few torch ops
    each way instead of autograd's graph of some twenty, which was a tenth of each tuning step. (A C
    kernel for both passes, sessions 16-17, gave the same values and gradients up to float rounding but
    no measured speed-up on the whole tuning, 938 s against 939 s; it was removed.)"""

    @staticmethod
    def forward(ctx, wg, v, alpha, beta, lo, hi, bits, asymmetric, code_range):
        low, high = code_range
        lo_a = lo * alpha
        raw, pick = _raw_scale(lo_a, hi * beta, bits, asymmetric)
        live = raw.abs() >= SCALE_FLOOR  # where the scale is not held at its floor
        s = torch.where(live, raw, torch.full_like(raw, SCALE_FLOOR)).half().float()
        z = z_inside = None
        if asymmetric:
            z_raw = (-lo_a / s).round()
            z = z_raw.clamp(0, high)
            z_inside = (z_raw >= 0) & (z_raw <= high)
        r = (wg / s + v).round_()
        if z is not None:
            r = r + z
        inside = (r >= low) & (r <= high)
        code = r.clamp_(low, high)
        w = code * s if z is None else (code - z) * s
        ctx.save_for_backward(wg, s, z, lo, hi, lo_a, pick, live, z_inside, code, inside)
        ctx.bits, ctx.asymmetric = bits, asymmetric
        return w

    @staticmethod
    def backward(ctx, g):
        wg, s, z, lo, hi, lo_a, pick, live, z_inside, code, inside = ctx.saved_tensors
        bits = ctx.bits
        gs = g * s
        dv = torch.where(inside, gs, 0.0)  # dL/dq for q = wg / s + V straight through: [inside] g s
        direct = (g * (code if z is None else code - z)).sum(-1, keepdim=True)
        through = (dv * wg).sum(-1, keepdim=True)
        shift = (dv - gs).sum(-1, keepdim=True)
        # w = s (clamp(q + z) - z): dw/ds = (clamp(q + z) - z) - [inside] wg / s; dw/dz = s ([inside] - 1)
        ds = direct - through / s.square()
        if ctx.asymmetric:  # z = round(-lo_a / s) straight through, clamped to the grid
            ds = ds + torch.where(z_inside, shift * lo_a / s.square(), 0.0)
            dlo_a = torch.where(z_inside, -shift / s, 0.0)
            ds = torch.where(live, ds, 0.0) / (2**bits - 1)
            d_alpha, d_beta = (dlo_a - ds) * lo, ds * hi
        else:
            ds = torch.where(live, ds, 0.0) / 2 ** (bits - 1)
            d_alpha = torch.where(pick, -ds * lo, 0.0)
            d_beta = torch.where(pick, 0.0, -ds * hi)
        return (None, dv, d_alpha if ctx.needs_input_grad[2] else None,
                d_beta if ctx.needs_input_grad[3] else None, None, None, None, None, None)


@hookimpl
def qcompiler_register_passes():
    return [AutoRound]
