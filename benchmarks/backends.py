"""The three backends side by side on SmolLM2-135M: fp32 / int8 / int4 artifacts in OpenVINO,
onnxruntime and torch, each measured against the fp32 artifact of the same runtime, same run.

    python benchmarks/backends.py [--windows 8] [--decode-tokens 128] [--backends openvino,onnx,torch]

For each backend and weight format (fp32 = the float model in that backend's format):
- prefill seconds: logits for one sequence of 512 tokens of WikiText-2 (fresh cache), median of 5
  after one warm-up;
- decode tokens/s: batch 1, greedy, a 16-token prompt; (N new tokens) / (time to generate N + 1
  tokens - time to generate 1), so the prompt's prefill is not counted; the formats of one backend
  are measured in interleaved rounds (the host's load falls on all alike), best of 3 rounds;
- artifact size: the bytes of the model files (OpenVINO .xml + .bin, model.onnx, model.safetensors);
- perplexity: HF sliding-window method, windows of 512, the first `--windows` windows.
It also compresses the fp32 OpenVINO and ONNX artifacts again through the OpenVINO and ONNX
frontends with the int4 config and checks that every code equals the torch frontend's.
Writes benchmarks/results/backends.json with the ratios and whether each bar of issue 3 is met.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
RESULTS = ROOT / "benchmarks" / "results"

FORMATS = {
    "fp32": {"mode": None},
    "int8": {"mode": "int8_asym"},
    "int4": {"mode": "int4_sym", "group_size": 64},
}
MODEL_FILES = {"openvino": ("openvino_model.xml", "openvino_model.bin"), "onnx": ("model.onnx", "model.onnx_data"),
               "torch": ("model.safetensors",)}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(runner, ids: np.ndarray, args) -> dict:
    from qcompiler.evaluate import perplexity

    prefill_ids = ids[None, : args.prefill]
    runner.logits(prefill_ids)  # warm-up
    prefill = statistics.median(timed(lambda: runner.logits(prefill_ids)) for _ in range(5))
    ppl = perplexity(runner, ids, window=512, stride=512, max_windows=args.windows, desc="perplexity")
    return {"prefill_seconds": prefill, "perplexity": ppl["perplexity"], "tokens_scored": ppl["tokens_scored"]}


def decode_speeds(runners: dict, ids: np.ndarray, args) -> dict:
    """Decode tokens/s of each runner, measured in interleaved rounds (fp32, int8, int4, fp32, ...) so
    that the load of a shared host falls on every format alike; the best round of each counts."""
    from qcompiler.generate import token_chooser

    prompt, greedy = ids[1000:1016].tolist(), token_chooser()
    best = {fmt: 0.0 for fmt in runners}
    for _ in range(args.rounds):
        for fmt, runner in runners.items():
            first = timed(lambda: runner.generate(prompt, 1, greedy))
            full = timed(lambda: runner.generate(prompt, args.decode_tokens + 1, greedy))
            best[fmt] = max(best[fmt], args.decode_tokens / (full - first))
    return best


def identical(want: dict, got: dict) -> bool:
    return want.keys() == got.keys() and all(
        (a is None and got[key] is None) or (a is not None and got[key] is not None and a.same_codes(got[key]))
        for key, a in want.items())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved decode rounds; the best counts")
    parser.add_argument("--backends", default="openvino,onnx,torch")
    parser.add_argument("--output", default=str(RESULTS / "backends.json"))
    args = parser.parse_args()

    from qcompiler import CompressionConfig, compress
    from qcompiler.evaluate import read_text_ids
    from qcompiler.quant import compressed_by_content
    from qcompiler.registry import build_registry

    registry = build_registry()
    frontend = registry.frontends["torch"]
    source = frontend.load(frontend.default_model())
    ids = read_text_ids(source.tokenizer, WIKITEXT)
    backends = args.backends.split(",")
    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends:
            runners = {}
            for fmt, spec in FORMATS.items():
                out = Path(tmp) / f"{backend}-{fmt}"
                seconds = timed(lambda: compress(source.model, CompressionConfig(**spec), output=out, backend=backend))
                runners[fmt] = registry.backend(backend).runner(out)
                row = {"compress_seconds": seconds,
                       "artifact_bytes": sum((out / f).stat().st_size for f in MODEL_FILES[backend] if (out / f).exists())}
                row.update(measure(runners[fmt], ids, args))
                rows[f"{backend}/{fmt}"] = row
            for fmt, speed in decode_speeds(runners, ids, args).items():
                rows[f"{backend}/{fmt}"]["decode_tokens_per_second"] = speed
                print(backend, fmt, json.dumps(rows[f"{backend}/{fmt}"]), flush=True)
            del runners

        frontends = {}
        int4 = CompressionConfig(**FORMATS["int4"])
        want = compressed_by_content(compress(source.model, int4).graph)
        for backend, file in (("openvino", "openvino_model.xml"), ("onnx", "model.onnx")):
            if backend in backends:
                got = compressed_by_content(compress(Path(tmp) / f"{backend}-fp32" / file, int4).graph)
                frontends[backend] = {"weights": len(got), "compressed": sum(v is not None for v in got.values()),
                                      "bit_identical_to_torch_frontend": identical(want, got)}
                print("frontend", backend, frontends[backend], flush=True)

    for key, row in rows.items():
        backend, fmt = key.split("/")
        base = rows[f"{backend}/fp32"]
        row["decode_speedup_vs_fp32"] = row["decode_tokens_per_second"] / base["decode_tokens_per_second"]
        row["prefill_speedup_vs_fp32"] = base["prefill_seconds"] / row["prefill_seconds"]
        row["size_ratio_vs_fp32"] = row["artifact_bytes"] / base["artifact_bytes"]
        if "openvino/" + fmt in rows:
            row["perplexity_ratio_vs_openvino"] = row["perplexity"] / rows["openvino/" + fmt]["perplexity"]
    bars = {}
    for backend, need in (("openvino", 2.0), ("onnx", 2.0), ("torch", 1.3)):
        if f"{backend}/int4" in rows:
            bars[f"{backend} int4 decode >= {need}x fp32"] = rows[f"{backend}/int4"]["decode_speedup_vs_fp32"] >= need
    for key, row in rows.items():
        if "perplexity_ratio_vs_openvino" in row and not key.startswith("openvino/"):
            bars[f"{key} perplexity within 1% of openvino"] = abs(row["perplexity_ratio_vs_openvino"] - 1) <= 0.01
    for backend, r in frontends.items():
        bars[f"{backend} frontend codes bit-identical"] = r["bit_identical_to_torch_frontend"]

    result = {
        "model": str(frontend.default_model()), "machine": f"{torch.get_num_threads()} torch threads",
        "method": __doc__.split("\n\n", 2)[2].strip(), "formats": FORMATS, "rows": rows,
        "frontends": frontends, "bars": bars,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2, default=str))
    print("\n| backend/format | prefill 512 s | decode tok/s | decode x fp32 | size bytes | size x fp32 | ppl | ppl / OV |")
    print("|---|---|---|---|---|---|---|---|")
    for key, r in rows.items():
        print(f"| {key} | {r['prefill_seconds']:.3f} | {r['decode_tokens_per_second']:.1f} | "
              f"{r['decode_speedup_vs_fp32']:.2f} | {r['artifact_bytes']} | {r['size_ratio_vs_fp32']:.3f} | "
              f"{r['perplexity']:.4f} | {r.get('perplexity_ratio_vs_openvino', float('nan')):.4f} |")
    for name, ok in bars.items():
        print(f"{'MET ' if ok else 'NOT MET'}  {name}")
    print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
