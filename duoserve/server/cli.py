"""`duoserve serve` and `duoserve bench serve` (registered by duoserve/cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from types import FrameType

import uvicorn

from duoserve.config import EngineConfig, add_dataclass_flags, dataclass_from_args
from duoserve.server.bridge import EngineBridge
from duoserve.server.config import ServerConfig

logger = logging.getLogger("duoserve.server")
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM drains: new requests get 503 while running ones finish.

    After `drain_timeout_s` the requests still running are aborted (their clients get
    finish_reason "abort") and the server exits. SIGINT and a second SIGTERM stop at once,
    as plain uvicorn does.
    """

    def __init__(self, config: uvicorn.Config, bridge: EngineBridge, drain_timeout_s: float):
        super().__init__(config)
        self.bridge = bridge
        self.drain_timeout_s = drain_timeout_s
        self.drain_task: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.drain_task is None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.begin_drain)
            return
        super().handle_exit(sig, frame)

    def begin_drain(self) -> None:
        """Start draining (idempotent)."""
        if self.drain_task is None:
            self.drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        bridge = self.bridge
        bridge.is_draining = True
        logger.info(
            "draining %d requests for up to %.0f s; new requests get 503",
            len(bridge.active),
            self.drain_timeout_s,
        )
        if not await bridge.wait_drained(self.drain_timeout_s):
            logger.warning("shutdown timeout: aborting %d requests", len(bridge.active))
            for request_id in list(bridge.active):
                bridge.abort(request_id)
            await bridge.wait_drained(5.0)
        self.should_exit = True


def add_server_commands(sub: argparse._SubParsersAction) -> None:
    """Register `serve` and `bench serve` on the top-level subparsers."""
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (continuous batching)")
    p.add_argument(
        "model_arg",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="HF folder or synthetic:ARCH[:tiny] (default: the built-in model)",
    )
    p.add_argument("--model", default=None, help="same as the positional MODEL")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument(
        "--replay-trace",
        default=None,
        metavar="PATH",
        help="force expert routing from a recorded trace (.safetensors, for benchmarks of "
        "synthetic models); every response says so (header x-duoserve-routing)",
    )
    add_dataclass_flags(p, ServerConfig)
    add_dataclass_flags(p, EngineConfig)
    p.set_defaults(run=run_serve)

    from duoserve.bench.serve_client import add_cli_args, run_cli

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    client = bench_sub.add_parser(
        "serve", help="load a running server; report vllm-bench-serve metrics"
    )
    add_cli_args(client)
    client.set_defaults(run=run_cli)
    for name, helptext in (  # run by duoserve/cli.py's main, which hands them their flags
        ("offload", "offloading policies at GPU memory budgets (--budgets GiB ...)"),
        ("resident", "full-GPU upper bound vs transformers on the same weights"),
        ("suite", "a benchmark scenario (S1, S2, S3) over every policy, next to the bounds"),
        ("report", "regenerate docs/benchmarks.md from the suite's JSON"),
        ("prefill", "prefill TTFT per policy and budget, next to the PCIe bound"),
        ("decode", "decode TPOT per policy, next to the Belady and compute-only bounds"),
        ("serve-sweep", "goodput and p99 latencies against request rate, per policy"),
    ):
        bench_sub.add_parser(name, help=helptext)


def attach_replay(engine, path: str):
    """Force `engine`'s routing from the trace at `path`; returns the attached TraceReplay."""
    from duoserve.bench.replay import TraceReplay

    if not os.path.isfile(path):
        raise FileNotFoundError(f"--replay-trace {path}: no such file")
    replay = TraceReplay(path, engine.device)
    replay.attach(engine)
    return replay


def run_serve(args: argparse.Namespace) -> int:
    """Load the model, then serve until SIGTERM (drain) or SIGINT."""
    from duoserve.engine.llm_engine import LLMEngine
    from duoserve.server.app import build_app

    if args.model_arg and args.model and args.model_arg != args.model:
        raise ValueError(f"two models given: '{args.model_arg}' and --model '{args.model}'")
    model = args.model_arg or args.model
    if args.replay_trace and not os.path.isfile(args.replay_trace):  # before a long load
        raise FileNotFoundError(f"--replay-trace {args.replay_trace}: no such file")
    api_key = args.api_key or os.environ.get("DUOSERVE_API_KEY") or None
    config = dataclass_from_args(ServerConfig, args, api_key=api_key)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if config.host not in LOOPBACK_HOSTS and config.api_key is None:
        logger.warning(
            "listening on %s without --api-key: anyone who can reach it may use it", config.host
        )
    engine = LLMEngine(model, dataclass_from_args(EngineConfig, args))
    logger.info("loaded %s in %.1f s", engine.model_name, engine.load_seconds)
    replay = attach_replay(engine, args.replay_trace) if args.replay_trace else None
    app = build_app(engine, config, model_name=model, replay=replay)
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
        access_log=args.log_level == "debug",
    )
    DrainingServer(uv_config, app.state.bridge, config.shutdown_timeout).run()
    return 0
