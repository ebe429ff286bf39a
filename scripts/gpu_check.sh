#!/usr/bin/env bash
# The prepared GPU check: the `gpu` tests, the GPU benchmark (benchmarks/bench_gpu.py) and the 7B-width memory
# benchmark (benchmarks/bench_scale.py, 2 and 4 layers), in about 11 minutes on one
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
  # LLaMA-2-7B width, 2 and 4 random layers (benchmarks/bench_scale.py): peak memory per phase, measured vs the model
  timeout 300 "$PY" benchmarks/bench_scale.py --layers 2 4 --methods gptq --model-dir "$OUT_DIR/scale_ckpt" \
    --out-dir "$OUT_DIR" || echo "bench_scale stopped (timeout or error): see above"
  rm -rf "$OUT_DIR/scale_ckpt"
else
  "$PY" benchmarks/bench_gpu.py "${DRY[@]}" --out-dir "$OUT_DIR"
  "$PY" benchmarks/bench_scale.py --quick --threads 1 --out-dir "$OUT_DIR"
fi
echo "gpu check done -> $OUT_DIR"
