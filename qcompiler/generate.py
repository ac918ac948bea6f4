"""Choosing the next token from logits: greedy, or sampled with temperature and top-k."""

from __future__ import annotations

import numpy as np


def token_chooser(sample: bool = False, temperature: float = 1.0, top_k: int = 50, seed: int = 0):
    """A function logits_row -> token id. Greedy takes the argmax; sampling draws from the softmax of
    logits / temperature restricted to the top_k largest, with a seeded generator."""
    rng = np.random.default_rng(seed)

    def choose(logits: np.ndarray) -> int:
        if not np.isfinite(logits).all():
            from qcompiler.errors import QCompilerError

            raise QCompilerError("the model produced NaN or infinite logits: the artifact is damaged (or its weights "
                                 "overflow); compress the model again")
        if not sample:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / max(temperature, 1e-6)
        k = min(top_k, z.size)
        top = np.argpartition(z, -k)[-k:]
        p = np.exp(z[top] - z[top].max())
        return int(rng.choice(top, p=p / p.sum()))

    return choose
