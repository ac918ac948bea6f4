"""`qcompiler eval | generate | graph`: the commands that read an artifact or a model and print.

`qcompiler.cli` parses the arguments and turns errors into one line; these run the command.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from qcompiler.cli import at_least, load_options_from_args, say
from qcompiler.errors import QCompilerError
from qcompiler.output_checks import read_json


def eval_command(args) -> int:
    from qcompiler.evaluate import perplexity, read_text_ids
    from qcompiler.registry import build_registry

    artifact = Path(args.artifact)
    if not artifact.is_dir():
        raise QCompilerError(f"artifact folder {artifact} does not exist: pass the folder `qcompiler compress -o` wrote")
    _refuse_encoder(artifact, "qcompiler eval measures a causal LM's perplexity")
    context = _context_length(artifact)
    if args.window is None:
        args.window = min(512, context or 512)
    at_least(args.window, 2, "--window", "a window needs at least 2 tokens (512 is the usual)")
    at_least(args.stride, 1, "--stride", "pass a stride between 1 and --window")
    if args.stride is None:
        args.stride = args.window
    at_least(args.max_windows, 1, "--max-windows", "pass a positive number of windows, or drop it for all")
    if args.stride > args.window:
        raise QCompilerError(f"--stride {args.stride} is above --window {args.window}, which would skip text: "
                             "pass a stride of at most the window")
    if not Path(args.text).is_file():
        raise QCompilerError(f"text file {args.text} does not exist or is not a file: pass --text with a plain-text file")
    if context and args.window > context:
        raise QCompilerError(f"--window {args.window} exceeds the model's context of {context} tokens: pass a window "
                             f"of at most {context}")
    registry = build_registry()
    backend = registry.backend_for_artifact(artifact)
    original = None if args.no_original else (args.original or _recorded_source(artifact))
    tokenizer = _artifact_tokenizer(artifact)
    ids = read_text_ids(tokenizer, args.text)
    opts = {"window": args.window, "stride": args.stride, "max_windows": args.max_windows}
    reference = None
    if original:  # loaded first: a bad original is an error now, not after scoring the artifact
        frontend = registry.frontend_for(original)
        reference = frontend.runner(frontend.load(original, options=load_options_from_args(args, registry)))
    results = {"compressed": perplexity(backend.runner(artifact), ids, desc="compressed", **opts)}
    if reference is not None:
        results["original"] = perplexity(reference, ids, desc="original", **opts)
    try:
        staged = artifact / ".qcompiler_eval.json.tmp"
        staged.unlink(missing_ok=True)
        staged.write_text(json.dumps(results, indent=2))
        os.replace(staged, artifact / "qcompiler_eval.json")  # replaces a link itself, never what it points to
    except OSError as exc:
        logging.getLogger("qcompiler").warning("could not save qcompiler_eval.json in %s: %s", artifact, exc.strerror)
    say(f"perplexity on {args.text}: {results['compressed']['tokens_scored']} tokens, windows of {args.window} "
          f"every {args.stride} tokens (Hugging Face sliding-window method)")
    for name, r in results.items():
        say(f"  {name:<11} {r['perplexity']:.4f}")
    if "original" in results:
        delta = 100 * (results["compressed"]["perplexity"] / results["original"]["perplexity"] - 1)
        say(f"  change      {delta:+.2f}%")
    return 0


def _context_length(artifact: Path) -> int | None:
    config = read_json(artifact / "config.json", {})
    for name in ("max_position_embeddings", "n_positions", "seq_length", "max_seq_len"):
        value = config.get(name)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _recorded_source(artifact: Path) -> str | None:
    """The original model the artifact's report names; an error if it is gone."""
    from qcompiler.report import REPORT_FILE

    source = read_json(artifact / REPORT_FILE, {}).get("source")
    if not isinstance(source, str) or not source:
        return None
    if not Path(source).exists():
        raise QCompilerError(f"the original model recorded in {artifact / REPORT_FILE} ({source}) does not exist "
                             "here: pass --original MODEL, or --no-original to evaluate the artifact alone")
    return source


def generate_command(args) -> int:
    from qcompiler.generate import token_chooser
    from qcompiler.registry import build_registry

    artifact = Path(args.artifact)
    if not artifact.is_dir():
        raise QCompilerError(f"artifact folder {artifact} does not exist: pass the folder `qcompiler compress -o` wrote")
    _refuse_encoder(artifact, "qcompiler generate writes text with a causal LM")
    at_least(args.max_new_tokens, 1, "--max-new-tokens", "ask for at least one new token")
    at_least(args.top_k, 1, "--top-k", "sample among at least one token")
    at_least(args.seed, 0, "--seed", "pass a seed of 0 or above")
    if not args.temperature > 0:
        raise QCompilerError(f"--temperature {args.temperature} is not above 0: pass a positive temperature such as "
                             "0.8, or drop --sample for greedy decoding")
    runner = build_registry().backend_for_artifact(artifact).runner(artifact)
    tokenizer = _artifact_tokenizer(artifact)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise QCompilerError("the prompt is not valid UTF-8 text: pass --prompt with text in your terminal's "
                             "encoding") from None
    ids = tokenizer(args.prompt).input_ids
    if not ids:
        raise QCompilerError("the prompt is empty (no tokens): pass --prompt with some text")
    choose = token_chooser(args.sample, args.temperature, args.top_k, args.seed)
    new = runner.generate(ids, args.max_new_tokens, choose, tokenizer.eos_token_id)
    say(args.prompt + tokenizer.decode(new, skip_special_tokens=True))
    return 0


def _refuse_encoder(artifact: Path, what: str) -> None:
    """One line for an encoder's artifact (its config.json's architectures say which task it is for)."""
    from qcompiler.tasks import CAUSAL, task_of

    config = read_json(artifact / "config.json", {})
    try:
        task = task_of(config) if config else CAUSAL
    except QCompilerError:
        return
    if task != CAUSAL:
        raise QCompilerError(f"{what}; {artifact} is a {task} model: run it with its runtime (OpenVINO, "
                             "onnxruntime, or optimum's ORTModel / OVModel classes)")


def _artifact_tokenizer(artifact: Path):
    from transformers import AutoTokenizer

    gguf = sorted(p.name for p in artifact.glob("*.gguf")) if not (artifact / "tokenizer_config.json").is_file() else []
    try:  # a GGUF artifact carries its tokenizer inside the file
        return AutoTokenizer.from_pretrained(artifact, trust_remote_code=False, **({"gguf_file": gguf[0]} if gguf else {}))
    except Exception as exc:  # the tokenizer loaders raise many types on damaged files
        raise QCompilerError(f"no tokenizer in {artifact} ({type(exc).__name__}): compress from a model folder "
                             "that has one, or copy its tokenizer files into the artifact") from None


def graph_command(args) -> int:
    from qcompiler.pipeline import resolve_model
    from qcompiler.registry import build_registry

    registry = build_registry()
    model = resolve_model(args.model, registry)
    frontend = registry.frontend_for(model)
    graph = frontend.trace(frontend.load(model, options=load_options_from_args(args, registry)))
    if args.full:
        say(graph.to_text())
        return 0
    for use in graph.weight_uses():
        say(f"{use.op.name:<48} {use.op.op:<12} weight {use.const.name} {list(graph.tensor(use.const).shape)}")
    return 0
