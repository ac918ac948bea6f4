"""The ONNX backend and frontend.

Backend "onnx": `model.onnx` for onnxruntime, with the KV cache as inputs / outputs in optimum's
ORTModelForCausalLM layout (input_ids, attention_mask, position_ids, past_key_values.{i}.key|value
-> logits, present.{i}.key|value), compressed MatMuls as MatMulNBits (see lower.py), next to the
model's config and tokenizer files.

Frontend "onnx": an existing `.onnx` file (or a folder holding `model.onnx`) becomes the IR; the
backend then rewrites only its weights' ops, keeping every other node, input and output.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qcompiler.errors import QCompilerError
from qcompiler.hookspecs import hookimpl

MODEL_FILE = "model.onnx"


class ONNXBackend:
    name = "onnx"
    lowers_epilogues = True  # nodes passes inserted (qcompiler.rewrites)
    activation_modes = ("int8", "int8-dynamic")  # --quant-mode values lowered to integer kernels

    def check(self, config, options: dict) -> None:
        from qcompiler.plugins.onnx.lower import ONNXOptions, check_config

        check_config(config, ONNXOptions.from_dict(options))

    def check_formats(self, graph, options: dict | None = None) -> None:
        """onnxruntime has a kernel for every assigned format (called right after precision assignment)."""
        from qcompiler.plugins.onnx.lower import ONNXOptions, check_formats

        check_formats(graph, ONNXOptions.from_dict(options or {}))

    def lower(self, graph, source, out_dir: Path, options: dict | None = None) -> dict:
        from qcompiler.plugins.onnx import export, lower
        from qcompiler.plugins.onnx.frontend import ONNXSource

        opts = lower.ONNXOptions.from_dict(options or {})
        start = time.perf_counter()
        spec, converted_with = None, set()
        if isinstance(source, ONNXSource):
            model, prefix = source.model, ""
            from qcompiler.rewrites import epilogues

            if epilogues(graph):
                raise QCompilerError("a pass inserted nodes (e.g. LoRA correction's adapters), which reach an imported "
                                     "ONNX model not yet: compress the transformers model instead, or drop that option")
        elif hasattr(source.model, "forward"):
            from qcompiler.rewrites import in_module

            with in_module(source.model, graph) as converted_with:
                model, spec = export.export_float(source, out_dir / MODEL_FILE)
            prefix = spec.weight_prefix
        else:
            raise QCompilerError(f"the onnx backend writes torch or ONNX models, not {type(source.model).__name__}: "
                                 "use --backend openvino for an OpenVINO model")
        exported = time.perf_counter()
        facts: dict = {}
        weight_bytes = lower.apply_weights(model, graph, prefix, opts, converted_with, facts)
        applied = time.perf_counter()
        files = export.save(model, out_dir / MODEL_FILE)
        if spec is not None and spec.cache:
            from qcompiler.plugins.onnx.genai import write_genai_config

            write_genai_config(spec, MODEL_FILE, out_dir)  # a config, not model bytes
        seconds = {"export": exported - start, "apply_weights": applied - exported,
                   "save": time.perf_counter() - applied}
        return {"files": files, "weight_bytes": weight_bytes, "seconds": seconds, **facts}

    def can_load(self, path: Path) -> bool:
        return (Path(path) / MODEL_FILE).is_file()

    def runner(self, path: Path):
        return ONNXRunner(Path(path) / MODEL_FILE)


def session(path: Path):
    """An onnxruntime CPU session; a corrupt or truncated file is a one-line error."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / RuntimeException types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise QCompilerError(f"onnxruntime cannot load {path}: {first} -- re-export the model or pass "
                             "another file") from None


FED = ("input_ids", "attention_mask", "position_ids", "token_type_ids")  # the inputs `feed` fills from token ids


def empty_cache(inputs: dict, batch: int) -> dict[str, np.ndarray]:
    """A zero-length KV cache for the session inputs `inputs` (name -> NodeArg) named past_key_values.*."""
    cache = {}
    for name, info in inputs.items():
        if name.startswith("past_key_values."):
            shape = info.shape  # [batch, kv_heads, past, head_dim]
            cache[name] = np.zeros((batch, shape[1], 0, shape[3]), np.float16 if "float16" in info.type else np.float32)
    return cache


def feed(inputs: dict, ids: np.ndarray, cache: dict, past_len: int = 0) -> dict[str, np.ndarray]:
    """The session's feed for token ids [batch, T] after `past_len` cached tokens: the ids, the cache, and
    where the model takes them an all-ones attention mask, positions past_len.. and zero token types."""
    total = past_len + ids.shape[1]
    out = {"input_ids": ids, **cache}
    if "attention_mask" in inputs:
        out["attention_mask"] = np.ones((ids.shape[0], total), np.int64)
    if "position_ids" in inputs:
        out["position_ids"] = np.broadcast_to(np.arange(past_len, total), ids.shape).astype(np.int64)
    if "token_type_ids" in inputs:
        out["token_type_ids"] = np.zeros_like(ids)
    return out


@dataclass
class ONNXRunner:
    """Full-sequence logits (an empty cache per call) and token-by-token generation with the KV cache."""

    path: Path
    sess: Any = None

    def __post_init__(self) -> None:
        self.sess = session(self.path)
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        return self._step(ids, self._empty_cache(ids.shape[0]), 0)[0]

    def _empty_cache(self, batch: int) -> dict[str, np.ndarray]:
        return empty_cache(self.inputs, batch)

    def _step(self, ids: np.ndarray, cache: dict, past_len: int):
        out = dict(zip(self.outputs, self.sess.run(None, feed(self.inputs, ids, cache, past_len))))
        present = {name: out[name.replace("past_key_values.", "present.")] for name in self.past}
        return out[self.outputs[0]], present

    def generate(self, input_ids: list[int], max_new_tokens: int, next_token, eos_token_id=None) -> list[int]:
        if not self.past:
            raise QCompilerError(f"{self.path} has no past_key_values inputs, so it is not a text-generation "
                                 "model: export it with its KV cache (optimum's text-generation-with-past)")
        ids = list(input_ids)
        new, cache = np.array([ids], np.int64), self._empty_cache(1)
        for _ in range(max_new_tokens):
            logits, cache = self._step(new, cache, len(ids) - new.shape[1])
            ids.append(next_token(logits[0, -1]))
            if ids[-1] == eos_token_id:
                break
            new = np.array([[ids[-1]]], np.int64)
        return ids[len(input_ids):]


@hookimpl
def qcompiler_register_backends():
    return [ONNXBackend()]


@hookimpl
def qcompiler_register_frontends():
    from qcompiler.plugins.onnx.frontend import ONNXFrontend

    return [ONNXFrontend()]
