"""One expert backend per phase: the step context's phase picks the schedule.

Prefill activates nearly every expert of a layer, decode only top-k, so policies such as
`duoserve` pair a prefill schedule (the streaming pipeline) with a decode schedule (the
predictor-driven cache). Both share one expert cache and one transfer engine: what prefill
leaves resident decode finds, and the copy stream stays single.
"""

from __future__ import annotations

import torch

from duoserve.engine.context import get_step_context
from duoserve.layers.moe import RoutingPlan


class PhasedExperts:
    """Dispatches each MoE layer call to `prefill` or `decode` by the step's phase."""

    needs_host_plan = True

    def __init__(self, name: str, prefill, decode) -> None:
        assert prefill.needs_host_plan and decode.needs_host_plan
        self.name = name
        self.prefill, self.decode = prefill, decode

    def compute(self, x: torch.Tensor, plan: RoutingPlan, out_rows: torch.Tensor) -> None:
        phase = get_step_context().phase
        (self.prefill if phase == "prefill" else self.decode).compute(x, plan, out_rows)

    def stats(self) -> dict[str, float]:
        """The decode backend's counters (shared cache and transfer: totals of both phases),
        plus the prefill schedule's own counters prefixed `prefill_`."""
        out = dict(self.decode.stats())
        out.update({f"prefill_{k}": v for k, v in self.prefill.stats().items()})
        return out
