"""Perplexity on a text file, computed the way the Hugging Face perplexity guide computes it.

The text is tokenized once; windows of `window` tokens start every `stride` tokens; each window
scores only the tokens the previous window did not (all of them when stride == window), each
token predicted from the tokens before it in its window; perplexity = exp(total NLL / scored tokens).
Both models see the same windows.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from qcompiler.errors import QCompilerError


def read_text_ids(tokenizer, text_file: str | Path) -> np.ndarray:
    path = Path(text_file)
    if not path.is_file():
        raise QCompilerError(f"text file {path} does not exist: pass --text with a plain-text file")
    text = path.read_text(encoding="utf-8", errors="replace")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise QCompilerError(f"text file {path} has fewer than 2 tokens: pass a longer text")
    return np.asarray(ids, dtype=np.int64)


def windows(n_tokens: int, window: int, stride: int, max_windows: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, scored) for each window; `scored` counts the last tokens of the window to score."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        scored = min(end - prev_end, end - begin - 1)
        if scored > 0:
            out.append((begin, end, scored))
        prev_end = end
        if end == n_tokens or (max_windows and len(out) >= max_windows):
            break
    return out


def perplexity(runner, ids: np.ndarray, window: int = 512, stride: int = 512,
               max_windows: int | None = None, desc: str = "perplexity", progress: bool = True) -> dict:
    nll, count = 0.0, 0
    spans = windows(len(ids), window, stride, max_windows)
    for begin, end, scored in tqdm(spans, desc=desc, disable=not progress, unit="window"):
        chunk = ids[begin:end]
        logits = runner.logits(chunk[None])[0, :-1].astype(np.float64)
        targets = chunk[1:]
        logits, targets = logits[-scored:], targets[-scored:]
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
        nll += float((log_z - logits[np.arange(scored), targets]).sum())
        count += scored
    return {"perplexity": math.exp(nll / count), "tokens_scored": count, "windows": len(spans),
            "window": window, "stride": stride}
