#!/usr/bin/env bash
# One prepared GPU check (< 5 min on an H200): bf16-vs-fp32 smoke, training throughput of four
# presets with and without torch.compile, and DDP through torchrun on 1 GPU (and on all of them when
# there are more); prints one table.
# On a machine without CUDA it says so and exits 0 without running anything.
#   bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-$PWD}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing to check"
  exit 0
fi

ITERS=${ITERS:-50}
LOG=$(mktemp -d)
trap 'rm -rf "$LOG"' EXIT

"$PY" benchmarks/gpu_smoke.py --preset nih_pa_wo_pg --iters 20 | tee "$LOG/smoke.txt"
for spec in "nih_pa_wo_pg stab" "nih_pa_pg trns" "cifar10_class0 stab" "camelyon16_wo_pg stab"; do
  set -- $spec
  "$PY" benchmarks/train_throughput.py --preset "$1" --stage "$2" --iters "$ITERS" --warmup 10 --compile both \
    | tee -a "$LOG/rows.txt"
done
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
RANKS="1"
if [ "$NGPU" -gt 1 ]; then RANKS="1 $NGPU"; fi
for n in $RANKS; do
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" benchmarks/train_throughput.py --preset nih_pa_wo_pg \
    --iters "$ITERS" --warmup 10 | sed "s/^preset=/launcher=torchrun-$n preset=/" | tee -a "$LOG/rows.txt"
done

echo
echo "== gpu_check summary =="
grep -E "max relative loss|OK|FAILED" "$LOG/smoke.txt" || true
printf "%-12s %-18s %-5s %-5s %-6s %-8s %-8s %12s %10s %9s\n" launcher preset stage ranks batch cache compile images/s ms/step TFLOP/s
awk '{
  delete f; f["launcher"]="python"
  for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
  printf "%-12s %-18s %-5s %-5s %-6s %-8s %-8s %12s %10s %9s\n", f["launcher"], f["preset"], f["stage"], f["ranks"], f["batch"],
         f["cache"], f["compile"], f["images_per_s"], f["ms_per_step"], f["tflops"]
}' "$LOG/rows.txt"
