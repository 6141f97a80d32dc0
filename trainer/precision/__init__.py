"""FP8 training: a torch-native backend (`torch._scaled_mm`, CPU and CUDA) and Transformer Engine.

fp8.py      formats, scales, quantisation (per tensor, 1x128 tiles, 128x128 blocks), FP8 GEMMs
scaling.py  the per-module scaling state (delayed amax history, scales, statistics) in buffers
linear.py   `Fp8Linear`: nn.Linear with FP8 forward, dgrad and wgrad
experts.py  `Fp8GroupedExperts`: the routed experts with the same FP8 recipes
te.py       the Transformer Engine backend (imported lazily)
apply.py    `apply_fp8` (model conversion), `update_fp8_scales`, `fp8_metrics`
"""

from trainer.precision.apply import (
    Fp8Summary,
    apply_fp8,
    fp8_metrics,
    fp8_scalars,
    is_fp8_state_key,
    reset_fp8_state,
    update_fp8_scales,
)

__all__ = [
    "Fp8Summary",
    "apply_fp8",
    "fp8_metrics",
    "fp8_scalars",
    "is_fp8_state_key",
    "reset_fp8_state",
    "update_fp8_scales",
]
