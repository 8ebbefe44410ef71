"""Sampling parameters and the sampler (greedy, temperature, top-k, top-p, min-p, seeded)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. temperature 0 means greedy."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    max_tokens: int = 16
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        checks = [
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (self.top_k >= 0, f"top_k must be >= 0, got {self.top_k}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (len(self.stop) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} stop strings"),
            (
                all(0 < len(s) <= MAX_STOP_STRING_CHARS for s in self.stop),
                f"stop strings must have 1 to {MAX_STOP_STRING_CHARS} characters",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0


def sample_one(
    logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None
) -> torch.Tensor:
    """Pick one token id (a 0-d device tensor) from float32 logits [V]."""
    if params.is_greedy:
        return torch.argmax(logits)
    logits = logits / params.temperature
    if params.top_k > 0:
        kth = torch.topk(logits, min(params.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    if params.top_p < 1:
        sorted_probs, sorted_ids = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > params.top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(0, sorted_ids, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=gen)[0]


def sample(
    logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]
) -> list[int]:
    """One token per row of logits [B, V]; each row with its own params and generator."""
    if all(p.is_greedy for p in params):
        return torch.argmax(logits, dim=-1).tolist()
    picked = torch.stack([sample_one(row, p, g) for row, p, g in zip(logits, params, gens)])
    return picked.tolist()
