#!/usr/bin/env bash
# Every GPU figure of README in one prepared run (~8 min on an H100/H200): the MAE step of medmae,
# lightly and MONAI (eager and compiled, bf16), ViT-L/16 MFU, a batch sweep, the 3D MAE step of medmae
# and MONAI (eager, ~30 s), and the starvation ratio of a real fit from the cache. Prints one report
# and writes it to ${1:-gpu_results.md}.
#
#   bash benchmarks/gpu.sh [REPORT.md]
#
# Peers that are not installed are skipped and the report says so; nothing is downloaded.
set -uo pipefail
cd "$(dirname "$0")/.."
REPORT="${1:-gpu_results.md}"
WORK="${MEDMAE_BENCH_WORK:-/tmp/medmae_gpu_bench}"
TS() { date -u +%H:%M:%S; }

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "benchmarks/gpu.sh: no CUDA device visible to torch" >&2
  exit 2
fi
GPU="$(python -c 'import torch; print(torch.cuda.get_device_name())')"
STEP="python benchmarks/train_step.py --device cuda --precision bf16 --img-size 224 --channels 1 --no-memory"

{
  echo "# medmae GPU benchmarks on ${GPU}"
  echo
  echo "started $(date -u +%FT%TZ); $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null)"
  echo
  echo "## 1. MAE step, ViT-B/16, 224², batch 256, bf16: medmae vs lightly vs MONAI, eager and compiled ($(TS))"
  timeout 240 $STEP --model base --batch 256 --steps 15 --warmup 3 --compile || echo "(section 1 failed or timed out: rc $?)"
  echo
  echo "## 2. ViT-L/16, 224², batch 128, bf16: medmae eager and compiled, MFU ($(TS))"
  timeout 120 $STEP --model large --batch 128 --steps 10 --warmup 3 --compile --peers medmae || echo "(section 2 failed: rc $?)"
  echo
  echo "## 3. Batch sweep, ViT-B/16 medmae eager ($(TS))"
  for B in 64 128 512; do
    timeout 45 $STEP --model base --batch "$B" --steps 10 --warmup 3 --peers medmae | grep -E '^\| medmae' | sed "s/^/batch ${B}: /" \
      || echo "(batch ${B} failed: rc $?)"
  done
  echo
  echo "## 3b. 3D MAE step, ViT-B/16, 96³, batch 32, bf16, eager: medmae vs MONAI ($(TS))"
  timeout 60 python benchmarks/train_step.py --3d --device cuda --precision bf16 --model base --batch 32 \
    --steps 15 --warmup 3 --no-memory || echo "(section 3b failed or timed out: rc $?)"
  echo
  echo "## 4. Starvation ratio: fit from the cache / model step only, ViT-B/16, batch 256, bf16 ($(TS))"
  timeout 150 python benchmarks/fit_throughput.py --device cuda --precision bf16-mixed --model base --batch 256 \
    --workers "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))" --slices 1 3 --steps 20 --warmup 5 --work "$WORK" \
    || echo "(section 4 failed: rc $?)"
  echo "same, CPU data path (resize and intensity in the workers):"
  timeout 120 python benchmarks/fit_throughput.py --device cuda --precision bf16-mixed --model base --batch 256 \
    --workers "$(( $(nproc) > 2 ? $(nproc) - 2 : 1 ))" --slices 1 --steps 20 --warmup 5 --work "$WORK" --pixels workers \
    | grep -E '^\|' || echo "(section 4b failed: rc $?)"
  echo
  echo "finished $(date -u +%FT%TZ)"
} 2>&1 | grep -v -E "Warning|warn\(|litlogger|TPU available|GPU available|LOCAL_RANK|max_steps=.*reached" | tee "$REPORT"
echo "report written to ${REPORT}"
