"""Passes and the manager that runs them.

A pass has a `name`, an `Options` frozen dataclass, and `run(graph, ctx) -> PassResult`.
`options_from(config)` maps the user's CompressionConfig to its options, or None to skip the pass.
The manager adds logging, timing and error context ("failed in pass X after A, B"), nothing clever.

A block pass (`BlockPass`) works on calibration statistics instead: it declares the statistics it
needs (`statistics`, see `qcompiler.engine`) and for which weights (`wants`), and the manager runs
consecutive block passes in one sweep of the calibration engine: for each transformer block, the
statistics of its weights' inputs are collected once, then each pass's `run_block` sees them in
order (a pass that rescales an input updates the statistics for the passes after it).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from qcompiler.activations import scale_input_channels
from qcompiler.config import CompressionConfig
from qcompiler.errors import PassError, QCompilerError
from qcompiler.ir import Graph

log = logging.getLogger("qcompiler")


@dataclass(frozen=True)
class NoOptions:
    pass


@dataclass
class PassResult:
    changed: bool
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What passes share besides the graph: the config, the results of earlier passes, and the
    calibration engine (None without calibration data). `check_formats(graph)` is the chosen backend's
    check that it can run every assigned format, called right after the pass that assigns them.
    `format_policy(graph, uses_by_const)`, when the backend has one (GGUF's llama.cpp type choice),
    decides each weight's format in place of the config's mode, ratio and group size."""

    config: CompressionConfig
    results: dict[str, PassResult] = field(default_factory=dict)
    engine: Any = None
    check_formats: Any = None
    format_policy: Any = None
    stored_weights: Any = None  # --weight-format keep: the input's own codes (frontend.stored_weights)
    task: str | None = None  # the model's task as optimum names it (`qcompiler.tasks`), where the frontend knows it
    ahead: list = field(default_factory=list)  # the block passes that run next, in one sweep (set by the manager)

    def statistics_ahead(self, graph: Graph, formats: dict) -> dict[str, frozenset]:
        """What the block passes that run next (`ahead`) will want of the weights in `formats` (name ->
        the primary format they may get), for a pass that sweeps the float model before them: its sweep
        collects these too (`CalibrationEngine.sweep(keep=...)`), and theirs then runs no block."""
        out: dict[str, frozenset] = {}
        if any(p.propagate_compressed for p in self.ahead):  # their sweep runs compressed blocks: nothing to keep
            return out
        for p in self.ahead:
            for name, kinds in p.prefetch(graph, self, formats).items():
                out[name] = out.get(name, frozenset()) | kinds
        return out


class Pass:
    """A rewrite of the IR. A pass a user switches on declares its flag, options and rules once (see
    `qcompiler.pass_options`): the command line, `CompressionConfig(passes=...)`, validation and the
    report derive from the declaration."""

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    assigns_formats: ClassVar[bool] = False  # the backend's format check runs right after this pass
    flag: ClassVar[str | None] = None  # the switch (`--gptq`); None: runs whenever the pipeline has it
    help: ClassVar[str | None] = None
    needs_data: ClassVar[bool] = False
    conflicts: ClassVar[tuple[str, ...]] = ()  # names of passes it cannot run with
    modes: ClassVar[tuple] = ()  # the config modes it takes (empty: any), and why others are refused:
    modes_reason: ClassVar[str] = ""

    def __init__(self, options=None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def options_from(cls, config: CompressionConfig):
        """Options for this pass under `config`, or None when the pass should not run: a pass with a
        flag runs when switched on, with the options given (`config.switched_on()`)."""
        values = config.switched_on().get(cls.name)
        if values is None:
            return None if cls.flag else cls.Options()
        return cls.Options(**values)

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError


class BlockPass(Pass):
    """A pass on calibration statistics, run block by block by the calibration engine."""

    statistics: ClassVar[frozenset] = frozenset()
    propagate_compressed: ClassVar[bool] = False  # feed each block the outputs of the compressed blocks before it
    reads_head: ClassVar[bool] = False  # wants the statistics of lm_head's input too (a last `run_block`, block "head")

    def wants(self, graph: Graph, ctx: PassContext) -> list[str] | dict[str, frozenset]:
        """The IR weight names whose input statistics this pass needs (`statistics` for each), or a
        dict name -> statistics where they differ per weight."""
        raise NotImplementedError

    def prefetch(self, graph: Graph, ctx: PassContext, formats: dict) -> dict[str, frozenset]:
        """The statistics this pass will want if the weights in `formats` (name -> format) get those
        formats, asked by an earlier pass that sweeps the float model (`PassContext.statistics_ahead`).
        A guess that turns out short only costs a sweep of its own."""
        return {}

    def start(self, graph: Graph, ctx: PassContext) -> None:
        """Before the sweep."""

    def run_block(self, graph: Graph, block, stats: dict, ctx: PassContext) -> None:
        raise NotImplementedError

    def finish(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError


class PassManager:
    def __init__(self, passes: list[Pass]) -> None:
        self.passes = passes

    def run(self, graph: Graph, ctx: PassContext, progress=None) -> dict[str, PassResult]:
        done: list[str] = []
        i = 0
        assigned = checked = False
        while i < len(self.passes):
            group = [self.passes[i]]
            while isinstance(group[0], BlockPass) and i + len(group) < len(self.passes) and isinstance(
                    self.passes[i + len(group)], BlockPass):
                group.append(self.passes[i + len(group)])
            if isinstance(group[0], BlockPass) and assigned and not checked and ctx.check_formats is not None:
                ctx.check_formats(graph)  # a pass after precision assignment (a plugin's) changed formats
                checked = True
            start = time.perf_counter()
            following = self.passes[i + len(group):]
            ctx.ahead = [] if isinstance(group[0], BlockPass) else list(
                itertools.takewhile(lambda p: isinstance(p, BlockPass), following))
            names = " + ".join(p.name for p in group)
            if progress is not None:
                progress.set_description(f"pass {names}")
            try:
                if isinstance(group[0], BlockPass):
                    results = run_block_passes(group, graph, ctx, progress)
                else:
                    results = [group[0].run(graph, ctx)]
            except QCompilerError:
                raise
            except Exception as exc:
                after = f" after {', '.join(done)}" if done else " (first pass)"
                raise PassError(f"failed in pass {names}{after}: {type(exc).__name__}: {exc}") from exc
            for p, result in zip(group, results):
                result.summary.setdefault("seconds", round((time.perf_counter() - start) / len(group), 4))
                declared = _declared_options(p)
                if declared:
                    result.summary.setdefault("options", declared)
                ctx.results[p.name] = result
                log.info("pass %s: %s", p.name, result.summary)
                done.append(p.name)
                if progress is not None:
                    progress.update(1)
            if any(p.assigns_formats for p in group):
                assigned = True
                if ctx.check_formats is not None:
                    ctx.check_formats(graph)  # before any expensive pass, never after an hour of GPTQ
                checked = True
            elif not isinstance(group[0], BlockPass):
                checked = False
            i += len(group)
        return ctx.results


def _declared_options(p: Pass) -> dict:
    from qcompiler.pass_options import user_options

    return {f.name: getattr(p.options, f.name) for f in user_options(type(p))}


def run_block_passes(group: list[BlockPass], graph: Graph, ctx: PassContext, progress=None) -> list[PassResult]:
    """One sweep of the calibration engine for consecutive block passes (see the module docstring)."""
    if ctx.engine is None:
        raise QCompilerError(f"{', '.join(p.name for p in group)} need calibration data: pass --dataset FILE "
                             "(or --dataset auto)")
    wanted: dict[str, frozenset] = {}
    for p in group:
        p.start(graph, ctx)
        asked = p.wants(graph, ctx)
        for name in asked:
            kinds = asked[name] if isinstance(asked, dict) else p.statistics
            wanted[name] = wanted.get(name, frozenset()) | kinds
    consts = {c.attrs["weight"]: c for c in graph.parameter_constants()}
    # weights SmoothQuant multiplied by s where the artifact divides the input by s (in its activation
    # quantizer, `smooth_input`): the executor runs the module on x with W s / s, and the passes see the
    # statistics of x / s, the input the stored weight meets (SmoothQuant scales them itself in its own sweep)
    smoothed = {n: c.meta["smooth_input"] for n, c in consts.items() if "smooth_input" in c.meta}

    readers = {u.const.attrs["weight"]: u.op for u in graph.weight_uses()}

    def unsmoothed(n: str, value: torch.Tensor) -> torch.Tensor:
        s = consts[n].meta.get("smooth_input")
        return value if s is None else scale_input_channels(value, readers[n], 1.0 / s)

    def current(block) -> dict:  # the block's rewritten weights, as the IR holds them now
        return {n: unsmoothed(n, graph.weight(consts[n])) for n in block.weights
                if n in consts and consts[n].meta.get("rewritten")}

    def compressed(block) -> dict:  # the block as the artifact will compute it
        values = current(block)
        for n in block.weights:
            cw = consts[n].meta.get("compressed") if n in consts else None
            if cw is not None:
                values[n] = unsmoothed(n, cw.dequantize().to(graph.tensor(consts[n]).dtype))
        return values

    def on_block(block, stats) -> None:
        scaled = set()
        for n, s in smoothed.items():
            if n in stats and id(stats[n]) not in scaled:
                stats[n].scale_channels(1.0 / s)
                scaled.add(id(stats[n]))
        for p in group:
            p.run_block(graph, block, stats, ctx)

    ticker = None
    if progress is not None:
        count = len(ctx.engine.blocks)
        names = " + ".join(p.name for p in group)
        ticker = lambda block: progress.set_description(  # noqa: E731
            f"pass {names}: block {ctx.engine.blocks.index(block) + 1}/{count}")
    propagate = compressed if any(p.propagate_compressed for p in group) else None
    untouched = not any(c.meta.get("rewritten") for c in consts.values())  # the float model: statistics may be cached
    ctx.engine.sweep(wanted, on_block, weights=None if untouched else current, propagate=propagate, progress=ticker,
                     head=any(p.reads_head for p in group))
    return [p.finish(graph, ctx) for p in group]
