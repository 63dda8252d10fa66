#!/usr/bin/env bash
# The prepared GPU check, one run (at most 11 min, about 7 on an H200), most important first, every step under its
# own time limit and its output written to a folder as it goes (GPU_CHECK_OUT, else a temporary one):
#   1. gpu_smoke.py: bf16 against fp32 (loss difference, score correlation) and host syncs in the step;
#   2. nih_pa_wo_pg training throughput, feature cache × torch.compile, with profile tables;
#   3. the same at batch 1024, with peak device memory;
#   4. three more presets (a PG transition, CIFAR-10, Camelyon16), then DDP through torchrun on 1 GPU
#      (and on all of them when there are more).
# Then one table of every throughput row. On a machine without CUDA it says so and exits 0.
#   GPU_CHECK_OUT=/tmp/gpu bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing to check"
  exit 0
fi

ITERS=${ITERS:-50}
OUTDIR=${GPU_CHECK_OUT:-$(mktemp -d)}
mkdir -p "$OUTDIR"
FAILED=0
STEPS=()

# step NAME SECONDS COMMAND...: run it under `timeout`, its output on the console and in OUTDIR/NAME.txt
step() {
  local name=$1 limit=$2
  shift 2
  STEPS+=("$name")
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUTDIR/$name.txt"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then
    echo "== $name: exit $rc$([ "$rc" -eq 124 ] && echo ' (time limit)')" | tee -a "$OUTDIR/$name.txt"
    FAILED=1
  fi
}

THROUGHPUT=(benchmarks/train_throughput.py --iters "$ITERS" --warmup 10 --compile both)
step smoke 100 "$PY" benchmarks/gpu_smoke.py --preset nih_pa_wo_pg --iters 20
step nih_pa_wo_pg 150 "$PY" "${THROUGHPUT[@]}" --preset nih_pa_wo_pg --cache both --profile "$OUTDIR/profiles"
cat "$OUTDIR"/profiles/* 2>/dev/null
step nih_pa_wo_pg_b1024 90 "$PY" "${THROUGHPUT[@]}" --preset nih_pa_wo_pg --batch-size 1024 --n-images 4096
# each compiled variant costs 20-40 s of compiling on an H200: the other presets compile one
step nih_pa_pg_trns 75 "$PY" "${THROUGHPUT[@]}" --preset nih_pa_pg --stage trns --compile on
step cifar10_class0 75 "$PY" "${THROUGHPUT[@]}" --preset cifar10_class0 --compile on
step camelyon16_wo_pg 75 "$PY" "${THROUGHPUT[@]}" --preset camelyon16_wo_pg --compile on
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
for n in 1 $([ "$NGPU" -gt 1 ] && echo "$NGPU"); do
  step "torchrun$n" 60 "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" benchmarks/train_throughput.py \
    --preset nih_pa_wo_pg --iters "$ITERS" --warmup 10
  sed -i "s/^preset=/launcher=torchrun-$n preset=/" "$OUTDIR/torchrun$n.txt"
done

echo
echo "== gpu_check summary (outputs in $OUTDIR)"
grep -hE "max relative loss|^OK|^FAILED|host syncs" "$OUTDIR/smoke.txt"
printf "%-12s %-18s %-5s %-5s %-6s %-6s %-6s %12s %10s %9s %8s\n" launcher preset stage ranks batch cache compile images/s ms/step TFLOP/s mem_GiB
for s in "${STEPS[@]}"; do cat "$OUTDIR/$s.txt"; done | grep -E "^(launcher|preset)=" | awk '{
  delete f; f["launcher"]="python"; f["max_mem_gib"]="-"
  for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
  printf "%-12s %-18s %-5s %-5s %-6s %-6s %-6s %12s %10s %9s %8s\n", f["launcher"], f["preset"], f["stage"], f["ranks"], f["batch"],
         f["cache"], f["compile"], f["images_per_s"], f["ms_per_step"], f["tflops"], f["max_mem_gib"]
}'
exit $FAILED
