"""The torch frontend: transformers models (folders, GGUF folders, loaded objects) and plain nn.Modules."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qcompiler.config import LoadOptions
from qcompiler.errors import QCompilerError
from qcompiler import tasks
from qcompiler.hookspecs import hookimpl
from qcompiler.ir import Graph
from qcompiler.plugins.torch import encoder, hf, kvcache
from qcompiler.protocols import ExportSpec
from qcompiler.plugins.torch.experts import dense_experts
from qcompiler.plugins.torch.trace import trace_module


@dataclass
class TorchSource:
    model: torch.nn.Module
    path: Path | None
    example_input: dict[str, torch.Tensor]
    tokenizer: Any = None
    gguf: str | None = None
    info: dict = field(default_factory=dict)
    lazy: tuple | None = None  # (placeholders {parameter name: file key}, reader): see lazy.py
    spec: Any = None  # the family's qcompiler.model_spec.ModelSpec, when a plugin registered one
    codes: dict | None = None  # a quantized checkpoint's codes (checkpoints.read), for --weight-format keep
    task: str = tasks.CAUSAL  # optimum's task name: a causal LM, or an encoder (tasks.ENCODER_TASKS)

    @property
    def block_path(self) -> str | None:
        return self.spec.block_path if self.spec is not None else None

    @property
    def is_causal_lm(self) -> bool:
        return self.task == tasks.CAUSAL and hasattr(self.model, "generation_config") and hasattr(self.model, "config")

    @property
    def is_encoder(self) -> bool:
        return self.task in tasks.ENCODER_TASKS

    def export_spec(self) -> ExportSpec:
        if self.is_causal_lm:
            return kvcache.export_spec(self.model, block_path=self.block_path)
        if self.is_encoder:
            return encoder.export_spec(self.model, self.example_input, self.task)
        names = list(self.example_input)
        dynamic = {n: {d: f"{n}_{d}" for d in range(t.dim() - 1)} for n, t in self.example_input.items()}
        return ExportSpec(self.model, tuple(self.example_input.values()), names, [], dynamic)


class TorchFrontend:
    name = "torch"
    default_backend = "openvino"

    def default_model(self) -> Path:
        return hf.default_model_path()

    def can_load(self, model: Any) -> bool:
        if isinstance(model, torch.nn.Module):
            return True
        return isinstance(model, (str, Path)) and hf.is_hf_folder(Path(model))

    def load(self, model: Any, *, example_input: Any = None, options: LoadOptions | None = None) -> TorchSource:
        options = options or LoadOptions()
        source = self._load(model, example_input, options)
        config = getattr(source.model, "config", None)
        source.spec = options.model_specs.get(getattr(config, "model_type", None))
        return source

    def _load(self, model: Any, example_input: Any, options: LoadOptions) -> TorchSource:
        if isinstance(model, torch.nn.Module):
            model.eval()
            if hasattr(model, "generation_config"):
                model.config.use_cache = False
                return TorchSource(model, None, example_input or hf.example_inputs())
            if _is_pretrained(model) and example_input is None:  # a transformers encoder object
                task = tasks.task_of_class(type(model).__name__, model.config.model_type)
                if options.task not in (None, "auto") and tasks.task_of(None, options.task) != task:
                    raise QCompilerError(f"a {type(model).__name__} object is a model for {task}, not --task "
                                         f"{options.task}: drop the task, or load the model with its class")
                if task in tasks.ENCODER_TASKS:
                    return TorchSource(model, None, encoder.example_inputs(model), task=task)
            if example_input is None:
                raise QCompilerError(
                    f"a plain {type(model).__name__} needs an example input to trace: "
                    "pass example_input=(tensor, ...) or a dict of keyword tensors"
                )
            return TorchSource(model, None, _as_kwargs(model, example_input))
        folder = Path(model)
        module, tokenizer, gguf, lazy, codes, task = hf.load_causal_lm(folder, options)
        example = hf.example_inputs() if task == tasks.CAUSAL else encoder.example_inputs(module, tokenizer)
        return TorchSource(module, folder, example, tokenizer, gguf, lazy=lazy, codes=codes, task=task)

    def trace(self, source: TorchSource) -> Graph:
        with dense_experts(source.model):  # MoE experts as MatMuls on their batched weights
            outputs = [tasks.OUTPUTS[source.task]] if source.is_encoder else None
            graph = trace_module(source.model, source.example_input, type(source.model).__name__, outputs)
        if source.lazy is not None:
            _lazy_weights(graph, source)
        graph.owns_weights = source.path is not None  # loaded here from a folder or file: rewrites go in place
        return graph

    def runner(self, source: TorchSource):
        return TorchRunner(source.model)

    def stored_weights(self, source: TorchSource) -> dict:
        """{weight name: CompressedWeight, or why its codes cannot be kept} of an already-quantized input
        (a GGUF of GGML block types, a GPTQ / AWQ / auto_round / compressed-tensors checkpoint); {} for a
        float model."""
        if source.codes is not None:
            return source.codes
        if source.gguf and source.path is not None:
            from qcompiler.plugins.torch.stored import gguf_weights

            return gguf_weights(Path(source.path) / source.gguf, source.model)
        return {}

    def executor(self, source: TorchSource, graph: Graph):
        """The calibration engine's block executor (see `qcompiler.protocols.BlockExecutor`)."""
        from qcompiler.plugins.torch.blocks import TorchBlockExecutor

        if not source.is_causal_lm and not source.is_encoder:
            raise QCompilerError(f"calibration runs transformers causal LMs and encoders block by block; a plain "
                                 f"{type(source.model).__name__} cannot take --dataset yet: drop the data-aware options")
        names = [c.attrs["weight"] for c in graph.parameter_constants()]
        return TorchBlockExecutor(source.model, names, source.tokenizer, source.block_path)

    def save_companions(self, source: TorchSource, out_dir: Path) -> list[str]:
        if not source.is_causal_lm and not source.is_encoder:
            return []
        return hf.save_companions(source.model, source.tokenizer, out_dir)


class TorchRunner:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        inputs = {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "position_ids": torch.arange(ids.shape[1])[None].expand_as(ids),
        }
        with torch.no_grad():
            return self.model(**inputs).logits.float().numpy()


def _lazy_weights(graph: Graph, source: TorchSource) -> None:
    """The IR's weight-bearing placeholders read their values from the files; any other placeholder
    (one the IR does not take over, or also reads through another op, whose result an exporter would
    fold from the zeros) gets its real values in the module now."""
    from qcompiler.plugins.torch.lazy import materialize

    placeholders, reader = source.lazy
    readers = graph.consumers()
    bearing = {const.attrs["weight"] for const, uses in graph.uses_by_weight().items()
               if set(readers[const]) == {use.op for use in uses}}  # read as a weight and in no other way
    graph.placeholders = {name for name in placeholders if name in bearing}
    graph.weight_source = lambda name: reader.read(placeholders[name])
    graph.stored_source = lambda name: reader.read_stored(placeholders[name])
    params = dict(source.model.named_parameters(remove_duplicate=False))
    in_ir = {id(params[name]) for name in graph.placeholders}
    rest = [name for name in placeholders if id(params[name]) not in in_ir]
    materialize(params, placeholders, reader, rest)  # in place: the IR's tensors share the storage


def _is_pretrained(model) -> bool:
    from transformers import PreTrainedModel

    return isinstance(model, PreTrainedModel)


def _as_kwargs(module: torch.nn.Module, example_input) -> dict[str, torch.Tensor]:
    if isinstance(example_input, dict):
        return dict(example_input)
    if isinstance(example_input, torch.Tensor):
        example_input = (example_input,)
    names = list(inspect.signature(module.forward).parameters)
    return dict(zip(names, example_input))


@hookimpl
def qcompiler_register_frontends():
    return [TorchFrontend()]
