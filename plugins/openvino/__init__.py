"""The OpenVINO backend: lowers to an `.xml`/`.bin` IR that `openvino.Core()` runs without qcompiler."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from qcompiler.hookspecs import hookimpl

MODEL_XML = "openvino_model.xml"


class OpenVINOBackend:
    name = "openvino"

    def lower(self, graph, source, out_dir: Path) -> dict:
        import openvino as ov

        from qcompiler.plugins.openvino.lower import apply_weights, convert

        start = time.perf_counter()
        model = convert(source)
        converted = time.perf_counter()
        keep: list = []  # arrays the new constants share memory with
        weight_bytes = apply_weights(model, graph, keep)
        applied = time.perf_counter()
        ov.save_model(model, out_dir / MODEL_XML, compress_to_fp16=False)
        seconds = {"convert": converted - start, "apply_weights": applied - converted,
                   "save": time.perf_counter() - applied}
        return {"files": [MODEL_XML, MODEL_XML.replace(".xml", ".bin")], "weight_bytes": weight_bytes,
                "seconds": seconds}

    def can_load(self, path: Path) -> bool:
        return (Path(path) / MODEL_XML).is_file()

    def runner(self, path: Path):
        return OpenVINORunner(Path(path) / MODEL_XML)


class OpenVINORunner:
    def __init__(self, xml: Path) -> None:
        import openvino as ov

        self.compiled = ov.Core().compile_model(str(xml), "CPU")
        self.input_names = {i.get_any_name() for i in self.compiled.inputs}

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, dtype=np.int64)
        feed = {"input_ids": ids}
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = np.ones_like(ids)
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
        return self.compiled(feed)[0]


@hookimpl
def qcompiler_register_backends():
    return [OpenVINOBackend()]
