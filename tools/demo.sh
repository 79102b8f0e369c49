#!/usr/bin/env bash
# The README's first command: install onnxcoreset, build a LeNet-300-100-shaped MLP, prune it,
# validate it with onnxruntime, and show the report. Everything lands in models/build/.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e .
python3 models/build_mlp.py --out models/build/mlp_784_300_100_10.onnx
onnxcoreset inspect models/build/mlp_784_300_100_10.onnx
onnxcoreset prune models/build/mlp_784_300_100_10.onnx models/build/mlp_pruned.onnx \
    --keep 0.5 --beta 28 --report models/build/mlp_pruned.report.json
