"""transformers baselines on the same synthetic weights as ours (fully on the GPU, or offloaded).

The offloaded one is what an HF user gets with `from_pretrained(device_map="auto",
max_memory={0: budget, "cpu": ...})`: accelerate's `infer_auto_device_map` places whole decoder
layers on the GPU up to the budget and the rest on the CPU (pageable memory), and
`dispatch_model` hooks each offloaded layer to move its weights to the GPU at every forward.
Run as a program (a subprocess of the benchmark suite, so its CPU copy of the model never
meets our pinned store in RAM):

    python -m duoserve.bench.hf_baseline --arch qwen3-30b-a3b --budget-gib 12 \
        --cases 1x512 --decode-tokens 3 --out hf.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch

from duoserve.config import ModelConfig
from duoserve.weights.checkpoint import SyntheticCheckpoint
from duoserve.weights.mapping import dense_param_table, expert_tensor_names


def hf_config(raw: dict[str, Any]):
    import transformers

    kwargs = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "dtype")}
    kwargs["eos_token_id"] = None  # generate exactly max_new_tokens
    return transformers.AutoConfig.for_model(raw["model_type"], **kwargs)


@torch.no_grad()
def fill_from_synthetic(
    model: torch.nn.Module, cfg: ModelConfig, seed: int, device: str, gen_device: str | None = None
) -> None:
    """Overwrite every parameter of a transformers model with our synthetic weights.

    Values are generated on `gen_device` (default `device`; a GPU is ~1000x faster than
    the CPU) and cast to each parameter's dtype there, then copied into the parameter.
    """
    gen_device = gen_device or device
    source = SyntheticCheckpoint(seed=seed, device=gen_device)
    dt = next(model.parameters()).dtype
    disk_of = {
        disk.replace("block_sparse_moe.", "mlp."): (disk, shape)
        for disk, shape in dense_param_table(cfg).values()
    }
    H, I = cfg.hidden_size, cfg.moe_intermediate_size
    for name, param in model.named_parameters():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            layer_id = int(name.split(".")[2])
            for e in range(cfg.num_experts):
                gate, up, down = expert_tensor_names(cfg, layer_id, e)
                if name.endswith("gate_up_proj"):
                    param[e, :I].copy_(source.get(gate, (I, H), gen_device).to(dt))
                    param[e, I:].copy_(source.get(up, (I, H), gen_device).to(dt))
                else:
                    param[e].copy_(source.get(down, (H, I), gen_device).to(dt))
            continue
        if name not in disk_of:
            raise KeyError(f"transformers parameter {name} has no synthetic counterpart")
        disk, shape = disk_of[name]
        param.copy_(source.get(disk, shape, gen_device).to(param.dtype))


def build_hf_model(raw: dict[str, Any], seed: int, device: str = "cuda", **from_config: Any):
    """A transformers model of config `raw` holding exactly our synthetic weights."""
    import transformers

    cfg = ModelConfig.from_dict(raw)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            hf_config(raw), dtype=torch.bfloat16, **from_config
        )
    fill_from_synthetic(model, cfg, seed, device)
    return model.eval()


@torch.no_grad()
def time_hf_generate(model, prompt_ids: list[int], max_tokens: int, device: str = "cuda") -> dict:
    """TTFT (a 1-token generate) and decode speed (a max_tokens generate), greedy."""
    ids = torch.tensor([prompt_ids], device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    kw = dict(do_sample=False, pad_token_id=0)
    model.generate(ids[:, :16], max_new_tokens=2, min_new_tokens=2, **kw)  # warm up
    sync()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    sync()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, **kw)
    sync()
    total = time.perf_counter() - t0
    decode_s = max(total - ttft, 1e-9)
    return {
        "ttft_s": ttft,
        "tpot_s": decode_s / (max_tokens - 1),
        "decode_tok_s": (max_tokens - 1) / decode_s,
        "e2e_s": total,
        "output_token_ids": out[0, len(prompt_ids) :].tolist(),
    }


# --------------------------------------------------------------------------- offloaded (accelerate)


def build_hf_offloaded(
    raw: dict[str, Any], seed: int, gpu_budget_gib: float | None, gen_device: str
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Our synthetic weights in a transformers model dispatched by accelerate under a budget.

    gpu_budget_gib None (no GPU): everything stays on the CPU (a CPU smoke test of the path).
    Returns the model and its device map.
    """
    import transformers
    from transformers.initialization import no_init_weights

    with no_init_weights(), torch.device("cpu"):  # allocate, do not initialize (filled below)
        model = transformers.AutoModelForCausalLM.from_config(hf_config(raw), dtype=torch.bfloat16)
    fill_from_synthetic(model, ModelConfig.from_dict(raw), seed, "cpu", gen_device)
    model.eval()
    if gpu_budget_gib is None:
        return model, {"": "cpu"}
    import accelerate  # only here: the CPU smoke path runs without it

    # the CPU part is already in RAM (filled above): its limit only has to admit it
    max_memory = {0: int(gpu_budget_gib * 2**30), "cpu": 2**40}
    device_map = accelerate.infer_auto_device_map(
        model,
        max_memory=max_memory,
        no_split_module_classes=model._no_split_modules,
        dtype=torch.bfloat16,
    )
    model = accelerate.dispatch_model(model, device_map=device_map)
    return model, device_map


class _TokenClock:
    """A generate() streamer that timestamps the prompt and every new token (synced)."""

    def __init__(self, sync, on_token=None) -> None:
        self.sync, self.on_token, self.times = sync, on_token, []

    def put(self, value) -> None:
        self.sync()
        self.times.append(time.perf_counter())
        if self.on_token is not None:
            self.on_token(self.times)

    def end(self) -> None:
        pass


@torch.no_grad()
def time_offloaded_generate(
    model, prompts: list[list[int]], decode_tokens: int, device: str, on_progress=None
) -> dict[str, Any]:
    """One greedy generate of 1 + decode_tokens tokens, timed token by token.

    TTFT is the first token's time; TPOT the mean of the `decode_tokens` measured decode steps.
    """
    ids = torch.tensor(prompts, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()

    def progress(times):
        if on_progress is not None:
            on_progress(_offload_result(t0, times))

    clock = _TokenClock(sync, progress)
    n = 1 + decode_tokens
    out = model.generate(
        ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, streamer=clock
    )
    result = _offload_result(t0, clock.times)
    result["output_token_ids"] = out[:, ids.shape[1] :].tolist()
    return result


def _offload_result(t0: float, times: list[float]) -> dict[str, Any]:
    """times[0]: prompt handed to the streamer; times[1]: first token; then one per step."""
    r: dict[str, Any] = {"measured_tokens": max(len(times) - 1, 0)}
    if len(times) >= 2:
        r["ttft_s"] = times[1] - t0
    steps = [b - a for a, b in itertools.pairwise(times[1:])]
    if steps:
        r["decode_step_s"] = steps
        r["tpot_s"] = sum(steps) / len(steps)
    return r


def _parse_cases(text: str) -> list[tuple[int, int]]:
    """'1x512,4x512' -> [(batch, prompt_len), ...]."""
    return [tuple(int(v) for v in c.split("x")) for c in text.split(",")]  # type: ignore[misc]


def main(argv: list[str] | None = None) -> None:
    """Build the offloaded HF model once and time each case; JSON written after every token."""
    from duoserve.bench.common import case_prompts, environment
    from duoserve.weights.synthetic import synthetic_config

    p = argparse.ArgumentParser(prog="python -m duoserve.bench.hf_baseline", description=__doc__)
    p.add_argument("--arch", required=True)
    p.add_argument("--scale", default="full")
    p.add_argument("--layers", type=int, default=None, help="build only this many layers")
    p.add_argument("--budget-gib", type=float, default=None, help="GPU max_memory (None: CPU)")
    p.add_argument("--cases", default="1x512", help="BATCHxPROMPT_LEN, comma separated")
    p.add_argument("--decode-tokens", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    cuda = args.budget_gib is not None and torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    raw = synthetic_config(args.arch, args.scale)
    if args.layers is not None:
        raw["num_hidden_layers"] = args.layers
    result: dict[str, Any] = {"env": environment(), "args": vars(args), "cases": {}}
    out = Path(args.out)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2, default=str))

    t0 = time.perf_counter()
    model, device_map = build_hf_offloaded(
        raw, args.seed, args.budget_gib if cuda else None, device
    )
    placed = [str(d) for d in device_map.values()]
    result.update(
        build_s=time.perf_counter() - t0,
        modules_on_gpu=sum(d not in ("cpu", "disk") for d in placed),
        modules_on_cpu=placed.count("cpu"),
        device_map={k: str(v) for k, v in device_map.items()},
    )
    save()
    if not args.no_warmup:
        t0 = time.perf_counter()
        time_offloaded_generate(model, [[1] * 8], 0, device)
        result["warmup_s"] = time.perf_counter() - t0
    for batch, prompt_len in _parse_cases(args.cases):
        key = f"{batch}x{prompt_len}"
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def progress(r, key=key):
            result["cases"][key] = r
            save()

        prompts = case_prompts(raw["vocab_size"], batch, prompt_len)
        r = time_offloaded_generate(model, prompts, args.decode_tokens, device, progress)
        r["peak_gib"] = torch.cuda.max_memory_reserved() / 2**30 if cuda else None
        result["cases"][key] = r
        save()


if __name__ == "__main__":
    main()


# --------------------------------------------------------------------------- run from the suite

HF_RAM_HEADROOM_BYTES = 6 * 2**30  # python, CUDA context, transformers' own buffers


def hf_model_bytes(raw: dict[str, Any]) -> int:
    """Bytes of the model in bf16 (dense + every expert), what transformers holds."""
    from duoserve.offload.planner import dense_bytes

    cfg = ModelConfig.from_dict(raw)
    experts = cfg.num_moe_layers * cfg.num_experts * cfg.expert_numel * 2
    return dense_bytes(cfg, torch.bfloat16) + experts


def run_hf_subprocess(
    arch: str,
    scale: str,
    budget_gib: float | None,
    cases: list[tuple[int, int]],
    decode_tokens: int,
    timeout_s: float,
    out_path: str | Path,
    warmup: bool = True,
) -> dict[str, Any]:
    """Run `main` in a child process (time-boxed) and return what it measured, labelled.

    When the bf16 model does not fit in the RAM available now, the child builds only the
    first L' of L decoder layers (with L'/L of the GPU budget) and the times are scaled by
    L/L': the result says so in `variant`. A child killed at `timeout_s` still returns the
    cases (and tokens) it had finished.
    """
    import os
    import subprocess
    import sys

    from duoserve.bench.common import available_ram_bytes
    from duoserve.weights.synthetic import synthetic_config

    raw = synthetic_config(arch, scale)
    need, avail = hf_model_bytes(raw), available_ram_bytes()
    num_layers, layers, scale_factor = raw["num_hidden_layers"], None, 1.0
    variant = f"full model, bf16 experts ({need / 1e9:.1f} GB)"
    if avail is not None and need + HF_RAM_HEADROOM_BYTES > avail:
        layers = int(num_layers * (avail - HF_RAM_HEADROOM_BYTES) / need)
        if layers < 2:
            return {
                "status": "skipped",
                "reason": f"needs {need / 1e9:.1f} GB RAM, {avail / 1e9:.1f} free",
            }
        scale_factor = num_layers / layers
        budget_gib = None if budget_gib is None else budget_gib * layers / num_layers
        variant = (
            f"first {layers} of {num_layers} layers (the full bf16 model, {need / 1e9:.1f} GB, "
            f"does not fit the {avail / 1e9:.1f} GB of free RAM); times x {scale_factor:.2f}"
        )
    cmd = [sys.executable, "-m", "duoserve.bench.hf_baseline", "--arch", arch, "--scale", scale]
    cmd += ["--cases", ",".join(f"{b}x{p}" for b, p in cases), "--out", str(out_path)]
    cmd += ["--decode-tokens", str(decode_tokens)]
    cmd += [] if budget_gib is None else ["--budget-gib", str(budget_gib)]
    cmd += [] if layers is None else ["--layers", str(layers)]
    cmd += [] if warmup else ["--no-warmup"]
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    status = "ok"
    try:
        proc = subprocess.run(cmd, env=env, timeout=timeout_s)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout_s:.0f} s"
    result: dict[str, Any] = {"status": status, "variant": variant, "command": " ".join(cmd)}
    result["routing"] = (
        "its own router: transformers cannot replay a trace, and accelerate moves every "
        "offloaded layer's weights at each forward whatever the routing"
    )
    result["wall_s"] = time.perf_counter() - t0
    if Path(out_path).is_file():
        child = json.loads(Path(out_path).read_text())
        result.update({k: v for k, v in child.items() if k not in ("cases", "device_map")})
        result["cases"] = {k: _scaled(v, scale_factor) for k, v in child["cases"].items()}
    return result


def _scaled(r: dict[str, Any], factor: float) -> dict[str, Any]:
    """Times of a fewer-layers run scaled to the full depth (a no-op for factor 1)."""
    out = dict(r)
    for key in ("ttft_s", "tpot_s"):
        if key in out:
            out[key] = out[key] * factor
    if "decode_step_s" in out:
        out["decode_step_s"] = [s * factor for s in out["decode_step_s"]]
    out["time_scale"] = factor
    return out
