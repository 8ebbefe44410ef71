"""Load client for an OpenAI-compatible server, reporting `vllm bench serve`'s metrics.

Definitions (as vllm bench serve; all from the client's clock, per successful request):
  TTFT  time from sending the request to the first streamed chunk with a choice
  ITL   gaps between consecutive such chunks, pooled over all requests
  TPOT  (E2EL - TTFT) / (output tokens - 1), for requests with more than one output token
  E2EL  time from sending the request to the end of its response
  request / output / total token throughput: per second of benchmark duration
  goodput: requests per second meeting every given SLO (TPOT of a 1-token output counts as 0)
  SLO attainment (not in vllm): requests meeting every given SLO / requests sent
Output tokens come from the server's usage report (stream_options.include_usage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


@dataclass
class SampleRequest:
    """One prompt to send: text or token ids, and how many tokens to ask for."""

    prompt: str | list[int]
    max_tokens: int


@dataclass
class RequestResult:
    """What the client saw of one request."""

    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    generated_text: str = ""
    error: str = ""


# ----------------------------------------------------------------------------- workload


def random_requests(
    num: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    vocab_size: int,
    seed: int,
    output_range_ratio: float | None = None,
) -> list[SampleRequest]:
    """Token-id prompts of uniformly random ids; lengths uniform in len*(1 +- range_ratio).

    `output_range_ratio` (None: `range_ratio`) spreads the output lengths; 0: fixed.
    """
    out_ratio = range_ratio if output_range_ratio is None else output_range_ratio
    for ratio in (range_ratio, out_ratio):
        assert 0 <= ratio < 1, f"range ratio must be in [0, 1), got {ratio}"
    rng = np.random.default_rng(seed)
    span = lambda n, r: (max(int(n * (1 - r)), 1), max(int(n * (1 + r)), 1))  # noqa: E731
    in_lo, in_hi = span(input_len, range_ratio)
    out_lo, out_hi = span(output_len, out_ratio)
    requests = []
    for _ in range(num):
        length = int(rng.integers(in_lo, in_hi + 1))
        prompt = rng.integers(0, vocab_size, size=length).tolist()
        requests.append(SampleRequest(prompt, int(rng.integers(out_lo, out_hi + 1))))
    return requests


def file_requests(path: str, num: int, output_len: int, seed: int) -> list[SampleRequest]:
    """Prompts from a .jsonl file ({"prompt", optional "max_tokens"}) or one per text line."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no prompts")
    pool = []
    for i, line in enumerate(lines):
        if path.endswith(".jsonl"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i + 1}: malformed JSON ({exc})") from exc
            pool.append(SampleRequest(str(row["prompt"]), int(row.get("max_tokens", output_len))))
        else:
            pool.append(SampleRequest(line, output_len))
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(num)] if num > len(pool) else rng.sample(pool, num)


def arrival_delays(num: int, rate: float, burstiness: float, seed: int) -> list[float]:
    """Send times (s from start): gamma inter-arrivals (burstiness 1: Poisson); inf: all at 0."""
    if rate == float("inf"):
        return [0.0] * num
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num)
    return np.cumsum(gaps).tolist()


# ----------------------------------------------------------------------------- one request


def _payload(args: argparse.Namespace, model: str, req: SampleRequest) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": req.max_tokens,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.ignore_eos:
        body["ignore_eos"] = True
    if args.endpoint.endswith("chat/completions"):
        if not isinstance(req.prompt, str):
            raise ValueError("the chat endpoint needs text prompts: use --dataset-path")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _chunk_text(data: dict[str, Any]) -> str | None:
    choices = data.get("choices")
    if not choices:
        return None
    choice = choices[0]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


async def send_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], headers: dict[str, str]
) -> RequestResult:
    """Stream one request and time its chunks."""
    result = RequestResult(start_time=time.perf_counter())
    last = result.start_time
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:500]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line.removeprefix("data: ").strip()
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                if "error" in data:
                    result.error = str(data["error"].get("message", data["error"]))
                    return result
                text = _chunk_text(data)
                now = time.perf_counter()
                if text is not None:
                    if result.ttft == 0.0:
                        result.ttft = now - result.start_time
                    else:
                        result.itl.append(now - last)
                    last = now
                    result.generated_text += text
                if data.get("usage"):
                    result.prompt_len = data["usage"]["prompt_tokens"]
                    result.output_tokens = data["usage"]["completion_tokens"]
        result.latency = time.perf_counter() - result.start_time
        result.success = result.ttft > 0
        result.error = "" if result.success else "no output chunk"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


# ----------------------------------------------------------------------------- metrics


def compute_metrics(
    results: list[RequestResult],
    duration_s: float,
    percentiles: list[float],
    goodput_ms: dict[str, float] | None = None,
) -> dict[str, Any]:
    """vllm bench serve's summary: counts, throughputs, and mean/median/std/pXX of each metric.

    Percentiles are numpy's (linear interpolation), as vllm's. Failed requests count in
    `failed` and in the denominator of `slo_attainment`, nowhere else.
    """
    ok = [r for r in results if r.success]
    samples: dict[str, list[float]] = {m: [] for m in METRICS}
    all_tpots, num_good = [], 0
    for r in ok:
        tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
        if r.output_tokens > 1:
            samples["tpot"].append(tpot)
        all_tpots.append(tpot)
        samples["ttft"].append(r.ttft)
        samples["itl"] += r.itl
        samples["e2el"].append(r.latency)
        observed = {"ttft": r.ttft, "tpot": tpot, "e2el": r.latency}
        if goodput_ms and all(observed[k] <= v / 1e3 for k, v in goodput_ms.items()):
            num_good += 1
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": num_good / duration_s if goodput_ms else None,
        "slo_attainment": num_good / len(results) if goodput_ms and results else None,
        "output_throughput": total_out / duration_s,
        "total_token_throughput": (total_in + total_out) / duration_s,
    }
    for metric, values in samples.items():
        ms = np.asarray(values or [0.0]) * 1e3
        out[f"mean_{metric}_ms"] = float(ms.mean())
        out[f"median_{metric}_ms"] = float(np.median(ms))
        out[f"std_{metric}_ms"] = float(ms.std())
        for p in percentiles:
            out[f"p{p:g}_{metric}_ms"] = float(np.percentile(ms, p))
    return out


def format_table(m: dict[str, Any], metrics: list[str], percentiles: list[float]) -> str:
    """The summary as vllm bench serve prints it."""
    rows = [
        ("Successful requests:", m["completed"]),
        ("Failed requests:", m["failed"]),
        ("Benchmark duration (s):", f"{m['duration']:.2f}"),
        ("Total input tokens:", m["total_input_tokens"]),
        ("Total generated tokens:", m["total_output_tokens"]),
        ("Request throughput (req/s):", f"{m['request_throughput']:.2f}"),
    ]
    if m["request_goodput"] is not None:
        rows.append(("Request goodput (req/s):", f"{m['request_goodput']:.2f}"))
        rows.append(("SLO attainment (%):", f"{100 * (m['slo_attainment'] or 0):.1f}"))
    rows += [
        ("Output token throughput (tok/s):", f"{m['output_throughput']:.2f}"),
        ("Total Token throughput (tok/s):", f"{m['total_token_throughput']:.2f}"),
    ]
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [f"{k:<40}{v:<10}" for k, v in rows]
    for metric in metrics:
        lines.append("{s:{c}^50}".format(s=METRIC_TITLES[metric], c="-"))
        name = metric.upper()
        lines.append(f"{f'Mean {name} (ms):':<40}{m[f'mean_{metric}_ms']:<10.2f}")
        lines.append(f"{f'Median {name} (ms):':<40}{m[f'median_{metric}_ms']:<10.2f}")
        for p in percentiles:
            lines.append(f"{f'P{p:g} {name} (ms):':<40}{m[f'p{p:g}_{metric}_ms']:<10.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the run


async def _server_info(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]):
    response = await client.get(f"{base_url}/v1/models", headers=headers)
    response.raise_for_status()
    return response.json()["data"][0]


def _workload(args: argparse.Namespace, card: dict[str, Any]) -> list[SampleRequest]:
    if args.dataset_path:
        return file_requests(args.dataset_path, args.num_prompts, args.random_output_len, args.seed)
    vocab = args.vocab_size or card.get("vocab_size")
    if not vocab:
        raise ValueError("the server does not report vocab_size: pass --vocab-size")
    return random_requests(
        args.num_prompts,
        args.random_input_len,
        args.random_output_len,
        args.random_range_ratio,
        vocab,
        args.seed,
        getattr(args, "random_output_range_ratio", None),
    )


async def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, send every request on schedule, and return the metrics and per-request data."""
    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.request_timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        card = await _server_info(client, base_url, headers)
        model = args.model or card["id"]
        requests = _workload(args, card)
        url = base_url + args.endpoint
        for req in requests[: args.num_warmups]:
            await send_request(client, url, _payload(args, model, req), headers)
        gate = asyncio.Semaphore(args.max_concurrency or len(requests))
        delays = arrival_delays(len(requests), args.request_rate, args.burstiness, args.seed)

        async def one(req: SampleRequest, delay: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + delay - time.perf_counter()))
            async with gate:
                return await send_request(client, url, _payload(args, model, req), headers)

        start = time.perf_counter()
        results = await _gather_until(
            [one(r, d) for r, d in zip(requests, delays)], getattr(args, "max_duration_s", None)
        )
        duration = time.perf_counter() - start
    metrics = compute_metrics(results, duration, args.percentiles, args.goodput_ms)
    run = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai",
        "model_id": model,
        "endpoint": args.endpoint,
        "num_prompts": len(requests),
        "request_rate": args.request_rate,
        "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency,
        "goodput_ms": args.goodput_ms,
    }
    per_request = {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results],
        "e2els": [r.latency for r in results],
        "itls": [r.itl for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
    }
    return {**run, **metrics, **per_request}


async def _gather_until(coros: list, cap_s: float | None) -> list[RequestResult]:
    """Run the requests; those not done after cap_s seconds are cancelled and count as failed.

    Cancelling closes their connections, so the server aborts them at its next step.
    """
    tasks = [asyncio.ensure_future(c) for c in coros]
    if not tasks:
        return []
    done, pending = await asyncio.wait(tasks, timeout=cap_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    cut = f"not finished within the {cap_s} s cap of the run"
    return [t.result() if t in done else RequestResult(error=cut) for t in tasks]


def _goodput(pairs: list[str] | None) -> dict[str, float] | None:
    if not pairs:
        return None
    slos = {}
    for pair in pairs:
        key, _, value = pair.partition(":")
        if key not in ("ttft", "tpot", "e2el") or not value:
            raise ValueError(f"--goodput takes ttft:MS, tpot:MS or e2el:MS; got '{pair}'")
        slos[key] = float(value)
    return slos


def add_cli_args(p: argparse.ArgumentParser) -> None:
    """Flags of `duoserve bench serve` (names follow vllm bench serve)."""
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument(
        "--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"]
    )
    p.add_argument("--model", default=None, help="default: the server's first model")
    p.add_argument("--api-key", default=os.environ.get("DUOSERVE_API_KEY"))
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument(
        "--request-rate", type=float, default=float("inf"), help="req/s; inf: all at once"
    )
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape; 1: Poisson")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--dataset-path", default=None, help=".jsonl or text file; default: random")
    p.add_argument("--random-input-len", type=int, default=256)
    p.add_argument("--random-output-len", type=int, default=64)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument(
        "--random-output-range-ratio",
        type=float,
        default=None,
        help="spread of output lengths (default: --random-range-ratio; 0: fixed)",
    )
    p.add_argument("--vocab-size", type=int, default=None, help="random ids below this")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-warmups", type=int, default=1)
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument(
        "--max-duration-s",
        type=float,
        default=None,
        help="cut the run after this many seconds; unfinished requests count as failed",
    )
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el")
    p.add_argument("--metric-percentiles", default="99")
    p.add_argument(
        "--goodput",
        nargs="+",
        default=None,
        metavar="KEY:MS",
        help="SLOs for goodput, e.g. ttft:500 tpot:50",
    )
    p.add_argument("--result-file", default=None, help="write the JSON result here")


def run_cli(args: argparse.Namespace) -> int:
    """Entry point of `duoserve bench serve`: print the table, write JSON if asked."""
    args.percentiles = [float(p) for p in args.metric_percentiles.split(",") if p]
    args.goodput_ms = _goodput(args.goodput)
    metrics = [m for m in args.percentile_metrics.split(",") if m]
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"--percentile-metrics: unknown {unknown}; known: {', '.join(METRICS)}")
    for flag in ("num_prompts", "request_rate", "burstiness"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0")
    result = asyncio.run(run_benchmark(args))
    print(format_table(result, metrics, args.percentiles))
    for error in [e for e in result["errors"] if e][:5]:
        print(f"error: {error}", file=sys.stderr)
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(result, indent=2))
    return 0 if result["completed"] else 1
