"""`optimum-cli export openvino`'s options on `qcompiler compress`: the same spelling and meaning,
or a one-line refusal that says why and what to use instead.

Kept apart from cli.py so the table of what is supported reads in one place (README, "optimum-cli
flags", mirrors it).
"""

from __future__ import annotations

from qcompiler.errors import QCompilerError

DATA_AWARE = "is not implemented yet"
# flag -> why it is refused today; each takes a value unless listed in SWITCHES
NOT_YET = {
    "--quant-mode": "activation quantization is not implemented yet; compress the weights with --weight-format",
    "--smooth-quant-alpha": "SmoothQuant (activation quantization) is not implemented yet",
    "--disable-stateful": "qcompiler writes the stateful KV-cache model optimum-intel and openvino_genai load; a "
                          "stateless export is not implemented",
    "--pad-token-id": "the model's own config sets it; editing config.json is not implemented",
    "--variant": "model variants are not read; pass the folder of the variant you want",
    "--cache_dir": "qcompiler reads local folders only and never downloads a model",
    "--disable-convert-tokenizer": "the OpenVINO tokenizer models are always written (openvino_genai needs them)",
}
SWITCHES = ("--disable-stateful", "--disable-convert-tokenizer")
TASKS = ("text-generation-with-past", "text-generation", "auto")


def add_optimum_flags(parser) -> None:
    """The optimum-cli options qcompiler maps, and those it names but refuses (see NOT_YET)."""
    parser.add_argument("-m", "--model", dest="model_flag", metavar="MODEL",
                        help="the model, as optimum-cli spells it; a positional argument is then the output folder")
    parser.add_argument("--task", help="text-generation-with-past (the default: a stateful model with its KV cache)")
    parser.add_argument("--framework", choices=["pt"], help="accepted for optimum-cli compatibility (torch only)")
    parser.add_argument("--library", choices=["transformers"], help="accepted for optimum-cli compatibility")
    parser.add_argument("--backup-precision", choices=["none", "int8_sym", "int8_asym"],
                        help="optimum-cli's name for --backup-mode")
    for flag, why in NOT_YET.items():
        if flag in SWITCHES:
            parser.add_argument(flag, action="store_true", help=f"not supported yet: {why}")
        else:
            parser.add_argument(flag, help=f"not supported yet: {why}")


def apply_optimum_flags(args) -> None:
    """Map the optimum spellings onto qcompiler's arguments, or refuse in one line."""
    for flag, why in NOT_YET.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value not in (None, False):
            raise QCompilerError(f"{flag} is not supported yet: {why}")
    if args.task is not None and args.task not in TASKS:
        raise QCompilerError(f"--task {args.task} is not supported: qcompiler writes causal language models "
                             "(text-generation-with-past); drop --task")
    if args.task == "text-generation":
        raise QCompilerError("--task text-generation (no KV cache) is not supported: qcompiler writes "
                             "text-generation-with-past, which optimum-intel and openvino_genai run; drop --task")
    if args.model_flag is not None:
        if args.model is not None and args.output is not None:
            raise QCompilerError(f"two outputs: {args.model} and -o {args.output}: pass one of them")
        args.output = args.output if args.model is None else args.model
        args.model = args.model_flag
    if args.backup_precision is not None:
        if args.backup_mode is not None:
            raise QCompilerError("--backup-precision and --backup-mode say the same thing: pass one of them")
        args.backup_mode = args.backup_precision
