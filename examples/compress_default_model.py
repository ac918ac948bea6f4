"""Compress the default model (SmolLM2-135M-Instruct) with the Python API and run it in OpenVINO alone.

    python examples/compress_default_model.py [OUTPUT_FOLDER]
"""

import sys
from pathlib import Path

import numpy as np
import openvino as ov
from transformers import AutoTokenizer

import qcompiler
from qcompiler.report import format_report


def main(out: Path) -> None:
    config = qcompiler.CompressionConfig(mode="int4_sym", group_size=64, awq=True)
    result = qcompiler.compress(None, config, output=out, overwrite=True, progress=True)  # None = default model
    print(format_report(result.report))

    # The artifact needs only OpenVINO (and the tokenizer files saved next to it).
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = ov.Core().compile_model(out / "openvino_model.xml", "CPU")
    ids = tokenizer("The capital of France is").input_ids
    for _ in range(8):  # greedy, recomputing the prefix: the plain forward has no KV cache
        x = np.array([ids])
        logits = model({"input_ids": x, "attention_mask": np.ones_like(x), "position_ids": np.arange(len(ids))[None]})[0]
        ids.append(int(logits[0, -1].argmax()))
    print("generated:", tokenizer.decode(ids))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/example-int4"))
