"""auto-round's side of benchmarks/autoround_compare.py, run in .venv-clients (auto-round 0.16.1 beside
transformers 5.24 and torch 2.13 CPU): quantize a transformers folder with the given calibration token
chunks and settings, save it in the auto_round format, print one JSON line.

    python autoround_worker.py FOLDER SAMPLES.npy OUT BITS ITERS BATCH LR
"""

import json
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

folder, samples_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
bits, iters, batch, lr = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7])
seed = int(sys.argv[8]) if len(sys.argv) > 8 else 42
start = time.perf_counter()
from auto_round import AutoRound  # noqa: E402

model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
tokenizer = AutoTokenizer.from_pretrained(folder)
samples = np.load(samples_path)
dataset = [torch.from_numpy(row.astype(np.int64))[None] for row in samples]  # the very same token chunks
loaded = time.perf_counter()
kwargs = {"lr": lr} if lr > 0 else {}
ar = AutoRound(model, tokenizer=tokenizer, bits=bits, group_size=64, sym=True, iters=iters, nsamples=len(samples),
               seqlen=samples.shape[1], batch_size=batch, dataset=dataset, device_map="cpu", seed=seed, **kwargs)
begin = time.perf_counter()
ar.quantize()
quantized = time.perf_counter()
ar.save_quantized(out, format="auto_round")
saved = time.perf_counter()
import auto_round  # noqa: E402

print(json.dumps({"seconds": quantized - begin, "load_seconds": loaded - start, "save_seconds": saved - quantized,
                  "setup_seconds": begin - loaded, "version": auto_round.__version__}), flush=True)
