"""Memory plans: each pipeline step's peak GPU memory by part, and the strategy that makes it fit.

``make_plan(model, "24GiB", keep=13, state_size=8)`` -> :class:`Plan`; ``require_fit(plan)`` raises before any
compute when a step cannot fit; ``radistill plan`` prints the table. See docs/24gb.md.
"""

from radistill.utils.lazy import lazy_exports

# imported on first use, so that importing this package (as `radistill --help` does) does not import torch
__getattr__, __dir__ = lazy_exports(__name__, {
    "radistill.memplan.estimate": ("Breakdown", "Estimator", "GiB", "ServingLimits", "Strategy", "Workload",
                                   "serving_limits"),
    "radistill.memplan.measure": ("LiveTensors", "measure_peak"),
    "radistill.memplan.plan": ("STEPS", "Plan", "StepPlan", "eight_bit_optimizer", "make_plan", "parse_size",
                               "require_fit"),
})

__all__ = [
    "Breakdown", "Estimator", "GiB", "LiveTensors", "Plan", "STEPS", "ServingLimits", "StepPlan", "Strategy",
    "Workload", "eight_bit_optimizer", "make_plan", "measure_peak", "parse_size", "require_fit", "serving_limits",
]
