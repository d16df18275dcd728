#!/usr/bin/env bash
# The GPU run of attnbench: DiT-XL/2 shapes in bfloat16, 256 → 8192 px, attention and
# model levels, every method variant, the kernels against their floors, the targets.
#
#   scripts/gpu_sweep.sh [OUT_DIR]        (default: reports/<gpu-name>/, e.g. reports/nvidia-h100-80gb-hbm3/)
#
# Installs nothing (no network is assumed): it runs in the environment as it is --
# .venv/bin/python if it exists (./dev creates it; on a CUDA machine it keeps the
# system torch), else $PYTHON or python3. torch must see a CUDA GPU; triton comes
# with torch's CUDA wheels; flash-attn and xformers are measured when they import and
# recorded as unavailable (with the reason) when not.
#
# Environment knobs:
#   RES=256,512,1024,2048,4096,8192   resolutions in px
#   LEVELS=attention,model            benchmark levels
#   BUDGET=300                        seconds one point may take (longer ones are skipped,
#                                     with the reason, from the predicted time)
#   METHODS=...                       default: softmax,flash,xformers,lit,clear:radius=8,
#                                     clear:radius=16,clear:radius=32,sla:topk=0.2,
#                                     sla:topk=0.1,sla:topk=0.05 (80/90/95% sparsity)
#   SKIP_TESTS=1                      skip the kernel tests on the GPU (not advised)
#   QUICK=1                           a smoke run: 256,1024 px, attention level, budget 30
#
# Expected output, in OUT_DIR (a rerun resumes the sweep where it stopped):
#   gpu_sweep.log        everything printed below
#   nvidia-smi.txt       the GPU, driver, clocks at the start
#   methods.txt          `attnbench list` on cuda/bfloat16: which implementation runs, or why not
#   kernel_tests.txt     tests/attention/test_kernels.py compiled on this GPU (fp32, fp16, bf16)
#                        and test_correctness.py; kernel_tests.rc holds pytest's exit code
#   floor.json, floor.md measured HBM copy bandwidth and dense bf16 TFLOP/s; at 8192 px each
#                        kernel's median time, its floor and the fraction of the floor reached:
#                        LiT forward/backward and its two launches (bytes / bandwidth), SDPA
#                        flash and cuDNN (4·B·H·N²·d / TFLOP/s), SLA at 95% with both
#                        corrections and its block map, CLEAR flex r=8 in tile and row order
#   sweep/               results.csv/.json/.jsonl + meta.json (every point: latency median/p20/p80,
#                        peak memory, FLOPs, the implementation that ran, overhead steps such
#                        as SLA's block_map and CLEAR's block_mask / tile_permute timed apart,
#                        or the reason a point was skipped), report.md, report.html, plots/
#   sweep/targets.md     the issue's targets at 8192 px: met / MISSED / not measured
#
# What to expect on an H100 SXM (estimates from the models, to be replaced by the run):
# HBM copy ~3.0 TB/s, bf16 matmul ~600-750 TFLOP/s; at 8192 px (262,144 tokens, 16 heads
# of 72) q, k, v, out are 2.42 GB, so the LiT floor is ~0.8 ms, while SDPA flash needs
# ~316 TFLOP (~0.5-0.8 s): LiT ≥ 200× holds from ~35% of the bandwidth on. SLA at 95%
# computes ~6.4% of the dense FLOPs (64+16 head pieces, "gemm" correction): ≤ ~15×
# at flash's efficiency. CLEAR r=8 at 512×512 computes 0.43% of the 128² tiles in tile order
# (1.65% against 5.77% row-major at 256×256): ≥ 50× needs flex at ~25% of flash's FLOP rate.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_sweep: $PY's torch sees no CUDA GPU; nothing to measure" >&2
    exit 2
fi
GPU=$("$PY" -c 'import re, torch
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))')
OUT=${1:-reports/$GPU}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_sweep.log") 2>&1
unset TRITON_INTERPRET  # compiled kernels: the interpreter is for CPU tests only

RES=${RES:-256,512,1024,2048,4096,8192}
LEVELS=${LEVELS:-attention,model}
BUDGET=${BUDGET:-300}
METHODS=${METHODS:-softmax,flash,xformers,lit,clear:radius=8,clear:radius=16,clear:radius=32,sla:topk=0.2,sla:topk=0.1,sla:topk=0.05}
if [[ -n "${QUICK:-}" ]]; then RES=256,1024; LEVELS=attention; BUDGET=30; fi

echo "== gpu_sweep $(date -u +%FT%TZ) on $GPU -> $OUT ($PY)"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "nvidia-smi unavailable" >"$OUT/nvidia-smi.txt"
"$PY" -c 'import torch, importlib
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.get_device_name(0))
for m in ("triton", "flash_attn", "flash_attn_interface", "xformers"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as err:
        print(m, "unavailable:", type(err).__name__, str(err).splitlines()[0][:120])'
"$PY" -m attnbench list --device cuda --dtype bfloat16 | tee "$OUT/methods.txt"

echo "== 1/4 the kernels on this GPU (compiled), against their references"
if [[ -z "${SKIP_TESTS:-}" ]]; then
    set +e
    "$PY" -m pytest -q -p no:cacheprovider tests/attention/test_kernels.py \
        tests/attention/test_correctness.py 2>&1 | tee "$OUT/kernel_tests.txt"
    echo "${PIPESTATUS[0]}" >"$OUT/kernel_tests.rc"
    set -e
    if [[ "$(cat "$OUT/kernel_tests.rc")" != 0 ]]; then
        echo "!! kernel tests FAILED (see kernel_tests.txt): the numbers below are not trustworthy"
    fi
fi

echo "== 2/4 device ceilings and every kernel against its floor at 8192 px"
"$PY" -m attnbench.bench.floor measure --model DiT-XL/2 --res 8192 \
    --dtype bfloat16 --out "$OUT" || echo "!! floor measurement failed (see above)"

echo "== 3/4 the sweep: DiT-XL/2, bf16, $RES px, levels $LEVELS"
"$PY" -m attnbench run --device cuda --model DiT-XL/2 --dtype bfloat16 --res "$RES" \
    --level "$LEVELS" --methods "$METHODS" --budget "$BUDGET" --out "$OUT/sweep" --no-progress

echo "== 4/4 targets and report"
"$PY" -m attnbench.bench.floor targets "$OUT/sweep" --res 8192 || true
[[ -f "$OUT/sweep/report.html" ]] || "$PY" -m attnbench report "$OUT/sweep" || true
echo "== done: $OUT (commit it: raw results, report, floor and targets)"
