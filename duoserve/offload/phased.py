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

    def before_sync(self, layer_id: int, x: torch.Tensor, topk_ids: torch.Tensor, plan):
        """Both schedules see every layer's routing (the decode predictor keeps per-request
        state through prefill); the active one's tensor rides the routing sync."""
        active = self.prefill if get_step_context().phase == "prefill" else self.decode
        out = None
        for backend in (self.prefill, self.decode):
            hook = getattr(backend, "before_sync", None)
            extra = None if hook is None else hook(layer_id, x, topk_ids, plan)
            out = extra if backend is active else out
        return out

    def graph_version(self) -> tuple:
        return tuple(getattr(b, "graph_version", lambda: 0)() for b in (self.prefill, self.decode))

    def _active(self):
        return self.prefill if get_step_context().phase == "prefill" else self.decode

    def splits(self, num_tokens: int) -> bool:
        split = getattr(self._active(), "splits", None)
        return split is not None and split(num_tokens)

    def prepare(self, x: torch.Tensor, plan: RoutingPlan) -> None:
        self._active().prepare(x, plan)

    def device_compute(self, x: torch.Tensor, plan: RoutingPlan, out_rows: torch.Tensor) -> None:
        self._active().device_compute(x, plan, out_rows)

    def after_compute(self, plan: RoutingPlan) -> None:
        self._active().after_compute(plan)

    def begin_step(self, ctx) -> None:
        """Forwarded to each schedule that keeps per-pass host state (segmented graphs)."""
        for backend in (self.prefill, self.decode):
            begin = getattr(backend, "begin_step", None)
            if begin is not None:
                begin(ctx)

    def stats(self) -> dict[str, float]:
        """The decode backend's counters (shared cache and transfer: totals of both phases),
        plus the prefill schedule's own counters prefixed `prefill_`."""
        out = dict(self.decode.stats())
        out.update({f"prefill_{k}": v for k, v in self.prefill.stats().items()})
        return out
