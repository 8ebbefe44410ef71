"""Server settings: one frozen dataclass; `duoserve serve` generates its flags from the fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerConfig:
    """How the HTTP server runs: address, auth, latency objectives, queue bound, shutdown."""

    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = _opt(8000, "TCP port")
    api_key: str | None = _opt(
        None, "require 'Authorization: Bearer KEY' on /v1/* (also read from DUOSERVE_API_KEY)"
    )
    served_model_name: str | None = _opt(None, "model id in the API (None: the model path)")
    ttft_slo_ms: float | None = _opt(None, "time-to-first-token objective the scheduler plans for")
    tpot_slo_ms: float | None = _opt(
        None, "time-per-output-token objective the scheduler plans for"
    )
    max_waiting: int = _opt(256, "requests allowed to wait for admission; beyond it: 503")
    shutdown_timeout: float = _opt(30.0, "seconds SIGTERM waits for running requests to drain")
    log_interval: float = _opt(10.0, "seconds between periodic stats log lines")

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("ttft_slo_ms", "tpot_slo_ms"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of milliseconds, got {value}")
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be >= 1, got {self.max_waiting}")
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        if not self.log_interval > 0:
            raise ValueError(f"log_interval must be > 0, got {self.log_interval}")
