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

    # The artifact needs only OpenVINO (and the tokenizer files saved next to it). It is stateful:
    # the KV cache lives in the model's state, so each step feeds only the new token.
    tokenizer = AutoTokenizer.from_pretrained(out)
    request = ov.Core().compile_model(out / "openvino_model.xml", "CPU").create_infer_request()
    request.reset_state()
    ids = tokenizer("The capital of France is").input_ids
    new = ids
    for _ in range(8):  # greedy
        logits = request.infer({
            "input_ids": np.array([new]), "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(len(ids) - len(new), len(ids))[None], "beam_idx": np.array([0], np.int32),
        })["logits"]
        ids = ids + [int(logits[0, -1].argmax())]
        new = ids[-1:]
    print("generated:", tokenizer.decode(ids))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/example-int4"))
