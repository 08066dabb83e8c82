#!/bin/bash
# Run here (not on the GPU machine) before the device check, from the repository root:
# fetches what the GPU machine's python3 lacks (omegaconf: it has torch, torchvision,
# pyarrow, PyYAML and tqdm, but no Ray, MLflow or omegaconf) into .whl/, and converts the
# Omniglot release for the real-data training run. Then, with the device tool:
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl", "data/omniglot"], timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(python3 -c "import importlib.metadata as m; print(m.version('omegaconf'))" 2>/dev/null \
          || .venv/bin/python -c "import importlib.metadata as m; print(m.version('omegaconf'))")
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "omegaconf==$version"
if [ ! -f data/omniglot/dataset.json ]; then
  .venv/bin/metadist data convert omniglot ../shared/data/omniglot data/omniglot
fi
ls -l .whl
