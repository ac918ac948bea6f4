"""The small protocols a frontend and a backend implement."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from qcompiler.config import LoadOptions
from qcompiler.ir import Graph


class Runner(Protocol):
    """Something that maps token ids [batch, seq] to logits [batch, seq, vocab]."""

    def logits(self, input_ids: np.ndarray) -> np.ndarray: ...


@dataclass
class Repeat:
    """A model whose `layers` transformer blocks are alike, offered to an exporter that would rather
    convert a few blocks and repeat one of them than trace them all (OpenVINO's converter spends
    about 0.17 s per block). `spec` is the export of a copy with only the first `traced` blocks, whose
    small parameters (norms, biases) hold distinct marker values, so that a converter which folds
    one into another constant can still tell which parameter it was: `markers` maps the SHA-1 of a
    marker's float32 bytes to its parameter's name. Block i's parameters are named
    `{prefix}.{i}.<name>` in the export module; `tensor(name)` returns the real model's tensor of any
    of them, read when called."""

    spec: ExportSpec
    traced: int
    layers: int
    prefix: str
    tensor: Any  # Callable[[str], torch.Tensor]
    markers: dict[str, str]


@dataclass
class ExportSpec:
    """How a backend that traces a torch module (OpenVINO's PyTorch frontend, the ONNX exporter) calls
    it: a source's `export_spec()` gives it, so backends need no frontend's code.

    `module(*args)` returns the outputs named `output_names`; `cache` pairs each past-cache input
    with the present output that updates it (empty for a model without a KV cache); `past_shapes`
    gives each past input's fixed dimensions ([batch, heads, length, head_dim] with heads and head_dim
    fixed); `weight_prefix` is what exported weight names carry before the IR's names; `model_info`
    holds the facts runtimes' own config files need (onnxruntime-genai's genai_config.json)."""

    module: Any
    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    cache: list[tuple[str, str]] = field(default_factory=list)
    past_shapes: list[tuple[int, int]] = field(default_factory=list)
    weight_prefix: str = ""
    model_info: dict = field(default_factory=dict)  # model_type, vocab_size, hidden_size, heads, token ids, ...
    # () -> Repeat | None: the alike blocks an exporter may repeat instead of tracing each (built on
    # demand: it costs a short forward of a truncated copy, which exporters that trace it all skip)
    repeat: Any = None


class Source(Protocol):
    """A loaded model as a frontend holds it. Backends read these attributes, nothing else."""

    model: Any  # the framework's model object (for the torch frontend, an nn.Module)
    path: Path | None  # where it was loaded from; None for an object passed in
    example_input: dict  # keyword inputs the model was traced with
    tokenizer: Any  # the model's tokenizer, or None
    is_causal_lm: bool  # a text-generation model (KV cache, tokenizer, config)

    def export_spec(self) -> ExportSpec:
        """Optional, for sources a backend may trace again (torch): the module and its signature."""


class BlockExecutor(Protocol):
    """The calibration engine's seam (`qcompiler.engine`): runs the source model block by block.
    A frontend offers one through `executor(source, graph)`; without it, data-aware options are refused."""

    blocks: list  # engine.Block: each transformer block's name and the IR weight names inside it

    def first_inputs(self, samples: list) -> list:
        """Run the model on each sample (1-D token ids) up to its first block; return what that block
        receives, one opaque entry per sample."""

    def run(self, block, inputs: list, weights: dict, taps: dict) -> list:
        """Run `block` on `inputs` (from `first_inputs` or the previous `run`) with the IR weights in
        `weights` (name -> tensor) replacing the model's, calling `taps[name](x)` with the input x
        of each tapped weight's op; return the next block's inputs."""

    def hidden(self, inputs: list) -> list:
        """Optional, for passes that tune on block outputs (AutoRound): the hidden-state tensor of each
        entry of a block's inputs or outputs. With it, `run(..., grad=True)` records autograd."""

    def select(self, inputs: list, indices: list[int]) -> list:
        """Optional, with `hidden`: the entries of samples `indices` of `inputs` (a mini-batch)."""

    def release(self, block) -> None:
        """Optional: the engine will not run `block` again before the next sweep; the executor may let
        the system drop what it can read back (weights mapped from a file). Never changes a value."""

    def generate(self, num_samples: int, seqlen: int, seed: int) -> list:
        """Optional: `num_samples` token sequences of `seqlen` the model writes itself (`--dataset auto`)."""


class Frontend(Protocol):
    name: str
    default_backend: str  # the backend a model read by this frontend is written to unless told

    def can_load(self, model: Any) -> bool:
        """True if this frontend reads `model` (a path or an object)."""

    def load(self, model: Any, *, example_input: Any = None, options: LoadOptions | None = None) -> Source:
        """Load (or wrap) the model; raise QCompilerError naming the problem on bad input. Honour
        `options` (default LoadOptions()): never run a model's code or unpickle without them."""

    def trace(self, source: Source) -> Graph:
        """The model as an IR graph whose weights are the model's tensors (not copies)."""

    def runner(self, source: Source) -> Runner:
        """Run the original model, for evaluation."""

    def save_companions(self, source: Source, out_dir: Path) -> list[str]:
        """Write config / tokenizer files next to an artifact; return the file names written."""


class Backend(Protocol):
    name: str

    def check(self, config, options: dict) -> None:
        """Optional: refuse, before any work, a config or option this backend cannot express."""

    def lower(self, graph: Graph, source: Source, out_dir: Path, options: dict | None = None) -> dict:
        """Write the artifact for `graph` into the empty folder `out_dir`; return facts for the report
        (at least `files` and `weight_bytes`: weight name -> bytes stored). `options` are the
        backend's own (for ONNX: format, accuracy_level); refuse ones it does not know."""

    def prepare(self, graph: Graph, source: Source, out_dir: Path, options: dict):
        """Optional: a context manager that starts, beside the passes, the part of lowering that does not
        depend on them (OpenVINO: the float graph's conversion, the tokenizer's); `lower` then gets it
        as `prepared=` and must check it is still valid for what the passes did. Called only when no
        pass runs the model (no calibration data); leaving it waits for whatever it started."""

    def can_load(self, path: Path) -> bool:
        """True if `path` is an artifact folder this backend wrote."""

    def runner(self, path: Path) -> Runner:
        """Load an artifact folder for running."""
