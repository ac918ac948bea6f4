"""The ONNX frontend's side of the calibration engine: an ONNX model runs whole, as one block.

onnxruntime runs a copy of the model whose graph also outputs the activation input of every tapped
MatMul weight; each calibration sample is fed alone (input_ids, and where the model takes them an
all-ones attention_mask, position_ids 0..T-1, zero token_type_ids and an empty KV cache), and the
taps see those tensors. Nothing is replaced in the model while it runs, so the passes this executor
serves are the ones that only read statistics of the float model: SmoothQuant and static activation
quantization (the frontend's `calibration_passes`). A pass that would run the model with rewritten
weights (AWQ's search, GPTQ's propagation) is refused before any work (`qcompiler.pipeline`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from qcompiler.engine import Block
from qcompiler.errors import QCompilerError
from qcompiler.plugins.onnx import FED, empty_cache, feed, session
from qcompiler.plugins.onnx.onnxgraph import GraphIndex

MODEL_BLOCK = "model"
PROTO_LIMIT = 1 << 30  # larger models go to onnxruntime through a file with external data (protobuf's 2 GB cap)


class ONNXExecutor:
    """`BlockExecutor` for an ONNX model (see `qcompiler.protocols`): one block, the whole model."""

    attention_taps = False

    def __init__(self, model: onnx.ModelProto, path: Path, weight_names: list[str]) -> None:
        self.model, self.path = model, path
        self.blocks = [Block(MODEL_BLOCK, list(weight_names))]
        index = GraphIndex(model.graph)
        self.inputs_of: dict[str, str] = {}  # IR weight name -> the ONNX tensor its MatMul multiplies
        for name, uses in index.weights().items():
            for use in uses:
                if use.node.op_type == "MatMul":
                    self.inputs_of.setdefault(name, use.node.input[0])
        self.method = {"executor": "onnx-whole-model-1"}
        self._session_of: tuple[tuple, object] | None = None  # (output tensors, the session that has them)

    def first_inputs(self, samples: list[torch.Tensor]) -> list[np.ndarray]:
        return [np.asarray(s, dtype=np.int64).reshape(1, -1) for s in samples]

    def run(self, block: Block, inputs: list, weights: dict, taps: dict) -> list:
        if weights:
            raise QCompilerError("an ONNX model runs on calibration data only as it is: a pass that runs it with "
                                 "rewritten weights (AWQ's search, GPTQ) needs the transformers model")
        tensors = tuple(sorted({self.inputs_of[n] for n in taps if n in self.inputs_of}))
        if not tensors:
            return inputs
        sess = self._session(tensors)
        names = _fillable({i.name: i for i in sess.get_inputs()})
        for ids in inputs:
            values = dict(zip(tensors, sess.run(list(tensors), feed(names, ids, empty_cache(names, ids.shape[0])))))
            seen = {t: torch.from_numpy(v) for t, v in values.items()}  # one object per tensor: q/k/v share stats
            for name, tap in taps.items():
                if name in self.inputs_of:
                    tap(seen[self.inputs_of[name]])
        return inputs

    def _session(self, tensors: tuple):
        if self._session_of is None or self._session_of[0] != tensors:
            model, outputs = self.model, self.model.graph.output
            count, known = len(outputs), {o.name for o in outputs}
            self._session_of = None  # one at a time: each holds the model's weights
            # the extra outputs go on the model itself while it is written (no second copy of its weights)
            outputs.extend(onnx.helper.make_empty_tensor_value_info(t) for t in tensors if t not in known)
            try:
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "calibration.onnx"
                    if model.ByteSize() < PROTO_LIMIT:
                        path.write_bytes(model.SerializeToString())
                    else:
                        calibration = onnx.ModelProto()
                        calibration.CopyFrom(model)
                        onnx.save(calibration, str(path), save_as_external_data=True,
                                  location="calibration.onnx.data")
                    self._session_of = (tensors, session(path))
            finally:
                del outputs[count:]
        return self._session_of[1]


def _fillable(inputs: dict) -> dict:
    """The session inputs, checked to be ones `feed` fills from token ids (and an empty KV cache)."""
    for name in inputs:
        if name not in FED and not name.startswith("past_key_values."):
            raise QCompilerError(f"the ONNX model's input {name!r} is not one the calibration run can fill (input_ids, "
                                 "attention_mask, position_ids, token_type_ids, past_key_values.*): start from the "
                                 "transformers model, or use --quant-mode int8-dynamic (no data)")
    if "input_ids" not in inputs:
        raise QCompilerError("the ONNX model has no input_ids input, so calibration text cannot be fed to it: use "
                             "--quant-mode int8-dynamic (no data)")
    return inputs
