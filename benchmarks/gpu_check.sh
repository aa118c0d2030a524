#!/usr/bin/env bash
# The one-GPU check of issue 17 (item 6), in under 8 minutes on one NVIDIA GPU; installs nothing.
#
#   benchmarks/gpu_check.sh              on a GPU machine (repo pip-installed with the test extras, CUDA torch)
#   benchmarks/gpu_check.sh --dry-run    the same steps on CPU with tiny sizes (or CPU_OK=1): tests the script
#
# Steps: 1. the CUDA-marked tests (tests/cuda: memory readings, a real CUDA OOM dump, fp16 GradScaler in the
# HF Trainer and Lightning callbacks, the compiled statistics kernel, async host copies, the update budget);
# 2. benchmarks/overhead.py on GPT-2 124M, bf16 autocast (unsampled, sampled, amortized, the .item()
# reference); 3. benchmarks/memory_overhead.py (extra peak memory of a sampled step). Prints one table at the
# end (benchmarks/gpu_check_report.py). Exits non-zero, naming them, if a CUDA test failed, or was skipped on
# a GPU machine, or a stage failed. Outputs stay in $GPU_CHECK_OUT (default: a fresh temporary folder).
set -u
cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" || "${CPU_OK:-0}" == "1" ]]; then DRY=1; fi
OUT="${GPU_CHECK_OUT:-$(mktemp -d -t gpu-check-XXXXXX)}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
START=$(date +%s)

if [[ $DRY == 1 ]]; then
    DEVICE=cpu; MODEL=tiny; AUTOCAST=none; ROUNDS=3; WARMUP=1; MEM_WORKLOADS=(tiny); MEM_CONFIGS=(none sampled)
    echo "gpu_check: DRY RUN on CPU (tiny sizes; the CUDA tests must skip)"
else
    if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
        echo "gpu_check: no CUDA device visible to torch (use --dry-run on CPU)" >&2
        exit 2
    fi
    DEVICE=cuda; MODEL=gpt2-124m; AUTOCAST=bf16; ROUNDS="${ROUNDS:-20}"; WARMUP=3
    MEM_WORKLOADS=(gpt2-124m long); MEM_CONFIGS=(none unsampled sampled full-copy)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
fi

status=0
echo "== 1/3 CUDA tests (pytest -m cuda tests/cuda)"
timeout 300 "$PY" -m pytest -m cuda tests/cuda -q -rfEs -p no:cacheprovider --junitxml="$OUT/cuda-tests.xml" \
    > "$OUT/cuda-tests.txt" 2>&1
rc=$?
tail -n 25 "$OUT/cuda-tests.txt"
if [[ $rc != 0 ]]; then echo "gpu_check: CUDA tests exited $rc" >&2; status=1; fi

echo "== 2/3 overhead benchmark ($MODEL on $DEVICE, autocast $AUTOCAST, $ROUNDS rounds)"
timeout 240 "$PY" benchmarks/overhead.py --device "$DEVICE" --model "$MODEL" --autocast "$AUTOCAST" \
    --variants baseline,a,b,d --rounds "$ROUNDS" --warmup "$WARMUP" > "$OUT/overhead.txt" 2> "$OUT/overhead.err"
rc=$?
if [[ $rc != 0 ]]; then echo "gpu_check: overhead benchmark exited $rc"; tail -n 20 "$OUT/overhead.err"; status=1; fi

echo "== 3/3 memory benchmark (${MEM_WORKLOADS[*]} on $DEVICE)"
MEM_DTYPE=fp32; [[ $AUTOCAST == bf16 ]] && MEM_DTYPE=bf16
timeout 240 "$PY" benchmarks/memory_overhead.py --device "$DEVICE" --workload "${MEM_WORKLOADS[@]}" \
    --configs "${MEM_CONFIGS[@]}" --dtype "$MEM_DTYPE" --warmup 2 --repeat 2 > "$OUT/memory.txt" 2> "$OUT/memory.err"
rc=$?
if [[ $rc != 0 ]]; then echo "gpu_check: memory benchmark exited $rc"; tail -n 20 "$OUT/memory.err"; status=1; fi

"$PY" benchmarks/gpu_check_report.py "$OUT" --dry-run "$DRY" --seconds $(( $(date +%s) - START ))
rc=$?
if [[ $rc != 0 ]]; then status=1; fi
echo "gpu_check: outputs in $OUT"
exit $status
