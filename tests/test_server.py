"""The HTTP server on the CPU: protocol, validation, auth, cancellation, batching, drain, bench.

A real uvicorn server on 127.0.0.1 (ephemeral port) in a background thread, serving the
built-in default model; the oracle is offline greedy generation with `LLM` on the same
weights. Also: trace replay (`--replay-trace`) and the serving sweep's metrics and pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import time

import httpx
import pytest
import torch
from safetensors.torch import save_file

from duoserve.bench import serve_sweep
from duoserve.bench.replay import TraceReplay
from duoserve.bench.serve_client import RequestResult, compute_metrics, format_table, run_benchmark
from duoserve.bench.serve_report import BEGIN, END
from duoserve.config import EngineConfig
from duoserve.engine.llm_engine import LLMEngine, default_model_path
from duoserve.layers.sampler import SamplingParams
from duoserve.llm import LLM
from duoserve.server.app import ROUTING_HEADER, BodyLimit, build_app
from duoserve.server.background import BackgroundServer, start_background_server
from duoserve.server.config import ServerConfig
from duoserve.server.metrics import ServerMetrics
from duoserve.server.serving import TextDeltas

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ENGINE_OPTIONS = dict(device="cpu", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=512)
BOUND_S = 120.0  # no loop or request in this file may run longer


@pytest.fixture(scope="module")
def model() -> str:
    """The served model: the built-in default one (a small trained Mixtral-style MoE)."""
    return default_model_path()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LiveServer(BackgroundServer):
    def metric(self, name: str, **labels: str) -> float:
        return self.app.state.metrics.registry.get_sample_value(name, labels) or 0.0


def start_server(engine: LLMEngine, config: ServerConfig, draining: bool = False, **kw):
    """Serve on 127.0.0.1 (ephemeral port) from a background thread; return once it listens."""
    drain_s = config.shutdown_timeout if draining else None
    live = start_background_server(build_app(engine, config, **kw), drain_timeout_s=drain_s)
    return LiveServer(live.url, live.app, live.uv, live.thread)


@pytest.fixture(scope="module")
def server(model):
    engine = LLMEngine(model, EngineConfig(**ENGINE_OPTIONS))
    live = start_server(engine, ServerConfig(api_key=API_KEY))
    yield live
    live.uv.should_exit = True
    live.thread.join(30)


@pytest.fixture(scope="module")
def oracle(model) -> LLM:
    return LLM(model, **ENGINE_OPTIONS)


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=BOUND_S) as c:
        yield c


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


def sse_payloads(body: str) -> list[str]:
    """The data payloads of an SSE body, checking its framing."""
    assert body.endswith("\n\n"), body[-50:]
    payloads = []
    for event in body.split("\n\n")[:-1]:
        assert event.startswith("data: ") and "\n" not in event, event
        payloads.append(event.removeprefix("data: "))
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return payloads


def assert_envelope(response: httpx.Response, status: int, fragment: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert fragment in body["error"]["message"], body["error"]["message"]
    return body["error"]


# ----------------------------------------------------------------------------- endpoints


def test_public_endpoints_and_models(server, client):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert "version" in httpx.get(server.url + "/version").json()
    assert httpx.get(server.url + "/metrics").status_code == 200  # no key needed
    card = client.get("/v1/models").json()["data"][0]
    vocab = server.bridge.engine.model_config.vocab_size
    assert card["max_model_len"] == 256 and card["vocab_size"] == vocab
    assert card["routing"] == "the model's own router"
    response = client.get("/v1/models")
    assert response.headers[ROUTING_HEADER] == "model"


def test_auth(server):
    url = server.url + "/v1/completions"
    body = {"prompt": "hi", "max_tokens": 1}
    error = assert_envelope(httpx.post(url, json=body), 401, "missing API key")
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    bad = {"Authorization": "Bearer wrong-key"}
    assert_envelope(httpx.post(url, json=body, headers=bad), 401, "invalid API key")
    assert_envelope(httpx.post(url, content=b"{bad json", headers=bad), 401, "invalid API key")
    assert_envelope(httpx.get(server.url + "/v1/models"), 401, "API key")
    assert httpx.post(url, json=body, headers=AUTH, timeout=BOUND_S).status_code == 200


def test_completion_and_usage_match_offline(client, oracle):
    body = {"prompt": "The cat sat on", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    data = client.post("/v1/completions", json={**body, "unknown_field": {"x": 1}}).json()
    expected = oracle.generate("The cat sat on", greedy(6))[0]
    assert data["object"] == "text_completion" and data["id"].startswith("cmpl-")
    assert data["choices"][0]["text"] == expected.text
    assert data["choices"][0]["finish_reason"] == "length"
    num_prompt = len(expected.prompt_token_ids)
    assert data["usage"] == {
        "prompt_tokens": num_prompt,
        "completion_tokens": 6,
        "total_tokens": num_prompt + 6,
    }


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streaming_framing_and_usage(client, endpoint):
    base = {"max_tokens": 7, "temperature": 0, "ignore_eos": True}
    if endpoint == "chat":
        path, base["messages"] = "/v1/chat/completions", [{"role": "user", "content": "Hello!"}]
    else:
        path, base["prompt"] = "/v1/completions", "Once upon a time"
    full = client.post(path, json=base).json()
    body = {**base, "stream": True, "stream_options": {"include_usage": True}}
    response = client.post(path, json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    usage_chunk, content = chunks[-1], chunks[:-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
    assert all(c["usage"] is None for c in content)
    reasons = [c["choices"][0]["finish_reason"] for c in content]
    assert reasons[-1] == "length" and set(reasons[:-1]) <= {None}
    if endpoint == "chat":
        assert content[0]["choices"][0]["delta"]["role"] == "assistant"
        assert all("role" not in c["choices"][0]["delta"] for c in content[1:])
        text = "".join(c["choices"][0]["delta"]["content"] for c in content)
        assert text == full["choices"][0]["message"]["content"]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    else:
        text = "".join(c["choices"][0]["text"] for c in content)
        assert text == full["choices"][0]["text"]
    without_usage = client.post(path, json={**base, "stream": True})
    assert all(json.loads(p)["usage"] is None for p in sse_payloads(without_usage.text)[:-1])


def test_stop_sequences(client):
    body = {"prompt": "abcdefg", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    starts = [i for i in range(1, len(full) - 1) if full.find(full[i : i + 2]) == i]
    starts = [i for i in starts if "\ufffd" not in full[: i + 2]]
    if not starts:
        pytest.skip(f"no usable 2-character stop string in {full!r}")
    stop = full[starts[0] : starts[0] + 2]
    result = client.post("/v1/completions", json={**body, "stop": [stop, "never-seen"]}).json()
    choice = result["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (full[: starts[0]], "stop")
    assert choice["stop_reason"] == stop
    streamed = client.post("/v1/completions", json={**body, "stop": stop, "stream": True})
    chunks = [json.loads(p) for p in sse_payloads(streamed.text)[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[: starts[0]]
    assert chunks[-1]["choices"][0]["stop_reason"] == stop


CHAT = "/v1/chat/completions"
VALIDATION_CASES = [
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "only n=1"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (
        "/v1/completions",
        {"prompt": [5, 6], "max_tokens": 255},
        400,
        "This model's maximum context length is 256 tokens. However, you requested 257 tokens",
    ),
    ("/v1/completions", {"prompt": list(range(300))}, 400, "maximum context length is 256"),
    ("/v1/completions", {"prompt": "hi", "temperature": 2.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a"] * 17}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": "x" * 300}, 400, "stop"),
    ("/v1/completions", {"prompt": "x" * 9000}, 400, "characters"),
    ("/v1/completions", {"prompt": [10**7]}, 400, "token ids must be in [0, "),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [9999]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "model": "other"}, 404, "does not exist"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    (CHAT, {"messages": []}, 400, "messages"),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "not supported",
    ),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 300},
        400,
        "maximum context length",
    ),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "tools": [{"x": 1}]}, 400, "tools"),
]


def test_validation_errors_allocate_nothing(server, client):
    submitted_before = server.bridge._num_submitted
    for path, body, status, fragment in VALIDATION_CASES:
        error = assert_envelope(client.post(path, json=body), status, fragment)
        assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    json_header = {"Content-Type": "application/json"}
    bad_json = client.post("/v1/completions", content=b"{nope", headers=json_header)
    assert_envelope(bad_json, 400, "malformed JSON")
    assert server.bridge._num_submitted == submitted_before


def test_body_limit():
    sent = []

    async def send(message):
        sent.append(message)

    async def never_called(scope, receive, send):
        raise AssertionError("the app must not run")

    scope = {"type": "http", "headers": [(b"content-length", str(17 << 20).encode())]}
    asyncio.run(BodyLimit(never_called)(scope, None, send))
    assert sent[0]["status"] == 413 and b"request body over" in sent[1]["body"]


# ----------------------------------------------------------------------------- the engine thread


async def _post_all(url: str, jobs: list[tuple[str, dict]]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=BOUND_S, limits=limits) as c:
        return await asyncio.gather(*(c.post(path, json=body) for path, body in jobs))


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, BOUND_S))


def test_concurrent_requests_match_offline_greedy(server, oracle):
    prompts = [f"Question {i}: what is {i} plus {3 * i}?" for i in range(16)]
    jobs, expected = [], []
    for i, prompt in enumerate(prompts):
        body = {"max_tokens": 8, "temperature": 0, "stream": i % 4 >= 2}
        if i % 2:
            messages = [{"role": "user", "content": prompt}]
            jobs.append((CHAT, {**body, "messages": messages}))
            expected.append(oracle.tokenizer.encode_chat(messages))
        else:
            jobs.append(("/v1/completions", {**body, "prompt": prompt}))
            expected.append(prompt)
    expected_texts = [o.text for o in oracle.generate(expected, greedy(8))]
    responses = _run(_post_all(server.url, jobs))
    for (path, body), response, text in zip(jobs, responses, expected_texts):
        assert response.status_code == 200, response.text
        if body["stream"]:
            chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
            key = (lambda c: c["delta"]["content"]) if path == CHAT else (lambda c: c["text"])
            got = "".join(key(c["choices"][0]) for c in chunks)
        else:
            choice = response.json()["choices"][0]
            got = choice["message"]["content"] if path == CHAT else choice["text"]
        assert got == text


def _wait_idle(server: LiveServer) -> None:
    engine, deadline = server.bridge.engine, time.monotonic() + BOUND_S
    while server.bridge.active or engine.scheduler.num_unfinished:
        assert time.monotonic() < deadline, "requests left in flight"
        time.sleep(0.05)


async def _cancel_all(url: str, num: int) -> None:
    body = {"prompt": "Tell me a very long story about", "max_tokens": 200, "temperature": 0}
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=BOUND_S, limits=limits) as c:

        async def after_first_token():
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return  # leaving the block closes the connection

        async def after_headers():
            async with c.stream(
                "POST",
                "/v1/chat/completions",
                json={**body, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            ):
                return

        async def timeout_nonstream(delay: float):
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(c.post("/v1/completions", json=body), delay)

        jobs = []
        for i in range(num):
            kind = i % 4
            if kind == 0:
                jobs.append(after_first_token())
            elif kind == 1:
                jobs.append(after_headers())
            else:
                jobs.append(timeout_nonstream(0.02 + 0.005 * (i % 50)))
        await asyncio.gather(*jobs)


def test_cancelled_requests_then_fresh_request(server, client, oracle):
    bridge, num = server.bridge, 200
    submitted = bridge._num_submitted
    aborted = server.metric("duoserve:request_success_total", finished_reason="abort")
    generated = bridge.metrics.totals.generation_tokens
    _run(_cancel_all(server.url, num))
    _wait_idle(server)
    num_submitted = bridge._num_submitted - submitted
    num_aborted = server.metric("duoserve:request_success_total", finished_reason="abort") - aborted
    assert num_submitted >= num // 2 and num_aborted == num_submitted
    assert bridge.metrics.totals.generation_tokens - generated < num * 200 // 10
    t0 = time.monotonic()
    body = {"prompt": "A fresh request", "max_tokens": 8, "temperature": 0}
    response = client.post("/v1/completions", json=body, timeout=30)
    assert time.monotonic() - t0 < 30
    assert (
        response.json()["choices"][0]["text"]
        == oracle.generate("A fresh request", greedy(8))[0].text
    )


def test_overload_gets_503(server):
    bridge, before = server.bridge, server.bridge.max_waiting
    bridge.max_waiting = 2
    try:
        job = ("/v1/completions", {"prompt": "load", "max_tokens": 12, "temperature": 0})
        responses = _run(_post_all(server.url, [job] * 30))
    finally:
        bridge.max_waiting = before
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    error = assert_envelope(next(r for r in responses if r.status_code == 503), 503, "overloaded")
    assert error["code"] == "server_overloaded" and "--max-waiting 2" in error["message"]
    assert server.metric("duoserve:request_rejected_total", reason="overloaded") >= 1


def test_engine_failure_fails_requests_then_recovers(server, client, monkeypatch):
    engine = server.bridge.engine
    real_step, calls = engine.step, []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated device fault")
        return real_step()

    monkeypatch.setattr(engine, "step", failing_once)
    body = {"prompt": "fault", "max_tokens": 3, "temperature": 0}
    assert_envelope(client.post("/v1/completions", json=body), 500, "simulated device fault")
    assert client.post("/v1/completions", json=body).status_code == 200


def test_metrics_exported(server, client):
    client.post("/v1/completions", json={"prompt": "m", "max_tokens": 3, "temperature": 0})
    text = httpx.get(server.url + "/metrics").text
    for name in (
        "duoserve:time_to_first_token_seconds_bucket",
        "duoserve:inter_token_latency_seconds",
        "duoserve:request_time_per_output_token_seconds",
        "duoserve:e2e_request_latency_seconds",
        "duoserve:request_queue_time_seconds",
        "duoserve:num_requests_running",
        "duoserve:num_requests_waiting",
        "duoserve:prompt_tokens_total",
        "duoserve:generation_tokens_total",
        "duoserve:engine_step_seconds",
        'duoserve:request_success_total{finished_reason="length"}',
    ):
        assert name in text, name
    if callable(getattr(server.bridge.engine.experts, "stats", None)):
        assert "duoserve:expert_cache_hit_rate" in text


def test_periodic_log_line(caplog):
    metrics = ServerMetrics(ttft_slo_s=0.5, tpot_slo_s=0.05, log_interval_s=1.0)
    metrics.maybe_log(0, 0, now=0.0)
    metrics.set_expert_stats({"hits": 10, "misses": 10, "bytes_copied": 0})
    metrics.maybe_log(0, 0, now=1.0)  # resets the interval
    metrics.on_step("prefill", 0.1, 40)
    metrics.on_tokens(20, None)
    metrics.on_finish("length", 1.0, 0.4, 0.1)
    metrics.set_expert_stats({"hits": 40, "misses": 20, "bytes_copied": 4e9})
    with caplog.at_level(logging.INFO, logger="duoserve.server"):
        metrics.maybe_log(2, 1, now=3.0)
    line = caplog.records[-1].getMessage()
    for part in (
        "prompt throughput 20.0 tok/s",
        "generation throughput 10.0 tok/s",
        "running 2 reqs",
        "waiting 1 reqs",
        "expert hit rate 75.0%",
        "link 2.00 GB/s",
        "TTFT SLO met 100.0%",
        "TPOT SLO met 0.0%",
    ):
        assert part in line, line


def test_text_deltas_hold_back_partial_characters_and_stop_prefixes():
    deltas = TextDeltas(["STOP"])
    assert deltas.next("ab\ufffd", False) == "ab"
    assert deltas.next("abé S", False) == "é "  # "S" may begin "STOP"
    assert deltas.next("abé ST", False) == ""
    assert deltas.next("abé STx", False) == "STx"
    assert deltas.next("abé STxy", True) == "y"


# ----------------------------------------------------------------------------- drain, CLI, bench


def test_sigterm_drains_running_requests_and_refuses_new(model):
    engine = LLMEngine(model, EngineConfig(**{**ENGINE_OPTIONS, "max_num_seqs": 2}))
    live = start_server(engine, ServerConfig(shutdown_timeout=60), draining=True)
    body = {"prompt": "drain", "max_tokens": 32, "temperature": 0, "ignore_eos": True}
    deadline = time.monotonic() + BOUND_S
    try:
        with (
            httpx.Client(base_url=live.url, timeout=BOUND_S) as c,
            c.stream("POST", "/v1/completions", json={**body, "stream": True}) as running,
        ):
            lines = running.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            live.uv.handle_exit(signal.SIGTERM, None)  # what uvicorn's SIGTERM handler calls
            probe = {**body, "max_tokens": 1}
            while (refused := c.post("/v1/completions", json=probe)).status_code == 200:
                assert time.monotonic() < deadline
            assert assert_envelope(refused, 503, "shutting down")["code"] == "server_shutting_down"
            assert c.get("/health").status_code == 503
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert (
            json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        )
        live.thread.join(BOUND_S)  # the drain ends the server by itself
        assert not live.thread.is_alive() and not live.bridge.is_alive
    finally:
        live.uv.should_exit = True
        live.thread.join(30)


def test_cli_registers_serve_and_bench():
    from duoserve.bench.serve_client import run_cli
    from duoserve.cli import build_parser
    from duoserve.server.cli import run_serve

    args = build_parser().parse_args(
        ["serve", "some-model", "--ttft-slo-ms", "500", "--max-waiting", "4", "--max-num-seqs", "2"]
    )
    assert (args.run, args.model_arg, args.ttft_slo_ms, args.max_waiting) == (
        run_serve,
        "some-model",
        500.0,
        4,
    )
    assert args.max_num_seqs == 2
    args = build_parser().parse_args(
        ["bench", "serve", "--num-prompts", "3", "--request-rate", "2"]
    )
    assert (args.run, args.num_prompts, args.request_rate) == (run_cli, 3, 2.0)


def test_bench_metrics_definitions():
    results = [
        RequestResult(True, 10, 5, ttft=0.1, itl=[0.1] * 4, latency=0.5),
        RequestResult(True, 20, 1, ttft=0.2, itl=[], latency=0.2),
        RequestResult(False, error="HTTP 503"),
    ]
    m = compute_metrics(results, duration_s=2.0, percentiles=[50, 99], goodput_ms={"tpot": 50})
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (
        2,
        1,
        30,
        6,
    )
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 3.0
    assert m["mean_tpot_ms"] == pytest.approx(100.0)  # (0.5 - 0.1) / 4; one-token outputs excluded
    assert m["mean_ttft_ms"] == pytest.approx(150.0) and m["mean_e2el_ms"] == pytest.approx(350.0)
    assert m["mean_itl_ms"] == pytest.approx(100.0) and m["p99_itl_ms"] == pytest.approx(100.0)
    assert m["request_goodput"] == 0.5  # only the 1-token request (TPOT 0) meets 50 ms
    assert "P99 TTFT (ms):" in format_table(m, ["ttft", "tpot", "itl", "e2el"], [50, 99])


def test_bench_client_against_server(server, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello there\nWhat is two plus two?\n")
    common = dict(
        base_url=server.url,
        model=None,
        api_key=API_KEY,
        num_prompts=4,
        request_rate=50.0,
        burstiness=1.0,
        max_concurrency=3,
        random_input_len=12,
        random_output_len=4,
        random_range_ratio=0.0,
        vocab_size=None,
        temperature=0.0,
        ignore_eos=True,
        seed=0,
        num_warmups=1,
        request_timeout=BOUND_S,
        percentiles=[50.0, 99.0],
        goodput_ms={"ttft": 1e6},
        dataset_path=None,
        endpoint="/v1/completions",
    )
    result = _run(run_benchmark(argparse.Namespace(**common)))
    assert result["completed"] == 4 and result["output_lens"] == [4] * 4
    assert result["input_lens"] == [12] * 4 and result["total_output_tokens"] == 16
    assert result["request_goodput"] == pytest.approx(result["request_throughput"])
    assert all(len(itl) <= 3 for itl in result["itls"]) and result["p99_ttft_ms"] > 0
    chat = dict(common, endpoint="/v1/chat/completions", dataset_path=str(prompts), num_prompts=2)
    result = _run(run_benchmark(argparse.Namespace(**chat)))
    assert result["completed"] == 2 and result["errors"] == ["", ""]


def test_bench_time_cap_counts_unfinished_requests_as_failed(server):
    args = argparse.Namespace(
        base_url=server.url,
        model=None,
        api_key=API_KEY,
        num_prompts=3,
        request_rate=float("inf"),
        burstiness=1.0,
        max_concurrency=None,
        random_input_len=8,
        random_output_len=200,  # seconds on the CPU: the cap cuts them
        random_range_ratio=0.0,
        vocab_size=None,
        temperature=0.0,
        ignore_eos=True,
        seed=0,
        num_warmups=0,
        request_timeout=BOUND_S,
        percentiles=[99.0],
        goodput_ms={"ttft": 1e6},
        dataset_path=None,
        endpoint="/v1/completions",
        max_duration_s=0.3,
    )
    result = _run(run_benchmark(args))
    assert (result["completed"], result["failed"], result["slo_attainment"]) == (0, 3, 0.0)
    assert all("cap" in error for error in result["errors"])
    _wait_idle(server)  # the server aborted them


# ----------------------------------------------------------------------------- trace replay


def _random_trace(engine: LLMEngine, path, num_tokens: int = 64):
    cfg = engine.model_config
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(cfg.num_moe_layers, num_tokens, cfg.num_experts, generator=gen)
    ids = scores.argsort(dim=-1)[..., : cfg.num_experts_per_tok].to(torch.int16)  # [L, N, K]
    save_file({"expert_ids": ids.contiguous()}, str(path))
    return path


def test_replay_trace_is_served_and_announced(model, oracle, tmp_path):
    from duoserve.server.cli import attach_replay

    engine = LLMEngine(model, EngineConfig(**ENGINE_OPTIONS))
    trace = _random_trace(engine, tmp_path / "trace.safetensors")
    replayed_oracle = LLM(model, **ENGINE_OPTIONS)
    TraceReplay(trace, torch.device("cpu"), window=16).attach(replayed_oracle.engine)
    live = start_server(engine, ServerConfig(), replay=attach_replay(engine, str(trace)))
    try:
        with httpx.Client(base_url=live.url, timeout=BOUND_S) as c:
            body = {"prompt": "The cat sat on", "max_tokens": 8, "temperature": 0}
            body["ignore_eos"] = True
            done = c.post("/v1/completions", json=body)
            streamed = c.post("/v1/completions", json={**body, "stream": True})
            version, card = c.get("/version").json(), c.get("/v1/models").json()["data"][0]
            metrics = c.get("/metrics").text
        # one request at a time gets KV slot 0, as the oracle's does: same forced routing
        want = replayed_oracle.generate("The cat sat on", greedy(8))[0].text
        assert done.json()["choices"][0]["text"] == want
        chunks = [json.loads(p) for p in sse_payloads(streamed.text)[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == want
        for response in (done, streamed):
            assert response.headers[ROUTING_HEADER] == "replayed trace.safetensors"
        for routing in (version["routing"], card["routing"]):
            assert routing.startswith("routing replayed from trace.safetensors"), routing
        assert 'duoserve:routing_info{source="replayed trace.safetensors"} 1.0' in metrics
    finally:
        live.stop()


def test_replay_trace_flag(tmp_path):
    from duoserve.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--replay-trace", "t.safetensors"])
    assert args.replay_trace == "t.safetensors"
    missing = str(tmp_path / "missing.safetensors")
    assert main(["serve", "--replay-trace", missing, "--port", "0"]) == 2  # refused, no load


# ----------------------------------------------------------------------------- the serving sweep


def test_sweep_metrics_on_canned_timings():
    # SLOs TTFT 2 s, TPOT 150 ms; 32 output tokens: TPOT = (E2EL - TTFT) / 31
    per_request = {
        "input_lens": [100, 120, 80, 90],
        "output_lens": [32, 32, 32, 0],
        "ttfts": [1.0, 2.5, 0.5, 0.0],  # the 2nd misses TTFT
        "e2els": [4.1, 5.6, 6.7, 0.0],  # TPOT 100, 100, 200 ms: the 3rd misses TPOT
        "itls": [[0.1] * 31, [0.1] * 31, [0.2] * 31, []],
        "errors": ["", "", "", "HTTP 503"],
    }
    m = serve_sweep.summarize_point(per_request, 10.0, {"ttft": 2000.0, "tpot": 150.0})
    assert (m["completed"], m["failed"], m["total_output_tokens"]) == (3, 1, 96)
    assert m["request_goodput"] == pytest.approx(0.1)  # 1 good request in 10 s
    assert m["slo_attainment"] == pytest.approx(0.25)  # of the 4 sent
    assert m["ttft_attainment"] == pytest.approx(0.5) and m["tpot_attainment"] == 0.5
    assert m["median_ttft_ms"] == pytest.approx(1000.0)
    assert m["p99_ttft_ms"] == pytest.approx(1000 + 0.98 * 1500)  # numpy's linear interpolation
    assert m["mean_tpot_ms"] == pytest.approx(400 / 3)
    assert m["p90_tpot_ms"] == pytest.approx(180.0)
    assert m["request_throughput"] == pytest.approx(0.3)
    assert m["output_throughput"] == pytest.approx(9.6)
    expert = serve_sweep.expert_delta(
        {"hits": 10, "misses": 5, "bytes_copied": 1e9, "hit_rate": 0.6},
        {"hits": 40, "misses": 15, "bytes_copied": 3e9, "prefetches": 10, "prefetch_hits": 6},
        4.0,
    )
    assert expert["hit_rate"] == pytest.approx(0.75) and expert["gb_copied"] == pytest.approx(2)
    assert expert["link_gbps"] == pytest.approx(0.5)
    assert expert["prefetch_accuracy"] == pytest.approx(0.6)


def test_serve_sweep_smoke_end_to_end(tmp_path):
    """The CPU smoke run: one engine, a policy that exists and one that does not, doc update."""
    doc = tmp_path / "serving.md"
    doc.write_text(f"# Serving\n\n## GPU\n{BEGIN}\nnot yet measured\n{END}\n\n## After\n")
    out = tmp_path / "sweep.json"
    serve_sweep.main(
        "--smoke --policies lru,no-such-policy --request-rates 50 --num-prompts 3 "
        f"--num-warmups 1 --out {out} --doc {doc}".split()
    )
    result = json.loads(out.read_text())
    assert result["routing"].startswith("routing replayed from sweep.trace.safetensors")
    [point] = result["points"]
    assert (point["policy"], point["request_rate"], point["completed"]) == ("lru", 50.0, 3)
    assert point["per_request"]["output_lens"] == [4, 4, 4]
    assert point["mean_itl_ms"] > 0  # a chunk per token, though random ids decode to no text
    assert point["expert"]["gb_copied"] > 0 and point["expert_slots"] > 0
    [skipped] = result["skipped"]
    assert skipped["policy"] == "no-such-policy" and "unknown policy" in skipped["reason"]
    text = doc.read_text()
    assert "not yet measured" not in text and text.endswith(f"{END}\n\n## After\n")
    assert "| lru | 50 | 3/3 |" in text and "no-such-policy" in text
    assert "TTFT <= 3000 ms and TPOT <= 400 ms" in text


@pytest.mark.gpu
def test_gpu_serve_sweep_smoke(tmp_path):
    """The sweep on CUDA with tiny shapes: policies switched in one process, all served."""
    out = tmp_path / "sweep.json"
    serve_sweep.main(
        "--smoke --device cuda --dtype bfloat16 --gpu-memory-budget 0.3 "
        f"--policies lru,duoserve,uniform --request-rates 20 --out {out}".split()
    )
    result = json.loads(out.read_text())
    for point in result["points"]:
        print(point["policy"], point["completed"], point["errors"], point["peak_gib"])
        assert point["completed"] == len(point["per_request"]["input_lens"]), point["errors"]
        assert point["peak_gib"] <= 0.3
    for skip in result["skipped"]:
        print("skipped:", skip)
    assert any(p["policy"] == "lru" for p in result["points"])
