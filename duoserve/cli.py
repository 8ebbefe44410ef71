"""Command line: duoserve generate | synth | serve | bench ..."""

from __future__ import annotations

import argparse
import sys
import time

from duoserve.config import EngineConfig, add_dataclass_flags, dataclass_from_args


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text for one prompt")
    p.add_argument(
        "--model", default=None, help="HF folder or synthetic:ARCH[:tiny] (default: built-in)"
    )
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="render the prompt with the chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    add_dataclass_flags(p, EngineConfig)


def _run_generate(args: argparse.Namespace) -> int:
    from duoserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, **vars(dataclass_from_args(EngineConfig, args)))
    load_s = time.perf_counter() - t0
    params = SamplingParams(
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )
    prompt = args.prompt
    if args.chat:
        out = llm.chat([{"role": "user", "content": prompt}], params)
    else:
        out = llm.generate(prompt, params)[0]
    print(out.text)
    elapsed = out.finished_time - out.arrival_time
    ttft = out.first_token_time - out.arrival_time
    n = len(out.output_token_ids)
    print(
        f"[duoserve] model {llm.engine.model_name} on {llm.engine.device} "
        f"({str(llm.engine.dtype).removeprefix('torch.')}), loaded in {load_s:.1f} s; "
        f"{n} tokens in {elapsed:.2f} s, TTFT {ttft * 1e3:.0f} ms, finish: {out.finish_reason}",
        file=sys.stderr,
    )
    return 0


def _add_synth(sub) -> None:
    from duoserve.weights.synthetic import ARCHS, SCALES

    p = sub.add_parser("synth", help="write a random-weights HF checkpoint of a known topology")
    p.add_argument("--arch", required=True, choices=sorted(ARCHS))
    p.add_argument("--scale", default="tiny", choices=SCALES)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)


def _run_synth(args: argparse.Namespace) -> int:
    from duoserve.weights.synthetic import write_synthetic_checkpoint

    t0 = time.perf_counter()
    out = write_synthetic_checkpoint(args.arch, args.scale, args.out, seed=args.seed)
    print(f"wrote {args.arch} ({args.scale}) to {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duoserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_synth(sub)
    try:  # the server registers its own commands (serve, bench serve)
        from duoserve.server.cli import add_server_commands
    except ImportError:
        add_server_commands = None
    if add_server_commands is not None:
        add_server_commands(sub)
    from duoserve.predictor.cli import add_predictor_commands

    add_predictor_commands(sub)  # trace | train-predictor | eval-predictor
    return parser


# `duoserve bench NAME ...` -> NAME's module `main(argv)`, which parses its own flags (imported
# only when asked for: some are written by other issues and may not exist yet)
BENCH_PROGRAMS = {
    "offload": "duoserve.bench.offload",
    "resident": "duoserve.bench.resident",
    "suite": "duoserve.bench.suite",
    "report": "duoserve.bench.report",
    "prefill": "duoserve.bench.prefill",
    "decode": "duoserve.bench.decode",
    "serve-sweep": "duoserve.bench.serve_sweep",
}


def _run_bench_program(name: str, argv: list[str]) -> int:
    import importlib

    module_name = BENCH_PROGRAMS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the program exists but something it imports does not
        print(f"duoserve: error: `bench {name}` is not available: {module_name} does not exist "
              "in this checkout", file=sys.stderr)  # fmt: skip
        return 2
    module.main(argv)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCH_PROGRAMS:
        return _run_bench_program(argv[1], argv[2:])
    args = build_parser().parse_args(argv)
    runners = {"generate": _run_generate, "synth": _run_synth}
    try:
        if args.command in runners:
            return runners[args.command](args)
        return args.run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"duoserve: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
