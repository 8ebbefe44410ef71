#!/usr/bin/env bash
# GPU machine, issue 7: the int4 kernel bench (config sweep of the stream kernel and the round-1
# gemv/mma and the w4a16 prefill GEMM, % of the HBM roofline, vs cuBLAS bf16, prefill at 512
# tokens: fused W4A16 expert vs dequant + cuBLAS vs bf16 cuBLAS,
# fused mma, and the next expert's dequant overlapped on a side stream; a PINNED table to
# paste) and the GPU tests of tests/test_quant.py (real Mixtral / Qwen3-30B-A3B shapes).
# About 3 minutes on one H100 (most of it triton compiling ~55 kernel variants).
# Run from the repo root; logs and JSON go to $OUT (or ./out).
# SMOKE=1: CPU smoke test of the bench (Triton interpreter, tiny shapes); no GPU tests.
# BENCH_ARGS: extra bench flags, e.g. "--kinds stream1,gemv,tc --tokens 1,16".
set -uo pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if [ "${SMOKE:-0}" = 1 ]; then
    export TRITON_INTERPRET=1
else
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
fi
start=$SECONDS
"$PY" -m duoserve.bench.int4_kernels --out "$OUT/int4_kernels.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/int4.log" \
    | grep -vE "^(mixtral|qwen3|tiny): T=" | tail -60
rc=${PIPESTATUS[0]}
if [ "${SMOKE:-0}" != 1 ]; then
    "$PY" -m pytest tests/test_quant.py tests/test_quant_prefill.py tests/test_quant_tc.py tests/test_quant_tcg.py tests/test_quant_wgs.py tests/test_gpu_int4.py -m gpu -o addopts="" -q 2>&1 | tee "$OUT/int4_tests.log" \
        | tail -15
    rc=$((rc | PIPESTATUS[0]))
fi
echo "gpu_int4: exit $rc after $((SECONDS - start)) s"
exit $rc
