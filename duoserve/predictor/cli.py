"""Commands: duoserve trace | train-predictor | eval-predictor (see docs/predictor.md).

`add_predictor_commands(subparsers)` registers them; each sets `run=fn` (fn(args) -> int).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from duoserve.config import EngineConfig, add_dataclass_flags, dataclass_from_args


def _command() -> str:
    """This command line as `duoserve ...` (for the records the commands write)."""
    return " ".join(["duoserve", *sys.argv[1:]])


def _add_trace(sub) -> None:
    p = sub.add_parser("trace", help="record routing traces of a model on a prompts file")
    p.add_argument("--model", default=None, help="HF folder or synthetic:ARCH[:tiny]")
    p.add_argument("--prompts", required=True, help="text lines or JSONL (prompt/text); .gz ok")
    p.add_argument("--out", required=True, help="trace folder to create")
    p.add_argument("--max-tokens", type=int, default=64, help="decode tokens per prompt")
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="prompts are cut to this")
    p.add_argument("--max-prompts", type=int, default=None, help="use the first N prompts")
    p.add_argument("--passage-chars", type=int, default=None, help="cut texts into passages")
    p.add_argument("--every", type=int, default=1, help="keep every n-th prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=0, help="sampling seed of prompt i is seed + i")
    p.add_argument("--lookahead", type=int, default=4, help="gate-lookahead distances 1..D")
    p.add_argument("--lookahead-width", type=int, default=None, help="experts kept (def. 2K)")
    p.add_argument("--chunk-tokens", type=int, default=65536, help="token rows per chunk file")
    p.add_argument("--max-seconds", type=float, default=None, help="stop tracing after this")
    add_dataclass_flags(p, EngineConfig)
    p.set_defaults(run=_run_trace)


def _run_trace(args: argparse.Namespace) -> int:
    from duoserve.engine.llm_engine import LLMEngine
    from duoserve.predictor.tracer import read_prompts, trace_prompts

    prompts = read_prompts(args.prompts, args.max_prompts, args.passage_chars, args.every)
    engine = LLMEngine(args.model, dataclass_from_args(EngineConfig, args))
    t0 = time.perf_counter()
    out = trace_prompts(
        engine,
        prompts,
        args.out,
        max_tokens=args.max_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        temperature=args.temperature,
        seed=args.seed,
        lookahead=args.lookahead,
        lookahead_width=args.lookahead_width,
        chunk_tokens=args.chunk_tokens,
        extra_meta={"prompts_file": str(args.prompts), "command": _command()},
        max_seconds=args.max_seconds,
    )
    meta = json.loads((out / "meta.json").read_text())
    print(
        f"wrote {meta['num_tokens']} tokens ({meta['num_prefill_tokens']} prefill, "
        f"{meta['num_decode_tokens']} decode) of {len(prompts)} prompts to {out} "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def _parse_features(text: str) -> tuple[str, ...]:
    from duoserve.predictor.model import ALL_FEATURES, FEATURE_SETS

    if text in FEATURE_SETS:
        return FEATURE_SETS[text]
    names = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in names if f not in ALL_FEATURES]
    if bad:
        raise ValueError(f"unknown features {bad}; known: {ALL_FEATURES} or {list(FEATURE_SETS)}")
    return names


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lookahead", type=int, default=4, help="predict distances d = 1..D")
    p.add_argument("--path-layers", type=int, default=4, help="activation-path layers W")
    p.add_argument("--hidden", type=int, default=64, help="MLP width (0: linear)")
    p.add_argument("--lookahead-width", type=int, default=4, help="gate-lookahead experts M")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokens", default="all", choices=("all", "prefill", "decode"))
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N: where to train/score")
    p.add_argument(
        "--max-minutes", type=float, default=None, help="stop after the epoch past this limit"
    )


def _add_train(sub) -> None:
    p = sub.add_parser("train-predictor", help="train the expert predictor on traces")
    p.add_argument("traces", nargs="+", help="trace folders or routing_trace.safetensors")
    p.add_argument("--out", required=True, help="predictor .safetensors file to write")
    p.add_argument("--features", default="ours", help="ours | paper | comma list of features")
    _add_model_flags(p)
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from duoserve.predictor.model import PredictorConfig
    from duoserve.predictor.trace import load_traces
    from duoserve.predictor.train import train_predictor

    trace = load_traces(args.traces).tokens(args.tokens)
    features = _parse_features(args.features)
    width = min(args.lookahead_width, trace.num_experts)
    if "lookahead" in features and trace.lookahead_ids is not None:
        width = min(width, trace.lookahead_ids.shape[3])
    config = PredictorConfig(
        trace.num_layers,
        trace.num_experts,
        trace.top_k,
        distances=tuple(range(1, min(args.lookahead, trace.num_layers - 1) + 1)),
        features=features,
        path_layers=args.path_layers,
        lookahead_width=width,
        hidden=args.hidden,
    )
    predictor = train_predictor(
        trace,
        config,
        args.epochs,
        args.batch_size,
        args.lr,
        args.seed,
        device=args.device,
        max_minutes=args.max_minutes,
    )
    predictor.training_record["command"] = _command()
    predictor.training_record["date"] = time.strftime("%Y-%m-%d")
    out = predictor.save(args.out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB): {predictor.training_record}")
    return 0


def _add_eval(sub) -> None:
    from duoserve.predictor.evaluate import ORDER

    p = sub.add_parser("eval-predictor", help="compare expert predictors on held-out traces")
    p.add_argument("--train", nargs="+", required=True, help="traces to fit predictors on")
    p.add_argument("--test", nargs="*", default=[], help="held-out traces (default: a split)")
    p.add_argument("--holdout-fraction", type=float, default=0.2, help="without --test")
    p.add_argument("--predictors", default=",".join(ORDER), help="comma list")
    p.add_argument("--load", action="append", default=[], help="NAME=predictor.safetensors")
    p.add_argument("--budget", type=int, default=None, help="prefetch budget (default 2K)")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--plot", default=None, help="write a PNG here")
    p.add_argument("--title", default="", help="plot title")
    _add_model_flags(p)
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from duoserve.predictor.evaluate import evaluate_predictors, markdown_table, plot_rows
    from duoserve.predictor.model import Predictor
    from duoserve.predictor.trace import load_traces, split_by_sequence

    train = load_traces(args.train)
    if args.test:
        test = load_traces(args.test)
    else:
        train, test = split_by_sequence(train, args.holdout_fraction, args.seed)
    loaded = {}
    for item in args.load:
        name, _, path = item.partition("=")
        loaded[name] = Predictor.load(path)
    train_kw = {
        "max_distance": args.lookahead,
        "path_layers": args.path_layers,
        "hidden": args.hidden,
        "lookahead_width": args.lookahead_width,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "device": args.device,
        "max_minutes": args.max_minutes,
    }
    rows = evaluate_predictors(
        train,  # all tokens: a token routes alike in prefill and decode (prefix only)
        test,
        names=[n.strip() for n in args.predictors.split(",") if n.strip()],
        distances=tuple(range(1, args.lookahead + 1)),
        budget=args.budget,
        tokens=args.tokens,
        predictors=loaded,
        train_kw=train_kw,
        device=args.device,
    )
    print(markdown_table(rows, train.top_k))
    record = {
        "command": _command(),
        "date": time.strftime("%Y-%m-%d"),
        "train": args.train,
        "test": args.test or f"holdout {args.holdout_fraction} of train sequences",
        "train_tokens": train.num_tokens,
        "test_tokens": test.tokens(args.tokens).num_tokens,
        "tokens": args.tokens,
        "title": args.title,
        "model": train.meta.get("model"),
        "topology": [train.num_layers, train.num_experts, train.top_k],
        "device": args.device,
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    if args.plot:
        plot_rows(rows, train.top_k, args.plot, args.title)
    return 0


def add_predictor_commands(subparsers) -> None:
    """Register trace, train-predictor and eval-predictor on a `duoserve` subparsers object."""
    _add_trace(subparsers)
    _add_train(subparsers)
    _add_eval(subparsers)


def main(argv: list[str] | None = None) -> int:
    """`python -m duoserve.predictor.cli ...`: the same as `duoserve ...` (commands above)."""
    from duoserve.cli import main as duoserve_main

    return duoserve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
