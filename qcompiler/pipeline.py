"""The compiler pipeline as a short function of named steps: load, trace, passes, lower."""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from qcompiler import memory
from qcompiler.config import CompressionConfig, LoadOptions, Mode
from qcompiler.coverage import parameter_counts, refuse_unseen_weights
from qcompiler.errors import QCompilerError
from qcompiler.ir import Graph
from qcompiler.passmanager import BlockPass, PassContext, PassManager, PassResult
from qcompiler.output import STAGING_MARKER, OutputFolder
from qcompiler.output_checks import write_error
from qcompiler.registry import Registry, build_registry
from qcompiler.report import REPORT_FILE, build_report
from qcompiler.tasks import TASKS

DEFAULT_PIPELINE = ("ignored_scope", "keep", "precision", "smooth_quant", "activation_quant",
                    "activation_quant_dynamic", "awq", "awq_data", "autoround", "scale_estimation", "gptq",
                    "lora_correction", "rtn")


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
    defaults: Any = None  # model_defaults.Defaults: the default config applied, if one was
    calibration: dict | None = None  # the calibration data and engine figures, when data was used

    def save(self, output: str | Path, backend: str | None = None, overwrite: bool = False, progress=None,
             backend_options: dict | None = None) -> Path:
        """Lower to `backend` (default: the frontend's own format) and write the artifact folder
        safely (`qcompiler.output`: checked target, lock, staging folder, atomic swap)."""
        backend = backend or self.frontend.default_backend
        _check_backend(self.registry.backend(backend), self.config, dict(backend_options or {}))
        with OutputFolder(output, overwrite, inputs=[getattr(self.source, "path", None)]) as folder:
            return self.write(folder, backend, progress, backend_options)

    def write(self, folder: OutputFolder, backend: str | None = None, progress=None,
              backend_options: dict | None = None, prepared=None) -> Path:
        """Lower into the locked `folder`'s staging folder, write the report, swap it in. `prepared`: what
        the backend's `prepare` started before the passes (compress() passes it)."""
        backend = backend or self.frontend.default_backend
        lowering = self.registry.backend(backend)
        if self.graph.released:
            raise QCompilerError(f"this model's compressed weights were already written ({self.graph.released}): "
                                 "compress again to write another artifact")
        if self.graph.placeholders and not getattr(lowering, "lazy_weights", False):
            raise QCompilerError(f"this model was loaded for another backend, with its weights left on disk: call "
                                 f"compress(..., output=..., backend='{backend}') to write a {backend} artifact")
        options = dict(backend_options or {})  # checked by save() / compress() before the folder was locked
        if not getattr(lowering, "lowers_epilogues", False):
            from qcompiler.rewrites import epilogues

            if epilogues(self.graph):
                raise QCompilerError(f"a pass inserted nodes (e.g. LoRA correction's adapters) and the {backend} "
                                     "backend does not lower inserted nodes: use --backend openvino, onnx or torch")
        staging = folder.staging
        try:
            start = time.perf_counter()
            if progress is not None:
                progress.set_description(f"lower to {backend}")
            lowered = (lowering.lower(self.graph, self.source, staging, options) if prepared is None else
                       lowering.lower(self.graph, self.source, staging, options, prepared=prepared))
            self.seconds["lower"] = time.perf_counter() - start
            if progress is not None:
                progress.update(1)
            lowered["companions"] = (self.frontend.save_companions(self.source, staging)
                                     if getattr(lowering, "writes_companions", True) else [])
            if lowered.get("config_json"):  # keys a checkpoint format adds to the model's config.json
                _merge_config(staging, lowered["config_json"], backend)
            self.report = build_report(self, lowered, staging, backend)
            (staging / REPORT_FILE).write_text(json.dumps(self.report, indent=2))
        except QCompilerError:
            raise
        except Exception as exc:
            error = write_error(exc, staging)
            if error is None:
                raise
            raise error from None
        files = [str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file() and p.name != STAGING_MARKER]
        try:
            return folder.commit(files)
        except OSError as exc:
            raise QCompilerError(f"cannot put the artifact in place at {folder.target}: {exc.strerror or exc}; "
                                 "choose another -o; nothing was written") from None


def _merge_config(folder: Path, keys: dict, backend: str) -> None:
    path = folder / "config.json"
    if not path.is_file():
        raise QCompilerError(f"the {backend} format needs the model's config.json, and this input has none: "
                             "compress a transformers model folder (or GGUF), or use --format openvino")
    config = json.loads(path.read_text())
    config.update(keys)
    path.write_text(json.dumps(config, indent=2, default=str))


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
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    defaults: Any = None,
    pad_token_id: int | None = None,
    task: str | None = None,
) -> CompressedModel:
    """Compress `model` (a folder, a GGUF folder, an nn.Module; None = the default model).

    Returns the CompressedModel; with `output`, it is also lowered to `backend` (default: the
    format the model came in; OpenVINO for torch models) and written there. The output location
    is checked and locked before the model is loaded. Code shipped in a model folder runs only
    with `trust_remote_code`, pickle weights load only with `allow_pickle`. `defaults` (a
    `model_defaults.Defaults`) says which default config was applied, for the report.
    `pad_token_id` sets the model's pad token id (optimum-cli's `--pad-token-id`) in its config and
    generation config, which the written config.json, generation_config.json and genai_config.json carry.
    `task` (optimum's names: text-generation-with-past, feature-extraction, text-classification; None: read
    from the model's config) says which model a transformers folder is loaded as.
    """
    config = config or CompressionConfig()
    check_task(task)
    registry = registry or build_registry()
    passes = build_passes(config, registry)
    model = resolve_model(model, registry)
    if config.dataset is not None:
        from qcompiler.calibration import check_source

        check_source(config.dataset)
    frontend = registry.frontend_for(model)
    if config.dataset is not None and getattr(frontend, "executor", None) is None:
        if config.quant_mode == "int8":
            dynamic = "int8-dynamic" in getattr(registry.backend(backend or frontend.default_backend),
                                                 "activation_modes", ())
            raise QCompilerError(f"the {frontend.name} frontend cannot run a model on calibration data yet, which "
                                 "--quant-mode int8 sets its ranges from: start from the transformers model (or its "
                                 "ONNX export)" + (", or use --quant-mode int8-dynamic (no data)" if dynamic else ""))
        raise QCompilerError(f"the {frontend.name} frontend cannot run a model on calibration data yet: drop --dataset "
                             "and the data-aware options, or start from the transformers model")
    allowed = getattr(frontend, "calibration_passes", None)  # a frontend whose executor serves only these
    if config.dataset is not None and allowed is not None:
        others = [p.name for p in passes if isinstance(p, BlockPass) and p.name not in allowed]
        if others:
            raise QCompilerError(f"the {frontend.name} frontend runs a model on calibration data only as it is, for "
                                 f"{' and '.join(allowed)}; {', '.join(others)} run(s) it with rewritten weights: start "
                                 "from the transformers model, or drop those options")
    inputs = [model] if isinstance(model, (str, Path)) else []
    folder = OutputFolder(output, overwrite, inputs) if output is not None else None  # checks the location
    lowering = registry.backend(backend or frontend.default_backend) if folder is not None else None
    if lowering is not None and hasattr(lowering, "configure"):  # a format that decides the weight formats (GGUF)
        config = lowering.configure(config, dict(backend_options or {}))
        passes = build_passes(config, registry)
    if lowering is not None:
        _check_backend(lowering, config, dict(backend_options or {}))
    # data-aware passes run the model's blocks with the real weights: no placeholders then
    load_options = LoadOptions(trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, task=task,
                               lazy_weights=bool(getattr(lowering, "lazy_weights", False)) and config.dataset is None,
                               model_specs=registry.model_specs)

    with ExitStack() as stack:
        if folder is not None:
            stack.enter_context(folder)  # locked before the model is loaded
        seconds = {}
        steps = tqdm(total=2 + len(passes) + (output is not None), desc="load", disable=not progress, unit="step")
        stack.callback(steps.close)
        start = time.perf_counter()
        source = frontend.load(model, example_input=example_input, options=load_options)
        if pad_token_id is not None:
            _set_pad_token_id(source, pad_token_id)
        seconds["load"] = _lap(start, steps, "trace")
        start = time.perf_counter()
        graph = frontend.trace(source)
        if config.int8_above is not None:
            config, passes = _decide_format(graph, config, registry, defaults)
        if config.mode is not None:
            refuse_unseen_weights(graph)
        spec = getattr(source, "spec", None)
        if spec is not None and spec.ignored_scope:
            config = _with_spec_scope(config, spec, graph)
            passes = build_passes(config, registry)
        seconds["trace"] = _lap(start, steps, "passes")
        start = time.perf_counter()
        check = getattr(lowering, "check_formats", None)
        policy = getattr(lowering, "format_policy", None)
        ctx = PassContext(config, check_formats=None if check is None else
                          lambda g: check(g, dict(backend_options or {})),
                          format_policy=None if policy is None else policy(dict(backend_options or {}), config),
                          task=getattr(source, "task", None))
        if config.keep:
            stored = getattr(frontend, "stored_weights", None)
            if stored is None:
                raise QCompilerError(f"the {frontend.name} frontend reads no stored codes: --weight-format keep needs a "
                                     "GGUF or a GPTQ / AWQ / auto_round / compressed-tensors checkpoint")
            ctx.stored_weights = stored(source)
        prepared = None
        if lowering is not None and hasattr(lowering, "prepare") and config.dataset is None:
            # lowering's pass-independent work (OpenVINO: the float graph's conversion) beside the passes;
            # not with calibration data, whose passes run the same model's blocks
            prepared = stack.enter_context(lowering.prepare(graph, source, folder.staging, dict(backend_options or {})))
        if config.dataset is not None:
            steps.set_description("calibration data")
            ctx.engine = calibration_engine(frontend, source, graph, config)
            seconds["calibration_data"] = time.perf_counter() - start
            start = time.perf_counter()
        results = PassManager(passes).run(graph, ctx, progress=steps)
        seconds["passes"] = time.perf_counter() - start

        compressed = CompressedModel(graph, source, frontend, config, results, registry, seconds, defaults=defaults)
        if ctx.engine is not None:
            compressed.calibration = {**ctx.engine.data.describe(), "blocks": len(ctx.engine.blocks),
                                      "block_forwards": ctx.engine.block_forwards,
                                      "statistics_cache": ctx.engine.cache.events if ctx.engine.cache else None,
                                      "method": "block by block, statistics reduced over tokens as they stream by"}
            ctx.engine = None  # its cached block inputs and the passes' statistics go before lowering
            gc.collect()
            memory.trim()
        if folder is not None:
            compressed.write(folder, backend, progress=steps, backend_options=backend_options, prepared=prepared)
    return compressed


def calibration_engine(frontend, source, graph: Graph, config: CompressionConfig):
    """The calibration data and the engine that runs the source model on it, block by block."""
    from qcompiler import calibration
    from qcompiler.engine import CalibrationEngine

    executor = frontend.executor(source, graph)  # compress() checked that the frontend has one
    num_samples, seqlen = config.samples
    data = calibration.load(config.dataset, getattr(source, "tokenizer", None), num_samples, seqlen,
                            generate=getattr(executor, "generate", None),
                            sentences=getattr(source, "is_encoder", False))
    cache = None
    if config.statistics_path is not None:
        from qcompiler.statistics_cache import StatisticsCache, weights_digest

        method = getattr(executor, "method", {})
        cache = StatisticsCache(Path(config.statistics_path), weights_digest(graph), data.digest(), method)
    return CalibrationEngine(executor, data, cache=cache)


def _with_spec_scope(config: CompressionConfig, spec, graph: Graph) -> CompressionConfig:
    """`config` with the model spec's ignored-scope patterns added, those that match a node of this
    model (a spec describes a family, whose variants may lack a part): never an error of the user's."""
    names = [n.name for n in graph.nodes] + [n.attrs["weight"] for n in graph.weight_constants()]
    found = tuple(p for p in spec.ignored_scope if any(re.match(p, name) for name in names))
    if not found:
        return config
    scope = config.ignored_scope
    return dataclasses.replace(config, ignored_scope=dataclasses.replace(scope, patterns=scope.patterns + tuple(
        p for p in found if p not in scope.patterns)))


def _set_pad_token_id(source, pad_token_id: int) -> None:
    config = getattr(source.model, "config", None)
    if config is None or not hasattr(config, "pad_token_id"):
        raise QCompilerError(f"--pad-token-id sets a transformers model's config; this {type(source.model).__name__} "
                             "has none: drop --pad-token-id")
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(pad_token_id, int) or pad_token_id < 0 or (isinstance(vocab, int) and pad_token_id >= vocab):
        raise QCompilerError(f"--pad-token-id {pad_token_id} is not a token of this model (vocabulary {vocab}): pass "
                             "an id below the vocabulary size")
    config.pad_token_id = pad_token_id
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else None
    if text is not None and text is not config and hasattr(text, "pad_token_id"):
        text.pad_token_id = pad_token_id
    generation = getattr(source.model, "generation_config", None)
    if generation is not None:  # runtimes read it there first (onnxruntime-genai's config, openvino_genai)
        generation.pad_token_id = pad_token_id


def _decide_format(graph: Graph, config: CompressionConfig, registry: Registry, defaults):
    """No weight format given: int8_asym for a model of at least `config.int8_above` parameters,
    float below (optimum-intel's rule, which counts every float constant)."""
    params = parameter_counts(graph)["total"]
    mode = Mode.INT8_ASYM if params >= config.int8_above else None
    config = config.replace(mode=mode, int8_above=None)
    if defaults is not None:
        defaults.applied += f"; this model has {params} parameters: {mode.value if mode else 'float'}"
    return config, build_passes(config, registry)


def check_task(task: str | None) -> None:
    if task is not None and task not in TASKS:
        raise QCompilerError(f"task {task!r} is not one qcompiler writes: pass one of {', '.join(TASKS)}, or None "
                             "to read it from the model's config")


def _check_backend(backend, config: CompressionConfig, options: dict) -> None:
    takes = getattr(backend, "activation_modes", ())  # the --quant-mode values it lowers to integer kernels
    if config is not None and config.quant_mode is not None and config.quant_mode not in takes:
        from qcompiler import pass_options

        where = [n for n, b in pass_options.installed().backends.items()
                 if config.quant_mode in getattr(b, "activation_modes", ())]
        raise QCompilerError(f"the {backend.name} backend has no integer kernels for --quant-mode {config.quant_mode}: "
                             f"use --backend {' or '.join(where) or 'another backend'}, or drop --quant-mode")
    check = getattr(backend, "check", None)
    if check is not None:
        check(config, options)
    elif options:
        raise QCompilerError(f"the {backend.name} backend takes no options ({', '.join(options)}): drop them")


def build_passes(config: CompressionConfig, registry: Registry) -> list:
    """The pipeline's passes that run under `config`: the default ones, with `extra_passes` and passes
    switched on in `config.passes` that are not among them after precision assignment and data-free
    AWQ, before the passes that fit weights to data (and so before round to nearest). The switched-on passes'
    declared options and rules are checked against `registry` first (plugin passes included)."""
    from qcompiler import pass_options

    typed = pass_options.validate(config, registry)
    pass_options.refuse_without_data(pass_options.needing_data(typed, registry), config.dataset)
    config = config.replace(passes={**dict(config.passes), **{k: v for k, v in typed.items() if k in config.passes}})
    names = list(DEFAULT_PIPELINE)
    extra = [n for n in dict.fromkeys((*config.extra_passes, *typed)) if n not in names]
    names[names.index("awq_data"):names.index("awq_data")] = extra  # before any pass fits weights to data
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


def _lap(start: float, steps, next_step: str) -> float:
    steps.update(1)
    steps.set_description(next_step)
    return time.perf_counter() - start
