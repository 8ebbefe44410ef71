"""Prometheus metrics (`duoserve:` prefix) and the periodic stats log line.

The engine thread is the only writer: it observes latencies as outputs leave the engine,
sets the queue gauges after each step and snapshots the expert runtime's counters. Each
server owns its own registry, so several servers can live in one process (tests).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

logger = logging.getLogger("duoserve.server")

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
TOKEN_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5, 5)
E2E_BUCKETS_S = (0.1, 0.3, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300, 600)
# expert runtime stats() keys that only grow -> counter name (without _total); the runtime
# may spell the prefetch counters either way.
EXPERT_COUNTERS = {
    "hits": "expert_cache_hits",
    "misses": "expert_cache_misses",
    "evictions": "expert_cache_evictions",
    "bytes_copied": "expert_bytes_copied",
    "copies": "expert_copies",
    "copy_seconds": "expert_copy_seconds",
    "wait_seconds": "expert_wait_seconds",
    "prefetch_issued": "expert_prefetch_issued",
    "prefetches": "expert_prefetch_issued",
    "prefetch_useful": "expert_prefetch_useful",
    "prefetch_hits": "expert_prefetch_useful",
    "prefetch_unused": "expert_prefetch_unused",
}
DERIVED_KEYS = ("hit_rate",)  # recomputed below, not passed through


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def expert_hit_rate(stats: dict[str, float]) -> float | None:
    """hits / (hits + misses), else the runtime's own hit_rate, else None."""
    hits, misses = stats.get("hits", 0.0), stats.get("misses", 0.0)
    return _ratio(hits, hits + misses) if hits + misses > 0 else stats.get("hit_rate")


def prefetch_accuracy(stats: dict[str, float]) -> float | None:
    """Prefetched experts that were used / prefetches issued."""
    useful = stats.get("prefetch_useful", stats.get("prefetch_hits", 0.0))
    return _ratio(useful, stats.get("prefetch_issued", stats.get("prefetches", 0.0)))


class _ExpertCollector:
    """Exposes the latest snapshot of `engine.experts.stats()` (counters plus derived rates)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        stats, seen = dict(self.snapshot), set()
        for key, value in stats.items():
            if key in DERIVED_KEYS:
                continue
            if key in EXPERT_COUNTERS:
                name = f"duoserve:{EXPERT_COUNTERS[key]}"
                family = CounterMetricFamily(name, f"expert runtime: cumulative {key}", value=value)
            else:
                name = "duoserve:expert_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
                family = GaugeMetricFamily(name, f"expert runtime: {key}", value)
            if name not in seen:
                seen.add(name)
                yield family
        hit_rate = expert_hit_rate(stats)
        if hit_rate is not None:
            yield GaugeMetricFamily(
                "duoserve:expert_cache_hit_rate", "expert cache hits / lookups", hit_rate
            )
        accuracy = prefetch_accuracy(stats)
        if accuracy is not None:
            yield GaugeMetricFamily(
                "duoserve:expert_prefetch_accuracy", "prefetched experts that were used", accuracy
            )


@dataclass
class _Totals:
    """Plain running totals, for the periodic log line's rates."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    slo_ttft_met: int = 0
    slo_ttft_seen: int = 0
    slo_tpot_met: int = 0
    slo_tpot_seen: int = 0


class ServerMetrics:
    """Every metric the server exports, and the periodic log line."""

    def __init__(
        self,
        ttft_slo_s: float | None = None,
        tpot_slo_s: float | None = None,
        log_interval_s: float = 10.0,
    ) -> None:
        self.registry = CollectorRegistry()
        self.ttft_slo_s, self.tpot_slo_s = ttft_slo_s, tpot_slo_s
        self.log_interval_s = log_interval_s
        self._add_latency_metrics()
        self._add_count_metrics()
        self.experts = _ExpertCollector()
        self.registry.register(self.experts)
        self.totals = _Totals()
        self._last_log: tuple[float, _Totals, dict[str, float]] | None = None
        self._was_idle = True

    def _add_latency_metrics(self) -> None:
        reg, p = self.registry, "duoserve:"
        self.ttft = Histogram(
            f"{p}time_to_first_token_seconds",
            "arrival to first token",
            registry=reg,
            buckets=LATENCY_BUCKETS_S,
        )
        self.itl = Histogram(
            f"{p}inter_token_latency_seconds",
            "gap between consecutive output tokens",
            registry=reg,
            buckets=TOKEN_BUCKETS_S,
        )
        self.tpot = Histogram(
            f"{p}request_time_per_output_token_seconds",
            "per request: (finish - first token) / (output tokens - 1)",
            registry=reg,
            buckets=TOKEN_BUCKETS_S,
        )
        self.e2e = Histogram(
            f"{p}e2e_request_latency_seconds",
            "arrival to finish",
            registry=reg,
            buckets=E2E_BUCKETS_S,
        )
        self.queue_time = Histogram(
            f"{p}request_queue_time_seconds",
            "arrival to first scheduled",
            registry=reg,
            buckets=LATENCY_BUCKETS_S,
        )
        self.step_time = Histogram(
            f"{p}engine_step_seconds",
            "one engine step",
            ["phase"],
            registry=reg,
            buckets=(*TOKEN_BUCKETS_S, 10, 30),
        )

    def _add_count_metrics(self) -> None:
        reg, p = self.registry, "duoserve:"
        self.running = Gauge(f"{p}num_requests_running", "requests holding a KV slot", registry=reg)
        self.waiting = Gauge(
            f"{p}num_requests_waiting", "requests waiting for admission", registry=reg
        )
        self.prompt_tokens = Counter(f"{p}prompt_tokens", "prompt tokens computed", registry=reg)
        self.generation_tokens = Counter(f"{p}generation_tokens", "tokens generated", registry=reg)
        self.finished = Counter(
            f"{p}request_success", "finished requests", ["finished_reason"], registry=reg
        )
        self.rejected = Counter(
            f"{p}request_rejected", "requests refused with 503", ["reason"], registry=reg
        )
        self.slo = Counter(
            f"{p}slo_requests",
            "finished requests judged against an SLO",
            ["slo", "met"],
            registry=reg,
        )
        self.slo_attainment = Gauge(
            f"{p}slo_attainment",
            "fraction of finished requests meeting the SLO",
            ["slo"],
            registry=reg,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    # ------------------------------------------------------------------ observations

    def on_step(self, phase: str, seconds: float, num_prompt_tokens: int) -> None:
        self.step_time.labels(phase=phase).observe(seconds)
        if num_prompt_tokens:
            self.prompt_tokens.inc(num_prompt_tokens)
            self.totals.prompt_tokens += num_prompt_tokens

    def on_first_token(self, ttft_s: float, queue_s: float | None) -> None:
        self.ttft.observe(ttft_s)
        if queue_s is not None:
            self.queue_time.observe(queue_s)

    def on_tokens(self, num_tokens: int, gap_s: float | None) -> None:
        self.generation_tokens.inc(num_tokens)
        self.totals.generation_tokens += num_tokens
        if gap_s is not None:
            self.itl.observe(gap_s)

    def on_finish(
        self, reason: str, e2e_s: float, ttft_s: float | None, tpot_s: float | None
    ) -> None:
        self.finished.labels(finished_reason=reason).inc()
        if reason == "abort":
            return
        self.e2e.observe(e2e_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)
        t = self.totals
        if self.ttft_slo_s is not None and ttft_s is not None:
            met = ttft_s <= self.ttft_slo_s
            t.slo_ttft_seen, t.slo_ttft_met = t.slo_ttft_seen + 1, t.slo_ttft_met + met
            self.slo.labels(slo="ttft", met=str(met).lower()).inc()
            self.slo_attainment.labels(slo="ttft").set(t.slo_ttft_met / t.slo_ttft_seen)
        if self.tpot_slo_s is not None:
            met = tpot_s is None or tpot_s <= self.tpot_slo_s  # one token: TPOT 0, as vLLM
            t.slo_tpot_seen, t.slo_tpot_met = t.slo_tpot_seen + 1, t.slo_tpot_met + met
            self.slo.labels(slo="tpot", met=str(met).lower()).inc()
            self.slo_attainment.labels(slo="tpot").set(t.slo_tpot_met / t.slo_tpot_seen)

    def on_rejected(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    def set_queues(self, num_running: int, num_waiting: int) -> None:
        self.running.set(num_running)
        self.waiting.set(num_waiting)

    def set_expert_stats(self, stats: dict[str, float]) -> None:
        self.experts.snapshot = {k: float(v) for k, v in stats.items()}

    # ------------------------------------------------------------------ the log line

    def maybe_log(self, num_running: int, num_waiting: int, now: float | None = None) -> None:
        """Log one stats line every log_interval_s while there is (or just was) work."""
        now = time.monotonic() if now is None else now
        if self._last_log is None:  # the first call starts the first interval
            self._last_log = (now, _Totals(**vars(self.totals)), dict(self.experts.snapshot))
            return
        last_time, last, last_experts = self._last_log
        elapsed = now - last_time
        if elapsed < self.log_interval_s:
            return
        t = self.totals
        is_idle = (
            num_running == 0
            and num_waiting == 0
            and t.prompt_tokens == last.prompt_tokens
            and t.generation_tokens == last.generation_tokens
        )
        experts = dict(self.experts.snapshot)
        self._last_log = (now, _Totals(**vars(t)), experts)
        if is_idle and self._was_idle:
            return
        self._was_idle = is_idle
        logger.info(
            self.format_line(elapsed, last, last_experts, experts, num_running, num_waiting)
        )

    def format_line(
        self,
        elapsed: float,
        last: _Totals,
        last_experts: dict[str, float],
        experts: dict[str, float],
        num_running: int,
        num_waiting: int,
    ) -> str:
        """One line: throughput, queues, expert hit rate and link traffic over the interval."""
        t = self.totals
        delta = lambda key: experts.get(key, 0.0) - last_experts.get(key, 0.0)  # noqa: E731
        parts = [
            f"prompt throughput {(t.prompt_tokens - last.prompt_tokens) / elapsed:.1f} tok/s",
            f"generation throughput {(t.generation_tokens - last.generation_tokens) / elapsed:.1f}"
            " tok/s",
            f"running {num_running} reqs",
            f"waiting {num_waiting} reqs",
        ]
        hit_rate = _ratio(delta("hits"), delta("hits") + delta("misses"))
        if hit_rate is None:  # no lookups in the interval: the runtime's own figure, if any
            hit_rate = experts.get("hit_rate")
        parts.append("expert hit rate " + ("n/a" if hit_rate is None else f"{hit_rate:.1%}"))
        parts.append(f"link {delta('bytes_copied') / elapsed / 1e9:.2f} GB/s")
        if t.slo_ttft_seen:
            parts.append(f"TTFT SLO met {t.slo_ttft_met / t.slo_ttft_seen:.1%}")
        if t.slo_tpot_seen:
            parts.append(f"TPOT SLO met {t.slo_tpot_met / t.slo_tpot_seen:.1%}")
        return ", ".join(parts)
