"""The engine: load a model, accept requests, and advance them one step at a time.

    step() = schedule -> run -> postprocess

Expert placement (resident, cached, streamed) is decided at load time by the expert runtime
(offload/) and lives inside the MoE layers; the step loop does not know about it.
"""

from __future__ import annotations

import gc
import itertools
import time
from pathlib import Path

import torch

from duoserve.config import EngineConfig, ModelConfig
from duoserve.engine.kv_cache import KVCache
from duoserve.engine.request import Request, RequestOutput
from duoserve.engine.runner import ModelRunner
from duoserve.engine.scheduler import ScheduledBatch, Scheduler
from duoserve.layers.sampler import SamplingParams
from duoserve.offload.planner import plan_memory
from duoserve.offload.runtime import build_expert_runtime, plan_for, resolve_policy
from duoserve.tokenizer import Tokenizer
from duoserve.weights.checkpoint import SafetensorsCheckpoint, SyntheticCheckpoint
from duoserve.weights.loader import build_dense_model, check_all_used
from duoserve.weights.synthetic import parse_synthetic_spec, synthetic_config, synthetic_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPES.update({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32})


class RequestError(ValueError):
    """A request the engine refuses before allocating anything for it."""


def resolve_device(name: str) -> torch.device:
    """A torch device; CUDA devices always carry their index (cuda -> cuda:0)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype '{name}'; known: {', '.join(DTYPES)}")
    return DTYPES[name]


FALLBACK_DEFAULT_MODEL = "synthetic:olmoe-1b-7b:tiny"


def default_model_path() -> str:
    """The built-in default model shipped in the package (a tiny synthetic one until then)."""
    path = Path(__file__).resolve().parent.parent / "assets" / "default-model"
    return str(path) if (path / "config.json").is_file() else FALLBACK_DEFAULT_MODEL


class LLMEngine:
    """Loads one model and serves requests with continuous batching."""

    def __init__(self, model: str | None, config: EngineConfig) -> None:
        self.config = config
        self.model_name = model or default_model_path()
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        t0 = time.perf_counter()
        synth = parse_synthetic_spec(self.model_name)
        if synth is not None:
            raw = synthetic_config(*synth)
            self.model_config = ModelConfig.from_dict(raw, source=self.model_name)
            self.tokenizer = synthetic_tokenizer(raw)
            gen_device = "cuda" if self.device.type == "cuda" else "cpu"
            source = SyntheticCheckpoint(seed=config.synthetic_seed, device=gen_device)
        else:
            self.model_config = ModelConfig.from_pretrained(self.model_name)
            self.tokenizer = Tokenizer.from_dir(self.model_name, self.model_config.eos_token_ids)
            source = SafetensorsCheckpoint(self.model_name)
        cfg = self.model_config
        self.max_model_len = min(config.max_model_len, cfg.max_position_embeddings)
        config = self.config = config.replace(max_model_len=self.max_model_len)
        plan = plan_for(cfg, config, self.dtype, self.device, verbose=False)  # refuse early
        if plan is None and self.device.type == "cuda" and resolve_policy(config) == "full-gpu":
            # no budget: full-gpu must still fit the device, or say so before loading
            total_gib = torch.cuda.get_device_properties(self.device).total_memory / 2**30
            plan_memory(
                cfg,
                config.replace(gpu_memory_budget=total_gib),
                self.dtype,
                self.device,
                "full-gpu",
            )
        self._cap_device_memory(plan)
        self.model = build_dense_model(cfg, source, self.device, self.dtype)
        self.host_store = None
        self._source = source
        self.set_expert_policy(config.policy, config.gpu_memory_budget)
        check_all_used(source)
        self.kv = KVCache(cfg, config.max_num_seqs, self.max_model_len, self.dtype, self.device)
        self.scheduler = Scheduler(self.kv, config.max_num_batched_tokens, self.max_model_len)
        self.runner = ModelRunner(self.model, self.kv, self.device)
        self.runner.enable_cuda_graphs(not config.enforce_eager)
        self.load_seconds = time.perf_counter() - t0
        self._ids = itertools.count()
        self.requests: dict[str, Request] = {}

    def set_expert_policy(self, policy: str, gpu_memory_budget: float | None) -> None:
        """(Re)build the expert backend under a policy and budget; the host store is kept.

        Benchmarks use this to compare policies in one process without re-pinning experts.
        """
        assert not hasattr(self, "scheduler") or not self.has_unfinished_requests()
        self.experts = None
        for block in self.model.moe_blocks():
            block.backend = None
        if hasattr(self, "runner"):  # captured decode graphs hold the old backend's buffers
            self.runner.graphs = None  # (freed before the cap below: _cap_device_memory)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.config = self.config.replace(policy=policy, gpu_memory_budget=gpu_memory_budget)
        self.memory_plan = plan_for(self.model_config, self.config, self.dtype, self.device)
        self._cap_device_memory(self.memory_plan)
        self.experts, self.host_store = build_expert_runtime(
            self.model,
            self.model_config,
            self.config,
            self._source,
            self.device,
            self.dtype,
            self.memory_plan,
            self.host_store,
        )
        if hasattr(self, "runner"):
            self.runner.enable_cuda_graphs(not self.config.enforce_eager)

    def _cap_device_memory(self, plan) -> None:
        """The budget is a promise: the CUDA allocator may not reserve more than it."""
        if self.device.type == "cuda":
            # engines deleted just before (a model build leaves a reference cycle behind)
            # still hold their memory until collected: free it before the cap applies
            gc.collect()
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(self.device).total_memory
            budget = plan.budget_bytes if plan is not None else total
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), self.device)

    # ------------------------------------------------------------------ requests

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> Request:
        """Validate and queue a request; raises RequestError for bad input."""
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self.requests:
            raise RequestError(f"request id '{request_id}' is already in use")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.validate_prompt(ids, params)
        req = Request(request_id, ids, params)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.device)
            req.generator.manual_seed(params.seed)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return req

    def validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise RequestError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in ids if not (isinstance(t, int) and 0 <= t < vocab)]
        if bad:
            raise RequestError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}")
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"you requested {total} tokens ({len(ids)} in the messages, "
                f"{params.max_tokens} in the completion). Please reduce the length of the "
                "messages or completion."
            )

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        if req is not None and not req.is_finished:
            self.scheduler.finish(req, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ------------------------------------------------------------------ the step

    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        sampled = self.runner.run(batch)
        return self._postprocess(batch, sampled)

    def _postprocess(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[RequestOutput]:
        now = time.monotonic()
        outputs = []
        for req, n, token in zip(batch.requests, batch.num_new_tokens, sampled):
            req.num_computed_tokens += n
            if token is None:
                continue
            req.output_token_ids.append(token)
            req.first_token_time = req.first_token_time or now
            req.last_token_time = now
            self._check_stop(req, token)
            outputs.append(RequestOutput.of(req, 1))
            if req.is_finished:
                self.requests.pop(req.request_id, None)
        return outputs

    def _check_stop(self, req: Request, token: int) -> None:
        params = req.sampling_params
        req.output_text = self.tokenizer.decode(req.output_token_ids)
        if not params.ignore_eos and token in self.tokenizer.eos_token_ids:
            return self.scheduler.finish(req, "stop", None)
        if token in params.stop_token_ids:
            return self.scheduler.finish(req, "stop", token)
        for stop in params.stop:
            idx = req.output_text.find(stop)
            if idx >= 0:
                req.output_text = req.output_text[:idx]
                return self.scheduler.finish(req, "stop", stop)
        if req.num_output_tokens >= params.max_tokens or req.num_tokens >= self.max_model_len:
            return self.scheduler.finish(req, "length")
        return None
