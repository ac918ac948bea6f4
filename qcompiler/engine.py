"""The calibration engine: runs the original model on calibration data, block by block, and hands
each block's input statistics to the passes that asked for them.

A frontend provides a `BlockExecutor` (see `qcompiler.protocols`): the model's transformer blocks
(each with the IR weights inside it), the cached inputs of the first block, and `run(block, inputs,
weights, taps)`, which runs one block on cached inputs with some weights replaced and a callback on
the input of each tapped weight. The engine never names a framework.

Statistics of a weight's input x (rows of K channels, reduced over tokens as they stream by):
- "abs_mean": mean |x| per channel; "abs_max": max |x| per channel; "min_max": min and max of x per
  channel (activation quantization's ranges);
- "hessian": H = sum x^T x over tokens (with the token count), GPTQ's Hessian up to a factor;
- "hessian_blocks:g": only H's g x g diagonal blocks [K/g, g, g] (scale estimation's groups), K/g
  times cheaper;
- "rows": a fixed sub-sample of raw rows (at most `max_rows`), for searches that need X itself;
- "extremes:P": per channel, the largest and smallest values, as many as the P-th percentile of the whole
  tensor (all channels, all T tokens of the data) can reach: the (1 - P/100) K T largest (and smallest)
  of each channel, from which `InputStats.percentile_range` reads the tensor's two-sided percentiles.
  Kept per channel so that a per-channel rescaling (SmoothQuant's x / s) keeps them exact;
- "sequence": per sample, the per-channel variance and max |x| over the sequence reduced over
  channels (max and mean of the variance, mean of the magnitude) and sum x^2 / numel (NNCF's
  sensitivity statistics).
Peak memory is one block's weights, the cached activations, and the statistics of one block.

A tap point that is not a weight: `<module path>#query` / `<module path>#key`, the query and key
that the attention module at that path hands to its attention (`attention_tap`); an executor taps
them when it says so (`attention_taps = True`). They belong to the block whose path contains them.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from qcompiler import memory
from qcompiler.calibration import CalibrationData

log = logging.getLogger("qcompiler")

HEAD = "head"  # the pseudo-block of the weights read after the blocks (lm_head), see `sweep`
STATISTICS = frozenset({"abs_mean", "abs_max", "min_max", "hessian", "hessian_blocks", "rows", "sequence", "extremes"})
MAX_ROWS = 512


def native_bf16() -> bool:
    """True where the CPU multiplies bf16 matrices natively (AMX or AVX512-BF16) and
    `QCOMPILER_CALIBRATION_FP32=1` does not turn it off. Elsewhere bf16 MatMuls are emulated, several
    times slower than float32 ones, so calibration keeps float32."""
    if os.environ.get("QCOMPILER_CALIBRATION_FP32") == "1":
        return False
    return bool({"amx_bf16", "avx512_bf16"} & _cpu_flags())


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags, read once (empty where /proc/cpuinfo cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
    except OSError:
        return frozenset()


def extremes(percentile: float | None) -> frozenset:
    """The statistic a percentile range needs ("extremes:P"), none for min / max (None)."""
    return frozenset() if percentile is None else frozenset({f"extremes:{percentile}"})


@dataclass
class Block:
    """One transformer block: its name (a module path) and the IR weight names inside it."""

    name: str
    weights: list[str]

    def holds(self, tap: str) -> bool:
        """A weight of this block, or a tap point (`attention_tap`) inside it."""
        return tap in self.weights or ("#" in tap and tap.startswith(self.name + "."))


ATTENTION_INPUTS = ("query", "key")


def attention_tap(module: str, which: str) -> str:
    """The tap point of the query or key the attention module at path `module` attends with."""
    return f"{module}#{which}"


@dataclass
class InputStats:
    """Statistics of the input of one weight-bearing op (K channels)."""

    tokens: int = 0
    abs_sum: torch.Tensor | None = None
    abs_max: torch.Tensor | None = None
    min: torch.Tensor | None = None
    max: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    hessian_blocks: torch.Tensor | None = None
    row_chunks: list[torch.Tensor] = field(default_factory=list)
    top: torch.Tensor | None = None  # "extremes": [K, m] each channel's m largest values, and its m smallest
    bottom: torch.Tensor | None = None
    sequence: list[tuple[float, float, float, float]] = field(default_factory=list)  # var max, var mean, mag, sq

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)

    @property
    def rows(self) -> torch.Tensor:
        return torch.cat(self.row_chunks) if self.row_chunks else torch.empty(0)

    def scale_channels(self, factor: torch.Tensor) -> None:
        """The statistics of x * factor (per channel): after AWQ divided this input by its scale."""
        factor = factor.float()
        if self.abs_sum is not None:
            self.abs_sum = self.abs_sum * factor.abs()
        if self.abs_max is not None:
            self.abs_max = self.abs_max * factor.abs()
        if self.min is not None:
            low, high = self.min * factor, self.max * factor  # a negative factor swaps them
            self.min, self.max = torch.minimum(low, high), torch.maximum(low, high)
        if self.hessian is not None:
            self.hessian = self.hessian * factor[:, None] * factor[None, :]
        if self.hessian_blocks is not None:
            f = factor.reshape(self.hessian_blocks.shape[:2])
            self.hessian_blocks = self.hessian_blocks * f[:, :, None] * f[:, None, :]
        self.row_chunks = [r * factor for r in self.row_chunks]
        if self.top is not None:
            f = factor[:, None]
            high, low = self.top * f, self.bottom * f  # a negative factor swaps them
            self.top, self.bottom = torch.where(f < 0, low, high), torch.where(f < 0, high, low)

    def percentile_range(self, percentile: float, factor: torch.Tensor | None = None) -> tuple[float, float]:
        """(low, high): the (100 - P)-th and P-th percentiles of all the values of the input (every channel
        and token), or of the input times `factor` (positive, per channel), from the "extremes" kept per
        channel: the k-th smallest and k-th largest value, k = ceil((1 - P/100) * count), at least 1 (P = 100
        gives min and max)."""
        top, bottom = (self.top, self.bottom) if factor is None else (self.top * factor[:, None],
                                                                      self.bottom * factor[:, None])
        k = min(max(math.ceil((1.0 - percentile / 100.0) * self.tokens * top.shape[0] - 1e-9), 1), top.numel())
        high = top.reshape(-1).kthvalue(top.numel() - k + 1).values  # the k-th largest
        return float(bottom.reshape(-1).kthvalue(k).values), float(high)


class Collector:
    """Reduces the inputs of the tapped weights as they stream by. Weights that read the same tensor
    one after the other (q, k and v after one norm) share one `InputStats` object."""

    def __init__(self, wanted: dict[str, frozenset], row_rate: float, seed: int = 0, tokens: int = 0) -> None:
        self.wanted = wanted
        self.tokens = tokens  # the data's token count: how many extremes a percentile can need
        self.stats = {name: InputStats() for name in wanted}
        self.row_rate = row_rate  # rows kept per token seen
        self.generator = torch.Generator().manual_seed(seed)
        self.alias: dict[str, str] = {}
        self._extremes: dict[int, tuple] = {}  # id(stats) -> (stats, extremes to keep per channel, pending [K, T] rows)
        self._last: tuple[torch.Tensor, str] | None = None

    def tap(self, name: str) -> Callable[[torch.Tensor], None]:
        return lambda x: self.add(name, x)

    def done(self) -> dict[str, InputStats]:
        """The statistics, complete (the extremes still pending cut back)."""
        for key in list(self._extremes):
            self._cut(key)
        return self.stats

    def _cut(self, key: int) -> None:
        """Each channel's `keep` largest and smallest of the extremes held and the rows pending."""
        st, keep, pending = self._extremes.pop(key)
        top = torch.cat(([st.top] if st.top is not None else []) + pending, 1)
        bottom = torch.cat(([st.bottom] if st.bottom is not None else []) + pending, 1)
        if top.shape[1] > keep:
            top = top.topk(keep, dim=1, sorted=False).values
            bottom = bottom.topk(keep, dim=1, largest=False, sorted=False).values
        st.top, st.bottom = top, bottom

    def add(self, name: str, x: torch.Tensor) -> None:
        if name in self.alias:
            return
        if self._last is not None and x is self._last[0] and self.stats[name].tokens == 0:
            root = self.alias.get(self._last[1], self._last[1])
            if self.wanted[name] <= self.wanted[root]:
                self.alias[name] = root
                self.stats[name] = self.stats[root]
                return
        self._last = (x, name)
        kinds, st = self.wanted[name], self.stats[name]
        x = x.detach()
        rows = x.reshape(-1, x.shape[-1]).float()
        st.tokens += rows.shape[0]
        if "abs_mean" in kinds or "abs_max" in kinds:
            a = rows.abs()
            st.abs_sum = a.sum(0) if st.abs_sum is None else st.abs_sum + a.sum(0)
            m = a.amax(0)
            st.abs_max = m if st.abs_max is None else torch.maximum(st.abs_max, m)
        if "min_max" in kinds:
            low, high = rows.amin(0), rows.amax(0)
            st.min = low if st.min is None else torch.minimum(st.min, low)
            st.max = high if st.max is None else torch.maximum(st.max, high)
        with torch.autocast("cpu", enabled=False):  # float32 X^T X, even under the executor's bf16 autocast
            if "hessian" in kinds:
                h = rows.t() @ rows
                st.hessian = h if st.hessian is None else st.hessian.add_(h)
            for kind in kinds:
                if kind.startswith("hessian_blocks:"):
                    b = hessian_blocks_of(rows, int(kind.split(":")[1]))
                    st.hessian_blocks = b if st.hessian_blocks is None else st.hessian_blocks.add_(b)
        for kind in kinds:
            if kind.startswith("extremes:"):
                keep = math.ceil((1.0 - float(kind.split(":")[1]) / 100.0) * max(self.tokens, st.tokens) * rows.shape[1])
                pending = self._extremes.setdefault(id(st), (st, max(keep, 1), []))[2]
                pending.append(rows.t())  # [K, T]: topk along memory is several times faster
                if sum(c.shape[1] for c in pending) > 2 * keep:  # cut back once twice as many are held
                    self._cut(id(st))
        if "rows" in kinds and self.row_rate > 0:
            take = min(math.ceil(rows.shape[0] * self.row_rate), rows.shape[0])
            index = torch.randperm(rows.shape[0], generator=self.generator)[:take]
            st.row_chunks.append(rows[index].clone())
        if "sequence" in kinds:  # per sample [seq, K]: reduced over the sequence, then over channels
            per_sample = x.float().reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 2 else rows[None]
            # the variance over the sequence from moments of x shifted by its first token (4x faster
            # than Tensor.var's Welford pass; the shift keeps large means from cancelling)
            shifted = per_sample - per_sample[:, :1]
            var = (shifted.pow(2).mean(1) - shifted.mean(1).pow(2)).clamp(min=0)
            values = torch.stack([var.amax(-1), var.mean(-1), per_sample.abs().amax(1).mean(-1),
                                  per_sample.pow(2).mean((1, 2))], 1)
            st.sequence.extend(tuple(row) for row in values.tolist())


def hessian_blocks_of(rows: torch.Tensor, g: int) -> torch.Tensor:
    """X_g^T X_g [K/g, g, g] for each group of g input channels of rows X [T, K] (not divided by T)."""
    r = rows.reshape(rows.shape[0], -1, g)
    return torch.bmm(r.permute(1, 2, 0), r.permute(1, 0, 2))


class CalibrationEngine:
    """Runs the float model block by block on the calibration data (see the module docstring)."""

    def __init__(self, executor, data: CalibrationData, max_rows: int = MAX_ROWS, cache=None) -> None:
        self.executor, self.data, self.max_rows = executor, data, max_rows
        self.blocks: list[Block] = executor.blocks
        self._first_inputs = None
        self.block_forwards = 0
        self.cache = cache  # statistics_cache.StatisticsCache or None
        self.head_skipped = ""  # why the last sweep that asked for the head's statistics could not give them
        self._kept = None  # (kinds by weight, stats by block name): what the last float sweep kept for the next

    def first_inputs(self):
        if self._first_inputs is None:
            self._first_inputs = self.executor.first_inputs(self.data.samples)
        return self._first_inputs

    def release(self, block: Block) -> None:
        """After a block's last run in a sweep: its freed activations go back to the system rather than
        into a heap that only grows (`memory.trim`), and the executor may drop its weights' resident
        pages where a file holds them (`BlockExecutor.release`)."""
        memory.trim()
        release = getattr(self.executor, "release", None)
        if release is not None:
            release(block)

    def release_first_inputs(self) -> None:
        """Drop the cached first-block inputs (a pass that holds them itself); computed again if asked."""
        self._first_inputs = None

    def sweep(self, wanted: dict[str, frozenset], on_block: Callable[[Block, dict[str, InputStats]], None],
              weights: Callable[[Block], dict[str, torch.Tensor]] | None = None,
              propagate: Callable[[Block], dict[str, torch.Tensor]] | None = None, progress=None,
              head: bool = False, keep: dict[str, frozenset] | None = None) -> None:
        """For each block in order: run it on its inputs with taps on the weights in `wanted` (name ->
        statistics), call `on_block(block, stats)`, then make the next block's inputs.

        `weights(block)` gives the weight values to run the block with (default: the model's own);
        the next block's inputs are the outputs of that same run, unless `propagate(block)` is given:
        then the block runs again after `on_block` with those weights (GPTQ feeds each block the
        outputs of the compressed blocks before it).

        `head`: after the last block, the weights the executor reads after the blocks (`head_weights`:
        lm_head) get their statistics too, in a last call `on_block(HEAD, stats)`, when the executor
        offers `head(outputs, taps)`; where it cannot (why is in `self.head_skipped`), no call.

        `keep` (name -> statistics), on the float model: collected too and kept for the next sweep, which
        runs no block when they hold all it wants (the precision pass's sweep keeps what scale estimation
        will read: one forward of the float model instead of two). Kept statistics last one sweep."""
        unknown = {k.split(":")[0] for kinds in [*wanted.values(), *(keep or {}).values()] for k in kinds} - STATISTICS
        if unknown:
            raise ValueError(f"unknown statistics {sorted(unknown)}; the engine collects {sorted(STATISTICS)}")
        head_weights = [n for n in getattr(self.executor, "head_weights", ()) if n in wanted] if head else []
        tail = [Block(HEAD, head_weights)] if head_weights and hasattr(self.executor, "head") else []
        float_model = propagate is None and weights is None
        kept, self._kept = self._kept, None  # good for this sweep only: the passes may change the model after it
        if float_model and kept is not None and _covers(kept[0], wanted, self.blocks + tail, kept[1]):
            for block in self.blocks + tail:
                on_block(block, {n: kept[1][block.name][n] for n in wanted if block.holds(n)})
                if progress is not None and block in self.blocks:
                    progress(block)
            return
        collect = dict(wanted)
        if float_model and keep:
            for name, kinds in keep.items():
                collect[name] = collect.get(name, frozenset()) | kinds
        held: dict[str, dict[str, InputStats]] = {}

        def deliver(block, stats):  # keeps all (when asked to), hands the caller what it asked for
            if float_model and keep:
                held[block.name] = stats
                stats = {n: st for n, st in stats.items() if n in wanted}
            on_block(block, stats)

        if self.cache is not None and float_model:
            cached = self.cache.lookup(collect, self.max_rows, [b.name for b in self.blocks + tail])
            if cached is not None:  # float statistics of this model, data and request: no block runs
                for block in self.blocks + tail:
                    deliver(block, cached(block.name))
                    if progress is not None and block in self.blocks:
                        progress(block)
                if held:
                    self._kept = (collect, held)
                return
        saving = self.cache.writer(collect, self.max_rows) if self.cache is not None and float_model else None
        inputs = self.first_inputs()
        row_rate = min(1.0, self.max_rows / max(self.data.tokens, 1))
        for block in self.blocks:
            mine = {name: kinds for name, kinds in collect.items() if block.holds(name)}
            collector = Collector(mine, row_rate, tokens=self.data.tokens)
            taps = {name: collector.tap(name) for name in mine}
            values = weights(block) if weights is not None else {}
            outputs = self.executor.run(block, inputs, values, taps)
            self.block_forwards += 1
            stats = collector.done()
            if saving is not None:
                saving.save(block.name, stats)
            deliver(block, stats)
            del collector, stats
            if propagate is not None:
                outputs = self.executor.run(block, inputs, propagate(block), {})
                self.block_forwards += 1
            inputs = outputs
            self.release(block)
            if progress is not None:
                progress(block)
        for block in tail:
            collector = Collector({name: collect[name] for name in block.weights}, row_rate, tokens=self.data.tokens)
            self.head_skipped = self.executor.head(inputs, {name: collector.tap(name) for name in block.weights})
            if not self.head_skipped:
                stats = collector.done()
                if saving is not None:
                    saving.save(block.name, stats)
                deliver(block, stats)
        if saving is not None:
            saving.close()
        if held:
            self._kept = (collect, held)


def _covers(kinds: dict[str, frozenset], wanted: dict[str, frozenset], blocks: list[Block], held: dict) -> bool:
    """The statistics kept by a sweep (`kinds` by weight, `held` by block) hold all of `wanted` for `blocks`."""
    return all(block.name in held for block in blocks) and all(
        name in kinds and wanted[name] <= kinds[name] for name in wanted)
