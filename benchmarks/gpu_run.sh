#!/bin/bash
# The whole device check, run on a lent GPU machine from the repository root (prepare it
# here with benchmarks/gpu_prepare.sh; its header gives the device call). In one lease:
# 1. the trainer on CUDA end to end on real Omniglot (single process, no Ray or MLflow):
#    300 meta-steps of 5-way 1-shot MAML, validation, checkpoints and the 600-episode
#    meta-test;
# 2. benchmarks/gpu_throughput.py: loop vs vmap, meta-batch, bf16, utilisation.
# The two timeouts keep the call under the device tool's 600 s per command.
# Everything lands in $OUT (the device tool brings it back); copy gpu_throughput.md to
# benchmarks/results/ and the run's result into the README by hand.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

timeout 200 python3 -m metadist.worker configs/omniglot_5w1s_maml.yaml \
  train.device=cuda tracking.enabled=false train.progress=false train.steps=300 \
  train.val_every=100 train.checkpoint_every=100 train.output_dir=/tmp/runs \
  2>&1 | tee "$OUT/train.log"
echo "training exit status: ${PIPESTATUS[0]}"

timeout 330 python3 benchmarks/gpu_throughput.py --max-seconds 240 \
  --out "$OUT/gpu_throughput.md" 2>&1 | tee "$OUT/gpu_throughput.log"
echo "benchmark exit status: ${PIPESTATUS[0]}"
