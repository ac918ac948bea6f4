"""Run in the clients' venv: quantize a transformers folder with auto-round 0.16.1 (round to nearest, no
data needed) and export it in the formats auto-round writes (auto_round, auto_gptq, auto_awq,
llm_compressor), one folder each under OUT/SCHEME; then load each with transformers and print `RESULT {json}`
with its logits for `ids`, so a reader of these formats can be checked against the writer's own loader.
SCHEMES is sym, asym or both (sym,asym: one process, one import of auto-round).

    python autoround_export.py FOLDER OUT SCHEMES '[ids]'
"""

import json
import os
import shutil
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from auto_round import AutoRound  # noqa: E402

folder, out_root, schemes, ids = sys.argv[1], sys.argv[2], sys.argv[3].split(","), json.loads(sys.argv[4])
formats = ["auto_round", "auto_gptq", "auto_awq", "llm_compressor"]
for scheme in schemes:
    sym, out = scheme == "sym", os.path.join(out_root, scheme)
    for fmt in formats:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ar = AutoRound(model, tokenizer=tokenizer, bits=4, group_size=32, sym=sym, iters=0, disable_opt_rtn=True,
                       dataset=[torch.tensor([ids])], nsamples=1, seqlen=len(ids), device_map="cpu")
        staging = os.path.join(out, fmt + "_staging")
        ar.quantize_and_save(staging, format=fmt)
        entries = os.listdir(staging)  # auto-round writes into a subfolder named after the model and scheme
        inner = os.path.join(staging, entries[0]) if len(entries) == 1 and os.path.isdir(
            os.path.join(staging, entries[0])) else staging
        shutil.move(inner, os.path.join(out, fmt))
        shutil.rmtree(staging, ignore_errors=True)
        kwargs = {}
        if fmt == "llm_compressor" and not sym:
            from transformers import CompressedTensorsConfig

            kwargs["quantization_config"] = CompressedTensorsConfig(run_compressed=False)
        loaded = AutoModelForCausalLM.from_pretrained(os.path.join(out, fmt), device_map="cpu", **kwargs)
        with torch.no_grad():
            logits = loaded(torch.tensor([ids])).logits[0].float()
        print("RESULT " + json.dumps({"scheme": scheme, "format": fmt, "logits": logits.tolist()}), flush=True)
