"""The compiler pipeline as a short function of named steps: load, trace, passes, lower."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from qcompiler.config import CompressionConfig
from qcompiler.errors import QCompilerError
from qcompiler.ir import Graph
from qcompiler.passmanager import PassContext, PassManager, PassResult
from qcompiler.registry import Registry, build_registry
from qcompiler.report import REPORT_FILE, build_report

DEFAULT_PIPELINE = ("ignored_scope", "precision", "awq", "rtn")


@dataclass
class CompressedModel:
    """The compressed IR and what is needed to lower it (returned when no output folder is given)."""

    graph: Graph
    source: Any
    frontend: Any
    config: CompressionConfig
    results: dict[str, PassResult]
    registry: Registry
    seconds: dict[str, float] = field(default_factory=dict)
    report: dict | None = None

    def save(self, output: str | Path, backend: str | None = None, overwrite: bool = False, progress=None,
             backend_options: dict | None = None) -> Path:
        """Lower to `backend` (default: the frontend's own format) and write the artifact folder
        atomically (temporary folder, then rename)."""
        out = check_output(output, overwrite)
        backend = backend or self.frontend.default_backend
        lowering = self.registry.backend(backend)
        options = dict(backend_options or {})
        _check_backend(lowering, self.config, options)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            start = time.perf_counter()
            if progress is not None:
                progress.set_description(f"lower to {backend}")
            lowered = lowering.lower(self.graph, self.source, tmp, options)
            self.seconds["lower"] = time.perf_counter() - start
            if progress is not None:
                progress.update(1)
            lowered["companions"] = self.frontend.save_companions(self.source, tmp)
            self.report = build_report(self, lowered, tmp, backend)
            (tmp / REPORT_FILE).write_text(json.dumps(self.report, indent=2))
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out


def compress(
    model: Any = None,
    config: CompressionConfig | None = None,
    *,
    output: str | Path | None = None,
    backend: str | None = None,
    backend_options: dict | None = None,
    overwrite: bool = False,
    example_input: Any = None,
    registry: Registry | None = None,
    progress: bool = False,
) -> CompressedModel:
    """Compress `model` (a folder, a GGUF folder, an nn.Module; None = the default model).

    Returns the CompressedModel; with `output`, it is also lowered to `backend` (default: the
    format the model came in; OpenVINO for torch models) and written there.
    """
    config = config or CompressionConfig()
    if output is not None:
        check_output(output, overwrite)
    registry = registry or build_registry()
    passes = build_passes(config, registry)
    model = resolve_model(model, registry)
    frontend = registry.frontend_for(model)
    if output is not None:
        _check_backend(registry.backend(backend or frontend.default_backend), config, dict(backend_options or {}))

    seconds = {}
    steps = tqdm(total=2 + len(passes) + (output is not None), desc="load", disable=not progress, unit="step")
    start = time.perf_counter()
    source = frontend.load(model, example_input=example_input)
    seconds["load"] = _lap(start, steps, "trace")
    start = time.perf_counter()
    graph = frontend.trace(source)
    seconds["trace"] = _lap(start, steps, "passes")
    start = time.perf_counter()
    results = PassManager(passes).run(graph, PassContext(config), progress=steps)
    seconds["passes"] = time.perf_counter() - start

    compressed = CompressedModel(graph, source, frontend, config, results, registry, seconds)
    try:
        if output is not None:
            compressed.save(output, backend, overwrite, progress=steps, backend_options=backend_options)
    finally:
        steps.close()
    return compressed


def _check_backend(backend, config: CompressionConfig, options: dict) -> None:
    check = getattr(backend, "check", None)
    if check is not None:
        check(config, options)
    elif options:
        raise QCompilerError(f"the {backend.name} backend takes no options ({', '.join(options)}): drop them")


def build_passes(config: CompressionConfig, registry: Registry) -> list:
    names = list(DEFAULT_PIPELINE)
    names[names.index("rtn"):names.index("rtn")] = list(config.extra_passes)
    passes = []
    for name in names:
        cls = registry.pass_class(name)
        options = cls.options_from(config)
        if options is not None:
            passes.append(cls(options))
    return passes


def resolve_model(model: Any, registry: Registry) -> Any:
    if model is None:
        for frontend in registry.frontends.values():
            default = getattr(frontend, "default_model", None)
            if default is not None:
                return default()
        raise QCompilerError("no frontend provides a default model: pass a model folder")
    if isinstance(model, (str, Path)) and not Path(model).exists():
        raise QCompilerError(f"model {model} does not exist: pass a transformers model folder, a folder with a "
                             ".gguf file, an .onnx file or an OpenVINO .xml")
    return model


def check_output(output: str | Path, overwrite: bool) -> Path:
    out = Path(output)
    if out.exists() and not overwrite:
        raise QCompilerError(f"output folder {out} already exists: pass --overwrite or choose another -o")
    if out.exists() and not out.is_dir():
        raise QCompilerError(f"output {out} is a file, not a folder: choose another -o")
    return out


def _lap(start: float, steps, next_step: str) -> float:
    steps.update(1)
    steps.set_description(next_step)
    return time.perf_counter() - start
