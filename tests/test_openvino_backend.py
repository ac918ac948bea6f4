import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qcompiler import CompressionConfig, compress
from qcompiler.output import MARKER
from qcompiler.plugins.openvino import RUNNER_CONFIG, OpenVINORunner
from tests.conftest import tiny_llama

IDS = np.array([[5, 17, 200, 3, 99, 42, 7, 128, 64, 1, 250]], dtype=np.int64)


def reference_logits(model, result) -> np.ndarray:
    """The torch model with every weight replaced by what the artifact decodes to."""
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters(remove_duplicate=False))
    for const in result.graph.weight_constants():
        cw = const.meta.get("compressed")
        value = cw.dequantize() if cw is not None else result.graph.weight(const)
        params[const.attrs["weight"]].data.copy_(value)
    with torch.no_grad():
        return ref(input_ids=torch.from_numpy(IDS)).logits.numpy()


def runtime_layers(xml):
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml), "CPU", RUNNER_CONFIG)
    out = []
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        out.append((info["layerType"].astype(str), info["runtimePrecision"].astype(str)))
    return out


@pytest.mark.parametrize("config,precision", [
    (CompressionConfig(mode="int8_asym"), "u8"),
    (CompressionConfig(mode="int8_sym"), "i8"),
    (CompressionConfig(mode="int4_sym", group_size=32), "i4"),
    (CompressionConfig(mode="int4_asym", group_size=64), "u4"),  # K=96 adjusts to 32
    (CompressionConfig(mode="nf4", group_size=32), "nf4"),
    (CompressionConfig(mode="mxfp4"), "f4e2m1"),
    (CompressionConfig(mode="int4_sym", group_size=32, awq=True, backup_mode="none"), "i4"),
])
def test_artifact_decodes_exactly_and_fuses(tmp_path, config, precision):
    model = tiny_llama()
    result = compress(model, config, output=tmp_path / "out")
    runner = OpenVINORunner(tmp_path / "out" / "openvino_model.xml")
    got = runner.logits(IDS)
    want = reference_logits(model, result)
    assert np.abs(got - want).max() < 2e-3 * np.abs(want).max()
    fused = [p for t, p in runtime_layers(tmp_path / "out" / "openvino_model.xml") if t == "FullyConnected"]
    # per layer q/k/v run as one FullyConnected, gate/up as one, o and down alone; then lm_head
    assert len(fused) == 9 and fused.count(precision) >= 8  # every compressed MatMul runs compressed
    # the float graph was converted beside the passes (they rewrote no parameter it reads)
    assert "convert_beside_passes" in result.report["backend_seconds"]


def test_report_sizes_match_theory(tmp_path):
    result = compress(tiny_llama(), CompressionConfig(mode="int4_asym", group_size=32), output=tmp_path / "o")
    report = json.loads((tmp_path / "o" / "qcompiler_report.json").read_text())
    bpw = report["bits_per_weight"]
    # 14 int4 layers (two of 96x96, two of 48x96, three of 192x96 per layer) at 4 + 20/32 bits,
    # embedding and lm_head (256x96) at 8 + 24/96 bits
    p4, p8 = 2 * (2 * 96 * 96 + 2 * 48 * 96 + 3 * 192 * 96), 2 * 256 * 96
    assert bpw["compressed_theoretical"] == pytest.approx((4.625 * p4 + 8.25 * p8) / (p4 + p8))
    assert abs(bpw["compressed_measured"] / bpw["compressed_theoretical"] - 1) < 0.01
    rows = {r["format"]: r for r in report["table"]}
    assert rows["int4_asym, group size 32"]["layers"] == 14
    assert rows["int8_asym, per-channel"]["layers"] == 2
    files = [p for p in (tmp_path / "o").iterdir() if p.name not in ("qcompiler_report.json", MARKER)]
    assert report["output_bytes"] == sum(p.stat().st_size for p in files)
    assert report["model_bytes"] == sum(p.stat().st_size for p in files if p.suffix in (".xml", ".bin"))
    assert result.report == report


def test_plain_module_lowers_with_static_last_dim(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    x = torch.randn(3, 64)
    result = compress(model, CompressionConfig(mode="int8_sym"), output=tmp_path / "m", example_input=(x,))
    import openvino as ov

    compiled = ov.Core().compile_model(str(tmp_path / "m" / "openvino_model.xml"), "CPU", RUNNER_CONFIG)
    got = compiled(x.numpy())[0]
    ref = copy.deepcopy(model)
    for const in result.graph.weight_constants():
        dict(ref.named_parameters())[const.name].data.copy_(const.meta["compressed"].dequantize())
    assert np.allclose(got, ref(x).detach().numpy(), atol=1e-3)
    assert [p for t, p in runtime_layers(tmp_path / "m" / "openvino_model.xml") if t == "FullyConnected"] == ["i8", "i8"]


def test_conversion_sends_no_telemetry(tmp_path):
    import subprocess
    import sys

    # a fresh process, not in CI (where the converter skips telemetry by itself): nothing may start it
    script = """
import sys
sys.path.insert(0, ".")
from qcompiler import CompressionConfig, compress
from tests.conftest import tiny_llama
compress(tiny_llama(), CompressionConfig(mode="int8_asym"), output=sys.argv[1])
from openvino.tools.ovc import telemetry_utils
assert telemetry_utils.init_ovc_telemetry().__class__.__module__.endswith("telemetry_stub")
assert sys.modules.get("openvino_telemetry") is None
"""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "o")], env=env, capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "o" / "openvino_model.xml").is_file()
