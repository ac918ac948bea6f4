"""Calibration data: the token sequences the data-aware passes see.

- a text file: tokenized once (no special tokens), then the first `num_samples` consecutive,
  non-overlapping chunks of `seqlen` tokens, so two tools given the same file see the same samples;
- Python strings (each tokenized and cut to `seqlen`) or token sequences;
- for an encoder, a text file's lines (or the strings) are its sentences: one sample each, with the
  tokenizer's special tokens;
- `auto`: text the model writes itself from random one-token prefixes (NNCF's `generate_text_data`),
  deterministic for a seed; the frontend's executor generates it;
- a `datasets` name, only when the `datasets` library finds it offline.
The data's hash (of the token ids) keys the statistics cache and goes into the report.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qcompiler.errors import QCompilerError

DEFAULT_NUM_SAMPLES = 128  # optimum-cli's default
DEFAULT_SEQLEN = 128
AUTO = "auto"


@dataclass
class CalibrationData:
    samples: list[torch.Tensor]  # each a 1-D int64 tensor of token ids
    source: str  # what it came from, for the report

    @property
    def seqlen(self) -> int:
        return max(len(s) for s in self.samples)

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.samples)

    def digest(self) -> str:
        h = hashlib.sha1()
        for s in self.samples:
            h.update(s.to(torch.int64).numpy().tobytes())
            h.update(b"|")
        return h.hexdigest()

    def describe(self) -> dict:
        return {"source": self.source, "samples": len(self.samples), "seqlen": self.seqlen,
                "tokens": self.tokens, "sha1": self.digest()}


def check_counts(num_samples: int, seqlen: int) -> None:
    if num_samples < 1:
        raise QCompilerError(f"--num-samples {num_samples}: pass at least 1 (optimum-cli's default is 128)")
    if seqlen < 2:
        raise QCompilerError(f"--seqlen {seqlen}: pass at least 2 tokens per sample (such as 128)")


def load(dataset: Any, tokenizer, num_samples: int, seqlen: int, generate=None, seed: int = 0,
         sentences: bool = False) -> CalibrationData:
    """The calibration data `dataset` names: a text file path, `auto`, a list of strings or token
    sequences, or a local `datasets` name. `generate(num_samples, seqlen, seed)` makes `auto` text.
    `sentences` (an encoder's data): each line of a text file, or each string, is one sample with the
    tokenizer's special tokens ([CLS] ... [SEP]), cut to `seqlen`, as an encoder sees its input."""
    check_counts(num_samples, seqlen)
    if isinstance(dataset, (list, tuple)):
        return from_sequences(dataset, tokenizer, num_samples, seqlen, sentences)
    name = str(dataset)
    if name == AUTO:
        if generate is None:
            raise QCompilerError("--dataset auto needs a model that can generate text (a transformers causal LM): "
                                 "pass a text file with --dataset")
        samples = generate(num_samples, seqlen, seed)
        return CalibrationData([torch.as_tensor(s, dtype=torch.int64) for s in samples],
                               f"auto: {num_samples} texts the model generated (seed {seed})")
    path = Path(name)
    if path.is_file():
        return (from_lines if sentences else from_text_file)(path, tokenizer, num_samples, seqlen)
    if sentences:
        raise QCompilerError(f"calibration data for an encoder is a text file of sentences (one per line) or a list "
                             f"of strings; {name} is neither: pass --dataset FILE")
    if path.suffix or "/" in name:
        raise QCompilerError(f"calibration text {name} does not exist: pass a plain-text file or --dataset auto")
    return from_dataset_name(name, tokenizer, num_samples, seqlen)


def check_source(dataset: Any) -> None:
    """Refuse, before the model is loaded, a dataset that cannot be read: a missing file, or a name
    when the `datasets` library is not installed (a cached dataset is looked up after loading)."""
    if dataset is None or isinstance(dataset, (list, tuple)) or str(dataset) == AUTO:
        return
    path = Path(str(dataset))
    if path.is_file():
        return
    if path.suffix or "/" in str(dataset):
        raise QCompilerError(f"calibration text {dataset} does not exist: pass a plain-text file or --dataset auto")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` reads it at import: never the network
    try:
        import datasets  # noqa: F401
    except ImportError:
        raise QCompilerError(f"dataset '{dataset}' is not available offline (qcompiler never downloads, and the "
                             "`datasets` library is not installed): pass a plain-text file with --dataset FILE, or "
                             "--dataset auto to let the model write its own calibration text") from None


def _need_tokenizer(tokenizer, what: str) -> None:
    if tokenizer is None:
        raise QCompilerError(f"{what} needs the model's tokenizer, and this model has none: add the tokenizer files "
                             "to the model folder, or pass token ids from Python")


def from_text_file(path: Path, tokenizer, num_samples: int, seqlen: int) -> CalibrationData:
    _need_tokenizer(tokenizer, f"calibration text {path}")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    need = num_samples * seqlen
    if len(ids) < need:
        raise QCompilerError(
            f"calibration text {path} has {len(ids)} tokens; {num_samples} samples of {seqlen} need {need}: "
            "pass a longer text, or lower --num-samples or --seqlen")
    ids = torch.tensor(ids[:need], dtype=torch.int64)
    return CalibrationData(list(ids.reshape(num_samples, seqlen)),
                           f"{path.name}: the first {num_samples} chunks of {seqlen} tokens")


def from_lines(path: Path, tokenizer, num_samples: int, seqlen: int) -> CalibrationData:
    """An encoder's samples: the first `num_samples` non-empty lines, each tokenized with the special
    tokens and cut to `seqlen` tokens."""
    _need_tokenizer(tokenizer, f"calibration text {path}")
    samples = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                ids = tokenizer(line.strip(), truncation=True, max_length=seqlen)["input_ids"]
                samples.append(torch.tensor(ids, dtype=torch.int64))
                if len(samples) == num_samples:
                    break
    if len(samples) < num_samples:
        raise QCompilerError(f"calibration text {path} has {len(samples)} non-empty lines; --num-samples {num_samples} "
                             "takes one sentence per line: pass a longer file, or lower --num-samples")
    return CalibrationData(samples, f"{path.name}: the first {num_samples} lines, one sample each with the "
                                    f"tokenizer's special tokens, at most {seqlen} tokens")


def from_sequences(items, tokenizer, num_samples: int, seqlen: int, sentences: bool = False) -> CalibrationData:
    samples = []
    for item in list(items)[:num_samples]:
        if isinstance(item, str):
            _need_tokenizer(tokenizer, "calibration strings")
            item = tokenizer(item, add_special_tokens=sentences)["input_ids"]
        ids = torch.as_tensor(item, dtype=torch.int64).reshape(-1)[:seqlen]
        if len(ids) >= 2:
            samples.append(ids)
    if not samples:
        raise QCompilerError("the calibration list has no sample of at least 2 tokens: pass longer texts")
    return CalibrationData(samples, f"{len(samples)} sequences given from Python")


def from_dataset_name(name: str, tokenizer, num_samples: int, seqlen: int) -> CalibrationData:
    _need_tokenizer(tokenizer, f"dataset {name}")
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        try:
            data = datasets.load_dataset(name, split="train", download_mode="reuse_cache_if_exists")
        except Exception:  # not in the local cache: qcompiler never downloads
            data = None
        if data is not None:
            column = next((c for c in ("text", "content", "sentence") if c in data.column_names), None)
            if column is not None:
                text = "\n".join(t for t in data[column][: num_samples * 64] if t)
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(ids) >= num_samples * seqlen:
                    ids = torch.tensor(ids[: num_samples * seqlen], dtype=torch.int64)
                    return CalibrationData(list(ids.reshape(num_samples, seqlen)), f"dataset {name} (local cache)")
    raise QCompilerError(f"dataset '{name}' is not available offline (qcompiler never downloads): pass a plain-text "
                         "file with --dataset FILE, or --dataset auto to let the model write its own calibration text")
