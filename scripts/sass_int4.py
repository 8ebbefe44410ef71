"""Compile an int4 Triton kernel for sm_90 on a machine without a GPU and summarize its SASS.

Uses triton's own ptxas / nvdisasm. Prints registers, spills, whether the loop uses cp.async and
wgmma, and the instruction histogram of the main loop (the longest backward-branch body).

    python scripts/sass_int4.py tc --bn 64 --bt 16 --fused --warps 4 --stages 4
    python scripts/sass_int4.py tc --bn 128 --bt 128 --pre-scale --warps 8 --stages 3 --dump out/
    python scripts/sass_int4.py wgs --bt 256 --bn 128 --stages 4 --ahead 3 --fused
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.compiler import ASTSource

from duoserve.quant import _int4_tc_triton, _int4_triton
from duoserve.quant.sm90 import compile_sm90

# the runtime arguments of tc and tcg (same launcher shape)
_TC_SIGNATURE = {
    "xp_ptr": "*bf16", "qw_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*u8", "y_ptr": "*bf16",
    "ws_ptr": "*fp32", "cnt_ptr": "*i32", "T": "i32", "N": "i32", "KW": "i32", "G": "i32",
    "up_offset": "i32", "stride_xt": "i32", "stride_yt": "i32", "groups_per_split": "i32",
}  # fmt: skip


def _compile(source, fn, sig: dict, consts: dict, div16: tuple, warps: int, stages: int):
    return compile_sm90(source, fn, sig, consts, div16, {"num_warps": warps, "num_stages": stages})


def compile_tc(args: argparse.Namespace):
    consts = dict(
        HAS_ZEROS=True, FUSED=args.fused, PERMUTE_OUT=args.fused, GROUP=128, BN=args.bn,
        BT=args.bt, PRE_SCALE=args.pre_scale, USE_ASM=True, DOT_FP32=False, NS=args.stages,
        PREFETCH=args.prefetch, SPLIT=args.split, WIDE=args.wide,
    )  # fmt: skip
    return _compile(
        ASTSource, _int4_tc_triton.tc, _TC_SIGNATURE, consts, ("KW", "G", "stride_xt"),
        args.warps, args.stages,
    )  # fmt: skip


def compile_stream(args: argparse.Namespace):
    sig = {
        "xp_ptr": "*i32" if args.half else "*fp32", "qw_ptr": "*i32", "s_ptr": "*bf16",
        "z_ptr": "*u8", "y_ptr": "*bf16",
        "T": "i32", "N": "i32", "KW": "i32", "up_offset": "i32", "stride_y": "i32",
        "stride_q": "i32", "stride_s": "i32", "magic": "i32",
    }  # fmt: skip
    consts = dict(
        HAS_ZEROS=True, FUSED=args.fused, GROUP=128, BN=args.bn, G=args.bk // 128, BT=args.bt,
        NS=args.stages, PREFETCH=args.prefetch, SX=args.k // 8, EVEN=True, PDL=True,
        ONE_PASS=args.one_pass, AHEAD=args.ahead, HALF=1 if args.half else 0,
    )  # fmt: skip
    return _compile(
        ASTSource, _int4_triton.stream, sig, consts, ("stride_q",), args.warps, args.stages
    )


def compile_tcg(args: argparse.Namespace):
    from triton.experimental.gluon._runtime import GluonASTSource

    from duoserve.quant import _int4_tcg_gluon

    consts = dict(
        HAS_ZEROS=True, FUSED=args.fused, W=args.warps, SPLIT=args.split,
        DEPTH=3 if args.prefetch else 1,
    )  # fmt: skip
    return _compile(
        GluonASTSource, _int4_tcg_gluon.tcg, _TC_SIGNATURE, consts, ("KW", "G", "stride_xt"),
        args.warps, 1,
    )  # fmt: skip


def compile_wgs(args: argparse.Namespace):
    from duoserve.quant.int4_wgs import WgsConfig, compile_sm90

    cfg = WgsConfig(
        bm=args.bt, bn=args.bn, stages=args.stages, halves_per_stage=args.hs, ahead=args.ahead,
        split_k=2 if args.split else 1, swap=not args.no_swap,
        producer_warps=args.producer_warps, producer_regs=args.producer_regs,
        maxnreg=args.maxnreg,
    )  # fmt: skip
    return compile_sm90(cfg, args.fused)


def sass_of(cubin: bytes) -> str:
    nvdisasm = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run(
            [str(nvdisasm), "-c", "-hex", f.name], capture_output=True, text=True, check=True
        ).stdout


def _resources(cubin: bytes) -> str:
    # "REG:168 STACK:0 SHARED:0 LOCAL:0 ..." from cuobjdump
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"(REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+)", out)
    return m.group(1) if m else out


def main_loop(sass: str) -> list[str]:
    # instructions of the longest loop: from a label to the branch that jumps back to it
    label_at: dict[str, int] = {}
    instrs: list[tuple[int, str]] = []
    for line in sass.splitlines():
        if m := re.match(r"\s*(\.L_x_\d+):", line):
            label_at[m.group(1)] = len(instrs)
        elif m := re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", line):
            instrs.append((int(m.group(1), 16), m.group(2)))
    best: list[str] = []
    for i, (_, text) in enumerate(instrs):
        m = re.search(r"BRA\S*\s+`\((\.L_x_\d+)\)", text)
        if m and label_at.get(m.group(1), i + 1) <= i:
            body = [t for _, t in instrs[label_at[m.group(1)] : i + 1]]
            best = max(best, body, key=len)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kernel", choices=["tc", "stream", "tcg", "wgs"])
    parser.add_argument("--bk", type=int, default=4096, help="stream: inputs per step")
    parser.add_argument("--k", type=int, default=4096, help="stream: K (x' row stride)")
    parser.add_argument("--bn", type=int, default=64)
    parser.add_argument("--bt", type=int, default=16)
    parser.add_argument("--warps", type=int, default=4)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--fused", action="store_true")
    parser.add_argument("--pre-scale", action="store_true")
    parser.add_argument("--prefetch", action="store_true")
    parser.add_argument("--one-pass", action="store_true", help="stream: fused in one pass")
    parser.add_argument(
        "--ahead", type=int, default=1, help="stream: prefetch depth in steps; wgs: groups"
    )
    parser.add_argument("--half", action="store_true", help="stream: fp16x2 products")
    parser.add_argument("--wide", action="store_true", help="tc: wide scale / zero loads")
    parser.add_argument("--split", action="store_true", help="tc: compile the split-K reduction")
    parser.add_argument("--producer-warps", type=int, default=4, help="wgs")
    parser.add_argument("--producer-regs", type=int, default=168, help="wgs")
    parser.add_argument("--maxnreg", type=int, default=168, help="wgs")
    parser.add_argument("--no-swap", action="store_true", help="wgs: x as the A operand")
    parser.add_argument("--hs", type=int, default=1, help="wgs: halves of a group per stage")
    parser.add_argument("--dump", type=Path, default=None, help="write ttgir/ptx/sass here")
    args = parser.parse_args()
    compile_fn = {
        "tc": compile_tc, "stream": compile_stream, "tcg": compile_tcg, "wgs": compile_wgs
    }[args.kernel]  # fmt: skip
    k = compile_fn(args)
    sass = sass_of(k.asm["cubin"])
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        for ext in ("ttgir", "ptx"):
            (args.dump / f"tc.{ext}").write_text(k.asm[ext])
        (args.dump / "tc.sass").write_text(sass)
    print(f"{_resources(k.asm['cubin'])}  shared {k.metadata.shared} B")
    loop = main_loop(sass)
    ops = collections.Counter()
    for t in loop:
        tok = t.split()
        op = tok[1] if tok[0].startswith("@") else tok[0]
        ops[op.split(".")[0]] += 1
    print(f"main loop: {len(loop)} instructions")
    print("  " + "  ".join(f"{op} {n}" for op, n in ops.most_common(24)))


if __name__ == "__main__":
    main()
