"""W8A8 in OpenVINO: MatMuls on u8 activations kept apart (qcompiler's default) against fused with their
neighbours reading the same input (q/k/v, gate/up: one FullyConnected and a split), in one run.

    python benchmarks/w8a8_fusion.py [--num-samples 32] [--rounds 4]

Method: each model compressed twice in this process with `--quant-mode int8`,
`qcompiler.plugins.openvino.lower.FUSE_ACTIVATED` False and True, then timed in `--rounds` interleaved
rounds (3 timed calls per round after a warm-up), median:
- SmolLM2-135M, alpha 0.8, the first `--num-samples` chunks of 128 tokens of WikiText-2 valid
  (`nncf_data_aware.calibration_ids`); a 512-token prefill (logits for every position);
- all-MiniLM-L6-v2 (`w8a8_encoder.py`'s model), the first 128 non-empty WikiText-2 lines as sentences;
  a batch of 32 x 128 tokens.
Writes benchmarks/results/w8a8_fusion.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nncf_data_aware import WIKITEXT, calibration_ids  # noqa: E402
from w8a8 import _cpu  # noqa: E402
from w8a8_encoder import BATCH, LENGTH, Runtime, encode, lines, model_folder  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--output", type=Path, default=RESULTS / "w8a8_fusion.json")
    args = parser.parse_args()

    import qcompiler.plugins.openvino.lower as lower
    from qcompiler import CompressionConfig, compress
    from qcompiler.plugins.openvino import OpenVINORunner
    from qcompiler.plugins.torch import TorchFrontend

    from transformers import AutoTokenizer

    frontend = TorchFrontend()
    source = frontend.load(frontend.default_model())
    samples = [[int(t) for t in s] for s in calibration_ids(source.tokenizer, WIKITEXT, args.num_samples, 128)]
    prompt = np.asarray([t for s in samples for t in s][:512], np.int64)[None]
    feeds = encode(AutoTokenizer.from_pretrained(model_folder()), lines(300, skip=128), LENGTH)
    ids = np.concatenate([f["input_ids"][0] for f in feeds])[:BATCH * LENGTH].reshape(BATCH, LENGTH)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}

    def prefill(path: Path):
        runner = OpenVINORunner(path)
        return lambda: runner.logits(prompt)

    def encode_batch(path: Path):
        runtime = Runtime(path)
        return lambda: runtime.run(batch)

    cases = {  # name -> (model, config, artifact path -> the call timed)
        "smollm2_prefill_512": (source.model, CompressionConfig(quant_mode="int8", dataset=samples,
                                                                smooth_quant_alpha=0.8), prefill),
        "minilm_batch_32x128": (str(model_folder()), CompressionConfig(quant_mode="int8", dataset=lines(128)),
                                encode_batch),
    }
    result = {"method": __doc__.strip(), "machine": _cpu(), "seconds": {}, "fused_over_apart": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case, (model, config, timer) in cases.items():
            calls = {}
            for name in ("apart", "fused"):
                lower.FUSE_ACTIVATED = name == "fused"
                compress(model, config, output=Path(tmp) / case / name)
                calls[name] = timer(Path(tmp) / case / name / "openvino_model.xml")
            lower.FUSE_ACTIVATED = False
            times = {name: [] for name in calls}
            for _ in range(args.rounds):
                for name, call in calls.items():
                    call()
                    for _ in range(3):
                        start = time.perf_counter()
                        call()
                        times[name].append(time.perf_counter() - start)
            result["seconds"][case] = {name: float(np.median(t)) for name, t in times.items()}
            result["fused_over_apart"][case] = result["seconds"][case]["fused"] / result["seconds"][case]["apart"]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "method"}, indent=1))


if __name__ == "__main__":
    main()
