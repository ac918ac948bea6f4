"""Scale estimation: refit each group's scale of a 4-bit weight to the layer's output on calibration data.

For a weight W [N, K] in groups of g, with the calibration Hessian H = X^T X / T over all T tokens
and per-channel importance a_k = max|x_k| (NNCF's algorithm, `scale_estimation.py`):
- start from the round-to-nearest scale s0 and codes q (the zero point z stays fixed);
- the error of a group is the mean over tokens of (W_g x_g - Q(W_g) x_g)^2, per output channel,
  computed exactly from H's g x g diagonal block: d^T H_g d with d = W_g - Q(W_g) (NNCF measures it
  on per-sample mean activations instead);
- a candidate scale is the importance-weighted mean of the per-element ideal scales,
  s = sum_i a_i |w_i| / sum_i a_i |v_i| ... written as sum_i a_i' |w_i| / (|v_i| + 0.001 [v_i = 0]) with
  a' = a zeroed where v_i = 0 and normalised per group, v = decode(q) - z;
- `initial_steps` rounds of: candidate from the current codes, re-quantize with it, keep per group
  where the error drops; then `scale_steps` candidates from the codes of (1 - 0.05 k) * s0 (qcompiler
  takes 10 by default, down to 0.55 s0; NNCF 5: on SmolLM2 with AWQ, held-out perplexity 22.53 against 22.61).
The scales are stored as f16 and the codes computed from the stored scale, as RTN does, so the
artifact computes exactly what was measured. The summary has each layer's output error (relative,
on the calibration data, summed over groups) with RTN and with the refitted scales.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from qcompiler.errors import QCompilerError
from qcompiler.hookspecs import hookimpl
from qcompiler.quant import matrix_view
from qcompiler.weight_fit import ESTIMATE_MODES, INITIAL_STEPS, SCALE_STEPS, WeightFitPass, estimate

MODES = ESTIMATE_MODES


@dataclass(frozen=True)
class ScaleEstimationOptions:
    initial_steps: int = field(default=INITIAL_STEPS, metadata={"help": "rounds of refitting from the current codes", "min": 0})
    scale_steps: int = field(default=SCALE_STEPS, metadata={"help": "candidates from round-to-nearest scales shrunk by "
                                                           "5% steps (NNCF: 5)", "min": 0})
    by_default: bool = False  # on because a dataset was given, not asked for (said in the report)


class ScaleEstimation(WeightFitPass):
    name = "scale_estimation"
    Options = ScaleEstimationOptions
    statistics = frozenset({"abs_max"})  # and each weight's "hessian_blocks:<group size>" (see statistics_of)
    modes = MODES
    modes_reason = "scale estimation refits 4-bit scales (NNCF refuses it on other modes too)"
    flag = "--scale-estimation"
    help = ("refit 4-bit scales on calibration data (on by default when --dataset is given with a 4-bit format; "
            "--no-scale-estimation gives NNCF's round to nearest)")
    needs_data = True
    default_with_data = True  # on when a dataset is given and the config leaves it unset (CompressionConfig)
    count_key = "estimated"

    @classmethod
    def options_from(cls, config):
        if config.gptq:  # GPTQ refits each group's scale itself, as it reaches it, with the default steps
            if config.switched_on().get(cls.name):
                raise QCompilerError("--scale-estimation-* options tune scale estimation alone; with --gptq the "
                                     "scales are refitted inside GPTQ with the defaults: drop them or drop --gptq")
            return None
        options = super().options_from(config)
        if options is not None and config.scale_estimation is None:
            options = dataclasses.replace(options, by_default=True)
        return options

    def extra_summary(self) -> dict:
        return {"by_default": self.options.by_default}

    def statistics_of(self, const, axes, fmt, graph) -> frozenset:
        return self.statistics | {f"hessian_blocks:{_group(const, axes, fmt, graph)}"}

    def fit(self, w, st, fmt):
        return estimate(w, st.hessian_blocks / max(st.tokens, 1), st.abs_max, fmt.mode, fmt.group_size,
                        self.options.initial_steps, self.options.scale_steps)


def _group(const, axes, fmt, graph) -> int:
    g = fmt.group_size
    return matrix_view(graph.tensor(const), axes)[0].shape[1] if g == -1 else g


@hookimpl
def qcompiler_register_passes():
    return [ScaleEstimation]

