"""The OpenVINO backend: an `.xml`/`.bin` IR that `openvino.Core()` runs without qcompiler.

A causal LM is written as a stateful model with its KV cache, in optimum-intel's folder layout
(`openvino_model.xml/.bin`, config, tokenizer files, and `openvino_tokenizer.xml` /
`openvino_detokenizer.xml` for openvino_genai), so it generates token by token.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from qcompiler.errors import QCompilerError
from qcompiler.formats import LOW_BIT_FIX, refuse_modes
from qcompiler.hookspecs import hookimpl

MODEL_XML = "openvino_model.xml"
SWITCH_INTERVAL = 0.0005  # seconds: sys.setswitchinterval while lowering's threads run beside the passes
log = logging.getLogger("qcompiler")

# OpenVINO's converter starts usage telemetry when `openvino.tools.ovc` is imported (unless CI=true or
# a consent file says no), from a thread pool that forks: here one such fork deadlocked on a logging
# lock and a finished run hung at exit. With the package unimportable the converter takes its own
# no-op stub; `lower.no_telemetry()` covers a process that imported it before this plugin loaded.
if "openvino_telemetry" not in sys.modules:
    sys.modules["openvino_telemetry"] = None


class OpenVINOBackend:
    name = "openvino"
    lazy_weights = True  # lowering reads placeholder weights' values from the IR (Graph.weight)
    lowers_epilogues = True  # nodes passes inserted (qcompiler.rewrites)
    activation_modes = ("int8",)  # --quant-mode values lowered to integer kernels

    # dq_group_size: a runtime hint written into the model's rt_info, as optimum-intel writes it;
    # stateful (default True) and convert_tokenizer (default True): optimum-cli's --disable-stateful and
    # --disable-convert-tokenizer turn them off
    OPTIONS = ("dq_group_size", "stateful", "convert_tokenizer")

    def check(self, config, options: dict) -> None:
        refuse_modes(config, "openvino", lambda spec: spec.bits in (4, 8), LOW_BIT_FIX)
        unknown = [name for name in options if name not in self.OPTIONS]
        if unknown:
            raise QCompilerError(f"the openvino backend takes no option {', '.join(unknown)}: drop it")
        size = options.get("dq_group_size")
        if size is not None and (not isinstance(size, int) or size < 0):
            raise QCompilerError(f"dq_group_size {size!r} is not a group size: pass a positive integer or 0 (off)")
        for name in ("stateful", "convert_tokenizer"):
            if not isinstance(options.get(name, True), bool):
                raise QCompilerError(f"the openvino backend's option {name} is True or False, not {options[name]!r}")

    def prepare(self, graph, source, out_dir: Path, options: dict) -> Prepared:
        """The tokenizer's conversion and the float model's, each on a thread of its own, while the passes
        run on the main one (see `Prepared`)."""
        return Prepared(source, out_dir, options)

    def lower(self, graph, source, out_dir: Path, options: dict | None = None, prepared: Prepared | None = None) -> dict:
        options = options or {}
        self.check(None, options)
        # not prepared (a model lowered after its passes): the tokenizer's conversion (1.5 s for SmolLM2's)
        # still runs beside the model's, on the second core
        jobs = nullcontext(prepared) if prepared is not None else Prepared(source, out_dir, options, convert=False)
        with jobs as prepared:
            result = self._lower_model(graph, source, out_dir, options, prepared)
            result["files"] += prepared.tokenizer_files()
        return result

    def _lower_model(self, graph, source, out_dir: Path, options: dict, prepared: Prepared) -> dict:
        import openvino as ov

        from qcompiler.plugins.openvino.frontend import OpenVINOSource
        from qcompiler.plugins.openvino.lower import (apply_weights, convert, insert_activation_quantizers,
                                                      insert_attention_quantizers)
        from qcompiler.rewrites import in_module

        start = time.perf_counter()
        converted_with = set()
        early = prepared.model(graph)
        if early is not None:
            (model, prefix, early_seconds), consts = early, None
        elif isinstance(source, OpenVINOSource):
            model, prefix, consts = source.model, "", source.constants
            from qcompiler.rewrites import epilogues

            if epilogues(graph):
                raise QCompilerError("a pass inserted nodes (e.g. LoRA correction's adapters), which reach an imported "
                                     "OpenVINO model not yet: compress the transformers model instead, or drop that option")
        elif _converted(source):
            with in_module(source.model, graph) as converted_with:
                (model, prefix), consts = convert(source, options.get("stateful", True)), None
        else:
            raise QCompilerError(f"the openvino backend converts torch or OpenVINO models, not "
                                 f"{type(source.model).__name__}: use --backend onnx for an ONNX model")
        converted = time.perf_counter()
        keep: list = []  # arrays the new constants share memory with, alive until saved
        fused: dict = {}
        weight_bytes = apply_weights(model, graph, keep, prefix, consts, converted_with, fused)
        quantized = insert_activation_quantizers(model, graph, fused)
        attention = insert_attention_quantizers(model, graph)
        if options.get("dq_group_size") is not None:  # read by the CPU plugin when it compiles the model
            model.set_rt_info(str(options["dq_group_size"]), ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])
        applied = time.perf_counter()
        ov.save_model(model, out_dir / MODEL_XML, compress_to_fp16=False)
        seconds = {"convert": converted - start, "apply_weights": applied - converted,
                   "save": time.perf_counter() - applied}
        if early is not None:  # converted beside the passes: "convert" is only the wait for it
            seconds["convert_beside_passes"] = early_seconds
        files = [MODEL_XML, MODEL_XML.replace(".xml", ".bin")]
        facts = {"files": files, "weight_bytes": weight_bytes, "seconds": seconds}
        if quantized:
            facts["activations_quantized"] = quantized  # the IR weights whose MatMuls run on u8 activations
        if attention:
            facts["attention_quantized"] = attention  # the IR attention nodes whose query and key are u8
        return facts

    def can_load(self, path: Path) -> bool:
        return (Path(path) / MODEL_XML).is_file()

    def runner(self, path: Path):
        return OpenVINORunner(Path(path) / MODEL_XML)


class Prepared:
    """Lowering's work that no pass result changes, started before the passes on threads of its own:
    the tokenizer's conversion, and the float model's (`lower.convert`: tracing, OpenVINO's
    conversion, 2-3 s), which on two cores overlap the passes' quantization. The float model stays
    valid when the passes rewrote no parameter the conversion reads and inserted no node (the rewritten
    weights of weight-bearing ops are replaced when lowering, as always); otherwise `model()` says so and
    the model is converted again with the passes' changes. Leaving the context waits for both threads.
    With `convert=False` only the tokenizer's conversion runs (a model lowered after its passes)."""

    def __init__(self, source, out_dir: Path, options: dict, convert: bool = True) -> None:
        self._jobs = []
        self._conversion = None
        if convert and _converted(source):
            self._conversion = Background(_convert_early, source, options.get("stateful", True))
            self._jobs.append(self._conversion)
        tokenizer = getattr(source, "tokenizer", None) if options.get("convert_tokenizer", True) else None
        self._tokenizer = Background(write_tokenizer_models, tokenizer, out_dir) if tokenizer is not None else None
        if self._tokenizer is not None:
            self._jobs.append(self._tokenizer)

    def __enter__(self) -> Prepared:
        # the passes' thread takes the GIL back after each kernel call; with the default 5 ms switch
        # interval it waits that long for the converter's thread each time
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._interval, SWITCH_INTERVAL))
        for job in self._jobs:
            job.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            for job in self._jobs:
                job.__exit__(*exc)
        finally:
            sys.setswitchinterval(self._interval)

    def model(self, graph):
        """(float ov.Model, weight prefix, seconds it took) converted early, or None when the passes'
        changes need a new conversion (or none was started). Waits for the conversion; raises its error."""
        from qcompiler.rewrites import epilogues, rewritten_params

        if self._conversion is None:
            return None
        if rewritten_params(graph) or epilogues(graph):
            self._conversion.wait()  # done with the module before it is converted again (its error is moot)
            log.debug("the passes rewrote parameters the float graph reads: converting it again")
            return None
        return self._conversion.result()

    def tokenizer_files(self) -> list[str]:
        return self._tokenizer.result() if self._tokenizer is not None else []


def _converted(source) -> bool:
    """True for a source whose float graph OpenVINO's converter makes (a torch module); an imported
    OpenVINO model is lowered into as it is."""
    from qcompiler.plugins.openvino.frontend import OpenVINOSource

    return not isinstance(source, OpenVINOSource) and hasattr(source.model, "forward")


def _convert_early(source, stateful: bool):
    from qcompiler.plugins.openvino.lower import convert

    start = time.perf_counter()
    model, prefix = convert(source, stateful)
    return model, prefix, time.perf_counter() - start


class Background:
    """`fn(*args)` on a thread from entering the block; leaving it (normally or by an exception)
    waits for the thread, so nothing is still being written when the caller cleans up a failed
    output folder. `result()` returns fn's value or raises its exception."""

    def __init__(self, fn, *args) -> None:
        self._fn, self._args, self._value, self._error = fn, args, None, None
        self._thread = threading.Thread(target=self._run, name=f"qcompiler-{fn.__name__}", daemon=True)

    def _run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:  # handed to the caller's thread by result()
            self._error = exc

    def __enter__(self) -> Background:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        interrupted = None
        while self._thread.is_alive():  # a signal during the wait must not cut it short
            try:
                self._thread.join()
            except KeyboardInterrupt as caught:
                interrupted = caught
        if interrupted is not None:
            raise interrupted

    def wait(self) -> None:
        self._thread.join()

    def result(self):
        self.wait()
        if self._error is not None:
            raise self._error
        return self._value


def write_tokenizer_models(tokenizer, out_dir: Path) -> list[str]:
    """openvino_tokenizer.xml / openvino_detokenizer.xml, which openvino_genai needs."""
    try:
        import openvino as ov
        from openvino_tokenizers import convert_tokenizer
    except ImportError:
        log.warning("openvino-tokenizers is not installed: no openvino_tokenizer.xml (openvino_genai needs it)")
        return []
    tok, detok = convert_tokenizer(tokenizer, with_detokenizer=True)
    ov.save_model(tok, out_dir / "openvino_tokenizer.xml")
    ov.save_model(detok, out_dir / "openvino_detokenizer.xml")
    return ["openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml", "openvino_detokenizer.bin"]


# f32 activations, not quantized on the fly, and an f32 KV cache: where the CPU has AMX / AVX512
# (VNNI, BF16) the CPU plugin's defaults are bf16 activations, int8 dynamic quantization of a
# compressed MatMul's input (groups of 32) and a u8 KV cache, which would make perplexity, logits
# and greedy tokens depend on the machine (measured on the tiny test model: 0.7-1% of the logit
# range instead of 4e-7, and a 14-token decode 2e-3 off from the first token). Compressed weights
# still run compressed. Speed measurements may pass the plugin's defaults (config={}).
RUNNER_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0", "KV_CACHE_PRECISION": "f32"}


def openvino_reason(exc: BaseException) -> str:
    """The informative line of an OpenVINO exception (its first lines name only the C++ source)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Exception from", "Check '", "[ ", "Traceback"))]
    return ((useful or lines or ["unreadable"])[0])[:200]


def check_ir_xml(xml: Path, what: str, fix: str) -> None:
    """The .xml must be XML whose root is <net> before OpenVINO sees it: on anything else OpenVINO
    tries its other frontends, and TensorFlow's prints parse errors of its own on stderr."""
    import xml.etree.ElementTree as ET

    try:
        root = None
        for event, element in ET.iterparse(str(xml), events=("start", "end")):
            if root is None:
                root = element.tag
                if root != "net":
                    raise QCompilerError(f"{what} {xml}: not an OpenVINO IR (its root element is <{root[:40]}>) "
                                         f"-- {fix}")
            elif event == "end":
                element.clear()
    except ET.ParseError as exc:
        raise QCompilerError(f"{what} {xml}: not an OpenVINO IR (not XML: {exc}) -- {fix}") from None
    except OSError as exc:
        raise QCompilerError(f"{what} {xml}: {exc.strerror} -- {fix}") from None


class OpenVINORunner:
    """Runs an artifact: full-sequence logits (a fresh cache per call) and greedy/sampled generation,
    with f32 activations on every CPU (`RUNNER_CONFIG`), so figures compare across machines."""

    def __init__(self, xml: Path, config: dict | None = None) -> None:
        import openvino as ov

        check_ir_xml(xml, "OpenVINO cannot load", "the artifact is damaged (a truncated .bin or an edited .xml); "
                     "compress the model again")
        try:
            self.compiled = ov.Core().compile_model(str(xml), "CPU", RUNNER_CONFIG if config is None else config)
        except RuntimeError as exc:
            raise QCompilerError(f"OpenVINO cannot load {xml}: {openvino_reason(exc)} -- the artifact is damaged (a "
                                 "truncated .bin or an edited .xml); compress the model again") from None
        self.input_names = {i.get_any_name() for i in self.compiled.inputs}
        self.stateful = "beam_idx" in self.input_names
        # a stateless export (--disable-stateful): the past cache as inputs, [batch, heads, past, head_dim]
        self.past = {i.get_any_name(): i.get_partial_shape() for i in self.compiled.inputs
                     if i.get_any_name().startswith("past_key_values.")}
        self.cache: dict[str, np.ndarray] = {}
        self.request = self.compiled.create_infer_request()

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        self._reset(ids.shape[0])
        return self._step(ids, np.ones_like(ids), np.broadcast_to(np.arange(ids.shape[1]), ids.shape))

    def _reset(self, batch: int) -> None:
        if self.stateful:
            self.request.reset_state()
        if any(shape.rank.get_length() != 4 or shape[1].is_dynamic or shape[3].is_dynamic
               for shape in self.past.values()):
            raise QCompilerError("this stateless OpenVINO model's past inputs have no fixed [batch, heads, past, "
                                 "head_dim] layout, so qcompiler cannot feed it an empty cache")
        self.cache = {name: np.zeros((batch, shape[1].get_length(), 0, shape[3].get_length()), np.float32)
                      for name, shape in self.past.items()}

    def _step(self, ids, mask, positions, carry: bool = False) -> np.ndarray:
        feed = {"input_ids": ids, **self.cache}
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = mask
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.ascontiguousarray(positions, dtype=np.int64)
        if self.stateful:
            feed["beam_idx"] = np.arange(ids.shape[0], dtype=np.int32)
        result = self.request.infer(feed)
        if self.past and carry:  # present.N.* become the next call's past_key_values.N.*
            self.cache = {f"past_key_values.{out.get_any_name()[len('present.'):]}": result[out].copy()
                          for out in self.compiled.outputs if out.get_any_name().startswith("present.")}
        return result[0]

    def generate(self, input_ids: list[int], max_new_tokens: int, next_token, eos_token_id=None) -> list[int]:
        """Token ids after the prompt; `next_token(logits_row) -> id` chooses each one."""
        if not self.stateful and not self.past:
            raise QCompilerError("this OpenVINO model has no KV cache (state or past inputs), so it is not a "
                                 "text-generation artifact: compress a transformers causal LM to generate")
        ids = list(input_ids)
        self._reset(1)
        new = np.array([ids], dtype=np.int64)
        for _ in range(max_new_tokens):
            n = len(ids)
            logits = self._step(new, np.ones((1, n), np.int64), np.arange(n - new.shape[1], n)[None], carry=True)
            ids.append(next_token(logits[0, -1]))
            if ids[-1] == eos_token_id:
                break
            new = np.array([[ids[-1]]], dtype=np.int64)
        self.cache = {}
        return ids[len(input_ids):]


@hookimpl
def qcompiler_register_backends():
    return [OpenVINOBackend()]


@hookimpl
def qcompiler_register_frontends():
    from qcompiler.plugins.openvino.frontend import OpenVINOFrontend

    return [OpenVINOFrontend()]
