#!/usr/bin/env bash
# Set up a virtual environment and run the embedded default pipeline on Fashion-MNIST.
# Extra arguments go to 'compresskit run', e.g.: bash scripts/quickstart.sh --set distill.train.epochs=2
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_venv.sh
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ ! -d data/fashion-mnist ]; then
    apt_install dataset-fashion-mnist
fi
ensure_venv ".[train]"
.venv/bin/compresskit run pipelines/mobilenet_edge.yaml "$@"
