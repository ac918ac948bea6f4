"""Passes and the manager that runs them.

A pass has a `name`, an `Options` frozen dataclass, and `run(graph, ctx) -> PassResult`.
`options_from(config)` maps the user's CompressionConfig to its options, or None to skip the pass.
The manager adds logging, timing and error context ("failed in pass X after A, B"), nothing clever.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

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
    """What passes share besides the graph: the config and the results of earlier passes."""

    config: CompressionConfig
    results: dict[str, PassResult] = field(default_factory=dict)


class Pass:
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

    def __init__(self, options=None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def options_from(cls, config: CompressionConfig):
        """Options for this pass under `config`, or None when the pass should not run."""
        return cls.Options()

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError


class PassManager:
    def __init__(self, passes: list[Pass]) -> None:
        self.passes = passes

    def run(self, graph: Graph, ctx: PassContext, progress=None) -> dict[str, PassResult]:
        done: list[str] = []
        for p in self.passes:
            start = time.perf_counter()
            if progress is not None:
                progress.set_description(f"pass {p.name}")
            try:
                result = p.run(graph, ctx)
            except QCompilerError:
                raise
            except Exception as exc:
                after = f" after {', '.join(done)}" if done else " (first pass)"
                raise PassError(f"failed in pass {p.name}{after}: {type(exc).__name__}: {exc}") from exc
            result.summary.setdefault("seconds", round(time.perf_counter() - start, 4))
            ctx.results[p.name] = result
            log.info("pass %s: %s", p.name, result.summary)
            done.append(p.name)
            if progress is not None:
                progress.update(1)
        return ctx.results
