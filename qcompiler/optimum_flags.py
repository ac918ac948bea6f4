"""`optimum-cli export openvino`'s options on `qcompiler compress`: the same spelling and meaning,
or a one-line refusal that says why and what to use instead.

Kept apart from cli.py so the table of what is supported reads in one place (README, "optimum-cli
flags", mirrors it).
"""

from __future__ import annotations

from qcompiler import tasks
from qcompiler.errors import QCompilerError

DATA_AWARE = "is not implemented yet"
# flag -> why it is refused today; each takes a value unless listed in SWITCHES
NOT_YET = {
    "--variant": "model variants are not read; pass the folder of the variant you want",
    "--cache_dir": "qcompiler reads local folders only and never downloads a model",
}
SWITCHES = ()
TASKS = (*tasks.TASKS, "text-generation")  # text-generation: refused below with its reason


def add_optimum_flags(parser) -> None:
    """The optimum-cli options qcompiler maps, and those it names but refuses (see NOT_YET)."""
    parser.add_argument("-m", "--model", dest="model_flag", metavar="MODEL",
                        help="the model, as optimum-cli spells it; a positional argument is then the output folder")
    parser.add_argument("--task", help="text-generation-with-past (a stateful model with its KV cache), "
                        "feature-extraction or text-classification (encoders); by default read from the model's "
                        "config.json architectures, as optimum-cli does")
    parser.add_argument("--framework", choices=["pt"], help="accepted for optimum-cli compatibility (torch only)")
    parser.add_argument("--library", choices=["transformers"], help="accepted for optimum-cli compatibility")
    parser.add_argument("--backup-precision", choices=["none", "int8_sym", "int8_asym"],
                        help="optimum-cli's name for --backup-mode")
    parser.add_argument("--disable-stateful", action="store_true",
                        help="OpenVINO: the KV cache as model inputs and outputs (past_key_values.N.key/value in, "
                             "present.N.key/value out) instead of model state, as optimum-cli writes it with this flag")
    parser.add_argument("--disable-convert-tokenizer", action="store_true",
                        help="OpenVINO: no openvino_tokenizer.xml / openvino_detokenizer.xml (openvino_genai needs "
                             "them; optimum-intel does not)")
    parser.add_argument("--pad-token-id", type=int, help="the pad token id written into the model's config")
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
                             "(text-generation-with-past) and encoders (feature-extraction, text-classification); "
                             "drop --task")
    if args.task == "text-generation":
        raise QCompilerError("--task text-generation (no KV cache) is not supported: qcompiler writes "
                             "text-generation-with-past, which optimum-intel and openvino_genai run; drop --task")
    if args.model_flag is not None:
        if args.model is not None and args.output is not None:
            raise QCompilerError(f"two outputs: {args.model} and -o {args.output}: pass one of them")
        args.output = args.output if args.model is None else args.model
        args.model = args.model_flag
    for flag, on in (("--disable-stateful", args.disable_stateful),
                     ("--disable-convert-tokenizer", args.disable_convert_tokenizer)):
        if on and args.backend not in (None, "openvino"):
            raise QCompilerError(f"{flag} is an option of the OpenVINO output: drop it with --backend {args.backend}")
        if on and _exported(args.model_flag or args.model):
            raise QCompilerError(f"{flag} shapes the OpenVINO model qcompiler converts from a transformers model; an "
                                 "ONNX or OpenVINO input keeps its own layout and files: drop it")
    if args.backup_precision is not None:
        if args.backup_mode is not None:
            raise QCompilerError("--backup-precision and --backup-mode say the same thing: pass one of them")
        args.backup_mode = args.backup_precision


def _exported(model) -> bool:
    """An ONNX or OpenVINO model (file or folder), not a transformers one."""
    from pathlib import Path

    if model is None:
        return False
    path = Path(model)
    if path.suffix in (".onnx", ".xml"):
        return True
    return path.is_dir() and ((path / "openvino_model.xml").is_file() or (path / "model.onnx").is_file())
