"""Training presets: the architecture (``MoeConfig``) and the schedule (``TrainConfig``).

- ``default``: the shipped quick-start model (Mixtral family, 8 experts, top-2),
  13.7 MB of bf16 safetensors, trained for a fixed number of epochs of the corpus.
- ``mixtral-8x7b-topology``: Mixtral-8x7B's 32 layers x 8 experts x top-2, narrow.
- ``qwen3-30b-a3b-topology``: Qwen3-30B-A3B's 48 layers x 128 experts x top-8, narrow.
- ``tiny-mixtral`` / ``tiny-qwen3``: seconds on a CPU; for tests and pipeline checks.

The corpus is small (2.6M tokens), so every preset also stops at ``max_epochs``: the
topology models exist for their routing, the default for readable text, and neither
gains from memorizing the corpus. The default also keeps the weights of its best
validation loss (``keep_best``); validation is the first half of the held-out split and
the reported perplexity comes from the second half.
"""

from __future__ import annotations

from dataclasses import dataclass

from duoserve.training.model import MoeConfig


@dataclass(frozen=True)
class TrainConfig:
    """Optimization schedule; training ends when any of the three limits is reached."""

    batch_size: int = 64
    seq_len: int = 512
    peak_lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to peak_lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    aux_loss_coef: float = 0.01  # Switch-style balance loss, 1.0 when routing is uniform
    residual_dropout: float = 0.0
    max_minutes: float = 3.0  # wall-clock limit of the training loop
    max_epochs: float = 10.0  # limit in passes over the train split
    max_steps: int = 0  # 0: no step limit
    log_every_steps: int = 25
    eval_every_steps: int = 100
    heldout_eval_seqs: int = 16  # validation windows in the periodic held-out loss
    keep_best: bool = False  # end with the weights of the best periodic validation loss
    seed: int = 0

    def __post_init__(self) -> None:
        assert self.batch_size > 0 and self.seq_len > 1, "empty batches"
        assert self.max_minutes > 0 or self.max_epochs > 0 or self.max_steps > 0, "no limit"
        assert 0 <= self.min_lr_ratio <= 1, "min_lr_ratio is a fraction of peak_lr"


def _arch(family: str, **fields: object) -> MoeConfig:
    base: dict[str, object] = {
        "family": family,
        "vocab_size": 8192,
        "hidden_size": 256,
        "num_heads": 4,
        "num_kv_heads": 1,
        "head_dim": 64,
        "norm_topk_prob": True,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
    }
    return MoeConfig(**{**base, **fields})  # type: ignore[arg-type]


PRESETS: dict[str, tuple[MoeConfig, TrainConfig]] = {
    "default": (
        _arch("mixtral", hidden_size=192, num_layers=6, num_heads=3, num_kv_heads=1,
              num_experts=8, top_k=2, expert_intermediate_size=112),
        TrainConfig(peak_lr=3e-3, max_epochs=16, residual_dropout=0.1, keep_best=True,
                    heldout_eval_seqs=88),
    ),
    "mixtral-8x7b-topology": (
        _arch("mixtral", num_layers=32, num_experts=8, top_k=2, expert_intermediate_size=512),
        TrainConfig(batch_size=32, peak_lr=1.5e-3, max_epochs=10),  # 16k tokens: memory
    ),
    "qwen3-30b-a3b-topology": (
        _arch("qwen3_moe", num_layers=48, num_experts=128, top_k=8,
              expert_intermediate_size=128),
        TrainConfig(batch_size=32, peak_lr=2e-3, max_epochs=10),  # 16k tokens: memory
    ),
    "tiny-mixtral": (
        _arch("mixtral", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
              num_kv_heads=2, head_dim=16, num_experts=8, top_k=2, expert_intermediate_size=32,
              max_position_embeddings=256),
        TrainConfig(batch_size=8, seq_len=64, peak_lr=3e-3, warmup_steps=5, max_minutes=1,
                    max_steps=60, log_every_steps=10, eval_every_steps=20, heldout_eval_seqs=4),
    ),
    "tiny-qwen3": (
        _arch("qwen3_moe", vocab_size=512, hidden_size=64, num_layers=3, num_heads=4,
              num_kv_heads=2, head_dim=16, num_experts=16, top_k=4, expert_intermediate_size=16,
              max_position_embeddings=256),
        TrainConfig(batch_size=8, seq_len=64, peak_lr=3e-3, warmup_steps=5, max_minutes=1,
                    max_steps=60, log_every_steps=10, eval_every_steps=20, heldout_eval_seqs=4),
    ),
}  # fmt: skip
