"""The statistics cache (`--quantization-statistics-path DIR`, optimum-cli's name).

The float model's statistics depend only on the model's weights, the calibration data and what
was collected, so they are stored under a key of the three: DIR/<key>/key.json (what the key was
made of, readable) and one file per block. A later run with the same key reads them and runs no
block; another model, other data or another request makes another key, so statistics are never
reused for what they were not collected on. Sweeps whose blocks run on compressed weights (GPTQ
feeds each block the compressed blocks before it) are not cached.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from qcompiler.errors import QCompilerError

FIELDS = ("tokens", "abs_sum", "abs_max", "min", "max", "hessian", "hessian_blocks", "row_chunks", "sequence", "top", "bottom")


def weights_digest(graph) -> str:
    """sha1 of every parameter's name, shape, dtype and bytes."""
    h = hashlib.sha1()
    for const in graph.parameter_constants():
        t = graph.weight(const).detach().contiguous()
        h.update(f"{const.attrs['weight']}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class StatisticsCache:
    def __init__(self, folder: Path, weights: str, data: str, method: dict | None = None) -> None:
        self.folder, self.weights, self.data = Path(folder), weights, data
        self.method = method or {}  # how the executor computes (precision, batching): part of the key
        self.events: list[str] = []
        if self.folder.exists() and not self.folder.is_dir():
            raise QCompilerError(f"--quantization-statistics-path {folder} is a file: pass a folder")

    def _key(self, wanted: dict, max_rows: int) -> tuple[str, dict]:
        material = {"version": 2, "weights_sha1": self.weights, "data_sha1": self.data, "max_rows": max_rows,
                    "method": self.method,
                    "statistics": {name: sorted(kinds) for name, kinds in sorted(wanted.items())}}
        return hashlib.sha1(json.dumps(material, sort_keys=True).encode()).hexdigest()[:16], material

    def lookup(self, wanted: dict, max_rows: int, blocks: list[str]):
        """A function block name -> statistics when every block is stored under this key, else None."""
        key, _ = self._key(wanted, max_rows)
        entry = self.folder / key
        if not all((entry / f"{name}.pt").is_file() for name in blocks):
            others = [p.name for p in self.folder.glob("*/key.json")] if self.folder.is_dir() else []
            self.events.append("collected (statistics of another model, data or request are stored there: not reused)"
                               if others else "collected")
            return None
        self.events.append(f"reused from {entry}")

        def read(name: str) -> dict:
            path = entry / f"{name}.pt"
            try:
                stored = torch.load(path, weights_only=True)
                out = {}
                for weight, fields in stored.items():
                    from qcompiler.engine import InputStats

                    out[weight] = InputStats(**{k: fields[k] for k in FIELDS if k in fields})
                return out
            except Exception as exc:  # a truncated or foreign file
                raise QCompilerError(f"statistics cache file {path} cannot be read ({type(exc).__name__}): delete "
                                     f"{entry} and run again") from None

        return read

    def writer(self, wanted: dict, max_rows: int) -> _Writer:
        key, material = self._key(wanted, max_rows)
        return _Writer(self.folder / key, material)


class _Writer:
    """Writes a key's blocks into a staging folder, moved in place when every block is written."""

    def __init__(self, entry: Path, material: dict) -> None:
        self.entry, self.material = entry, material
        self.staging = entry.with_name(entry.name + ".partial")
        if self.staging.exists():
            shutil.rmtree(self.staging)  # a run stopped half-way; only qcompiler writes *.partial here
        self.staging.mkdir(parents=True)

    def save(self, name: str, stats: dict) -> None:
        stored, seen = {}, {}
        for weight, st in stats.items():
            stored[weight] = seen.setdefault(id(st), {k: getattr(st, k) for k in FIELDS})
        torch.save(stored, self.staging / f"{name}.pt")

    def close(self) -> None:
        (self.staging / "key.json").write_text(json.dumps(self.material, indent=1))
        if self.entry.exists():
            shutil.rmtree(self.entry)
        self.staging.rename(self.entry)
