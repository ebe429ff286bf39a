#!/usr/bin/env bash
# The prepared GPU check: the `gpu` tests and the GPU benchmark (benchmarks/bench_gpu.py), in about 6 minutes on one
# CUDA GPU with PyTorch, transformers, accelerate, peft and pytest installed (no network; lowbit runs from this
# checkout). Results (JSON + markdown table, pytest log) go to $OUT, else ./gpu_results.
#   scripts/gpu_check.sh            # on the GPU machine
#   scripts/gpu_check.sh --dry-run  # the same code path at toy sizes on this machine's device (CPU in the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-gpu_results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY="${PYTHON:-python}"
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then DRY=(--dry-run --threads 1); fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" \
  | tee "$OUT_DIR/environment.txt"
if [[ ${#DRY[@]} -eq 0 ]]; then
  # The gpu tests (skipped where there is no CUDA device), then the benchmark at full size.
  "$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT_DIR/gpu_tests.log"
  timeout 330 "$PY" benchmarks/bench_gpu.py --out-dir "$OUT_DIR"
else
  "$PY" benchmarks/bench_gpu.py "${DRY[@]}" --out-dir "$OUT_DIR"
fi
echo "gpu check done -> $OUT_DIR"
