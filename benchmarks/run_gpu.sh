#!/usr/bin/env bash
# The accelerator half of issue 7 in one call: EDM's CIFAR-10 DDPM++ at batch 512, training steps, a full Heun
# sampling run (35 NFE, batch 512) and the XLA accounting, for each precision given (default: fp32 tf32 bf16).
#
#     OUT=/tmp/out PYTHON=python bash benchmarks/run_gpu.sh fp32 tf32 bf16
#     EXTRA_ARGS=--remat bash benchmarks/run_gpu.sh fp32        # batch 512 fp32 needs ~132 GiB without remat
#
# Needs a Python whose jax sees the GPU (jax[cuda]); writes $OUT/throughput.jsonl (one JSON line per precision),
# $OUT/run_gpu.log and $OUT/nvidia-smi.txt. Each precision compiles the 55.7M-parameter step twice (timed run and
# the abstract accounting compile) and takes about 2-4 minutes on an H100-class GPU; pass fewer precisions per
# call to stay within a time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PYTHON" -c 'import jax; print(jax.__version__, jax.devices()); assert jax.default_backend() != "cpu", "no accelerator"' \
  2>&1 | tee -a "$OUT/run_gpu.log"
for precision in "${@:-fp32 tf32 bf16}"; do
  for p in $precision; do
    "$PYTHON" benchmarks/throughput.py --config=configs/cifar_edm.py --precision="$p" --batch=512 \
      --sample_batch=512 --warmup=3 --steps=20 --forward_repeats=5 --sample_repeats=2 --devices=1 \
      --label="run_gpu.sh" --out="$OUT" ${EXTRA_ARGS:-} 2>&1 | tee -a "$OUT/run_gpu.log"
  done
done
