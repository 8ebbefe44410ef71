"""Files to ship: replay traces and distance-trimmed predictors.

    python -m duoserve.predictor.export replay TRACE [TRACE ...] --out FILE \
        [--max-bytes 12582912] [--distances 1] [--width M]
    python -m duoserve.predictor.export predictor IN.safetensors --out OUT.safetensors \
        [--distances 1] [--max-bytes N]

`replay` writes a replay file (format: replay_file.py) from tracer trace folders, keeping
as many whole sequences as fit (spread evenly over the trace). `predictor` rewrites a
predictor file with only some distances (fp16); with --max-bytes it drops the largest
distances until the file fits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from duoserve.predictor.model import Predictor


def keep_distances(predictor: Predictor, distances: tuple[int, ...]) -> Predictor:
    """The same predictor with the tables of `distances` only (a subset of its own)."""
    have = predictor.config.distances
    assert distances and set(distances) <= set(have), f"{distances} not a subset of {have}"
    config = dataclasses.replace(predictor.config, distances=tuple(distances))
    out = Predictor(config)
    state = predictor.state_dict()
    out.load_state_dict({k: v for k, v in state.items() if k in out.state_dict()})
    out.training_record = {**predictor.training_record, "kept_distances": list(distances)}
    return out.eval()


def export_predictor(
    src: str | Path, out: str | Path, distances: tuple[int, ...] | None, max_bytes: int | None
) -> dict:
    """Write `src` with `distances` (default all) as fp16; drop the largest distances while
    the file exceeds max_bytes. Returns {"distances", "bytes"}."""
    predictor = Predictor.load(src)
    keep = tuple(distances or predictor.config.distances)
    while True:
        path = keep_distances(predictor, keep).save(out)
        size = path.stat().st_size
        if max_bytes is None or size <= max_bytes or len(keep) == 1:
            break
        keep = keep[:-1]
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{out}: {size} bytes even with d={keep} only (limit {max_bytes})")
    return {"distances": list(keep), "bytes": size}


def _distances(text: str) -> tuple[int, ...]:
    return tuple(int(d) for d in text.split(",") if d.strip())


def main(argv: list[str] | None = None) -> int:
    """CLI (module docstring); prints a JSON summary line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("replay", help="trace folders -> one replay file")
    r.add_argument("traces", nargs="+")
    r.add_argument("--out", required=True)
    r.add_argument("--max-bytes", type=int, default=12 << 20)
    r.add_argument("--distances", default="1", help="lookahead distances kept ('' for none)")
    r.add_argument("--width", type=int, default=None, help="lookahead experts kept (all)")
    p = sub.add_parser("predictor", help="predictor file -> fp16 file with fewer distances")
    p.add_argument("predictor")
    p.add_argument("--out", required=True)
    p.add_argument("--distances", default=None, help="comma list (default: all)")
    p.add_argument("--max-bytes", type=int, default=None)
    args = parser.parse_args(argv)
    if args.what == "replay":
        from duoserve.predictor.replay_file import write_replay
        from duoserve.predictor.trace import load_traces

        trace = load_traces(args.traces)
        meta = {"command": " ".join(["python -m duoserve.predictor.export", *sys.argv[1:]])}
        summary = write_replay(
            trace, args.out, args.max_bytes, _distances(args.distances), args.width, meta
        )
    else:
        distances = _distances(args.distances) if args.distances else None
        summary = export_predictor(args.predictor, args.out, distances, args.max_bytes)
    print(json.dumps({"out": args.out, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
