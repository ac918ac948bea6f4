"""Which torch CPU kernel the torch backend's W8A8 Linear uses: the candidates timed on the Linear shapes
of SmolLM2-135M (a 512-token prefill) and all-MiniLM-L6-v2 (a batch of 32 x 128 tokens), in one run.

    python benchmarks/w8a8_torch_kernels.py [--repeats 20]

Candidates (each y = x W^T for x [M, K] float32, W [N, K]; ms, median of `--repeats` after 3 warm-ups):
- `fp32`: torch.nn.functional.linear, float32 weights (the baseline);
- `int8_weight_bf16`: `torch._weight_int8pack_mm` (int8 weights, bf16 activations: the weight-only
  int8 kernel of the torch backend);
- `int_mm`: x quantized to s8 here, `torch._int_mm` (s8 x s8 -> s32), rescaled;
- `onednn_u8`: x quantized to u8 here (one multiply, round, clamp), `torch.ops.onednn.qlinear_pointwise`
  (u8 x s8, float output): `W8A8Linear`'s static path, quantization included;
- `fbgemm_dynamic`: `torch.ops.quantized.linear_dynamic` (per-tensor dynamic u8 inside the op; its
  weights are deprecated quantized tensors).
Writes benchmarks/results/w8a8_torch_kernels.json with each candidate's time over fp32's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # name: (M, K, N)
    "smollm2 q/k/v/o (512 tokens)": (512, 576, 576),
    "smollm2 gate/up": (512, 576, 1536),
    "smollm2 down": (512, 1536, 576),
    "minilm q/k/v/o (32 x 128)": (4096, 384, 384),
    "minilm intermediate": (4096, 384, 1536),
    "minilm output": (4096, 1536, 384),
}


def timed(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def candidates(m: int, k: int, n: int) -> dict:
    torch.manual_seed(0)
    x, w = torch.randn(m, k), torch.randn(n, k) * 0.05
    scale = w.abs().amax(1) / 127
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    a_scale, zero = float(x.abs().max()) * 2 / 255, 128
    codes_t = codes.t().contiguous()
    packed = torch.ops.onednn.qlinear_prepack(codes, None)
    w_zero = torch.zeros(n, dtype=torch.int64)

    def int_mm():
        q = torch.round(x * (1 / a_scale)).clamp_(-128, 127).to(torch.int8)
        return torch._int_mm(q, codes_t).float() * (a_scale * scale)

    def onednn():
        q = torch.round(x * (1 / a_scale)).add_(zero).clamp_(0, 255).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(q, a_scale, zero, packed, scale, w_zero, None, 1.0, 0, torch.float32,
                                                  "none", [], "")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(codes, scale.double(), w_zero, 0)
        fbgemm = torch.ops.quantized.linear_prepack(qw, None)
    return {
        "fp32": lambda: torch.nn.functional.linear(x, w),
        "int8_weight_bf16": lambda: torch._weight_int8pack_mm(x.to(torch.bfloat16), codes, scale.to(torch.bfloat16)),
        "int_mm": int_mm,
        "onednn_u8": onednn,
        "fbgemm_dynamic": lambda: torch.ops.quantized.linear_dynamic(x, fbgemm, False),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--output", type=Path, default=RESULTS / "w8a8_torch_kernels.json")
    args = parser.parse_args()
    result = {"method": __doc__.strip(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
              "shapes": {}}
    for name, (m, k, n) in SHAPES.items():
        times = {kernel: timed(fn, args.repeats) for kernel, fn in candidates(m, k, n).items()}
        result["shapes"][name] = {"mkn": [m, k, n], "ms": times,
                                  "over_fp32": {kernel: t / times["fp32"] for kernel, t in times.items()}}
        print(name, json.dumps({kk: round(v, 2) for kk, v in times.items()}), flush=True)
    total = {kernel: sum(s["ms"][kernel] for s in result["shapes"].values()) for kernel in result["shapes"][name]["ms"]}
    result["all_shapes_over_fp32"] = {kernel: t / total["fp32"] for kernel, t in total.items()}
    result["fastest"] = min(total, key=total.get)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["all_shapes_over_fp32"], indent=1), "fastest:", result["fastest"])


def _cpu() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
