"""The files that travel next to a model file: its config and tokenizer, for frontends that read a
model file (ONNX, OpenVINO) rather than a transformers folder."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

COMPANIONS = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
    "openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml", "openvino_detokenizer.bin",
)


def copy_companions(folder: Path, out_dir: Path, skip: tuple[str, ...] = ()) -> list[str]:
    """Copy the companions present in `folder` into `out_dir`, except `skip`; return their names."""
    copied = []
    for name in COMPANIONS:
        if name not in skip and (folder / name).is_file() and not (out_dir / name).exists():
            if not _stays_inside(folder, folder / name):
                logging.getLogger("qcompiler").warning(
                    "not copying %s: it links outside the model folder (%s)", name, os.path.realpath(folder / name))
                continue
            shutil.copy2(folder / name, out_dir / name)
            copied.append(name)
    return copied


def _stays_inside(folder: Path, path: Path) -> bool:
    """A companion is the model's own file: inside its folder, or for a Hugging Face cache snapshot
    (`snapshots/<rev>/name -> ../../blobs/<hash>`) inside that repository's blobs; a link elsewhere
    (`/etc/passwd`) would carry a stranger's file into the artifact."""
    real, base = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    if base in real.parents:
        return True
    return base.parent.name == "snapshots" and (base.parent.parent / "blobs") in real.parents


def load_tokenizer(folder: Path):
    """The transformers tokenizer saved in `folder`, or None."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception:  # a tokenizer that does not load is not worth failing the compression for
        logging.getLogger("qcompiler").warning("the tokenizer files in %s do not load; continuing without", folder)
        return None
