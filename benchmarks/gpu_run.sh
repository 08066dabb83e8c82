#!/bin/bash
# The whole device check, run on a lent GPU machine from the repository root (prepare it
# here with benchmarks/gpu_prepare.sh; its header gives the device call). In one lease:
# 1. the trainer on CUDA end to end on real Omniglot (single process, no Ray or MLflow):
#    300 meta-steps of 5-way 1-shot MAML, validation, checkpoints and the 600-episode
#    meta-test;
# 2. benchmarks/gpu_throughput.py: loop vs vmap, meta-batch, bf16, utilisation.
# The two timeouts keep the call under the device tool's 600 s per command.
# A second call, `bash benchmarks/gpu_run.sh memory`, runs instead
# 3. benchmarks/second_order_memory.py at full size on CUDA: second-order MAML on
#    ResNet-12 64-160-320-640, 4 miniImageNet-shaped 5-way 1-shot tasks, 5 inner steps:
#    CUDA max_memory_allocated and time per task, kept, recomputed, chunked
#    (a row that runs out of memory is reported as such).
# Everything lands in $OUT (the device tool brings it back); copy gpu_throughput.md and
# second_order_memory.md to benchmarks/results/ and the run's result into the README by
# hand.
set -uo pipefail
PARTS=${1:-train,throughput}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

if [[ ",$PARTS," == *",train,"* ]]; then
timeout 200 python3 -m metadist.worker configs/omniglot_5w1s_maml.yaml \
  train.device=cuda tracking.enabled=false train.progress=false train.steps=300 \
  train.val_every=100 train.checkpoint_every=100 train.output_dir=/tmp/runs \
  2>&1 | tee "$OUT/train.log"
echo "training exit status: ${PIPESTATUS[0]}"
fi

if [[ ",$PARTS," == *",throughput,"* ]]; then
timeout 330 python3 benchmarks/gpu_throughput.py --max-seconds 240 \
  --out "$OUT/gpu_throughput.md" 2>&1 | tee "$OUT/gpu_throughput.log"
echo "benchmark exit status: ${PIPESTATUS[0]}"
fi

if [[ ",$PARTS," == *",memory,"* ]]; then
timeout 540 python3 benchmarks/second_order_memory.py --device cuda \
  --out "$OUT/second_order_memory.md" 2>&1 | tee "$OUT/second_order_memory.log"
echo "memory benchmark exit status: ${PIPESTATUS[0]}"
fi
