"""Memory plans: each pipeline step's peak GPU memory by part, and the strategy that makes it fit (issue 7).

``make_plan(model, "24GiB", keep=13, state_size=8)`` -> :class:`Plan`; ``require_fit(plan)`` raises before any
compute when a step cannot fit; ``radistill plan`` prints the table. See docs/24gb.md.
"""

from radistill.memplan.estimate import Breakdown, Estimator, GiB, ServingLimits, Strategy, Workload, serving_limits
from radistill.memplan.measure import LiveTensors, measure_peak
from radistill.memplan.plan import STEPS, Plan, StepPlan, eight_bit_optimizer, make_plan, parse_size, require_fit

__all__ = [
    "Breakdown", "Estimator", "GiB", "LiveTensors", "Plan", "STEPS", "ServingLimits", "StepPlan", "Strategy",
    "Workload", "eight_bit_optimizer", "make_plan", "measure_peak", "parse_size", "require_fit", "serving_limits",
]
