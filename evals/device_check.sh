#!/usr/bin/env bash
# Device check (#24): our LoRA and QLoRA embedder training and sentence-transformers full fine-tuning on
# SciFact rows, one run, bf16/fp16 where the GPU supports it; samples/s, peak GPU memory and nDCG@10 per
# variant in evals/results/device_check_<gpu>.md. No network (HF_HUB_OFFLINE, the packaged base model).
#
#   bash evals/device_check.sh              # on a CUDA machine: a few minutes
#   bash evals/device_check.sh --dry-run    # anywhere: the same code on the CPU at a tiny size
#
# Needs the project's environment (.venv, or the python on PATH with `pip install -e .` done) and SciFact
# at ../shared/datasets/scifact (or $RETRIEVAL_LORA_DATASETS/scifact). Before training it prints what it
# runs on, so a machine without CUDA, torch or bitsandbytes is named in the first lines.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=python
if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false DO_NOT_TRACK=1
"$PYTHON" - <<'PY'
import importlib.util, torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}", flush=True)
if torch.cuda.is_available():
    print(f"GPU: {torch.cuda.get_device_name(0)}, bf16: {torch.cuda.is_bf16_supported()}, "
          f"memory: {torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB", flush=True)
print("bitsandbytes:", "installed" if importlib.util.find_spec("bitsandbytes") else "MISSING (ours-qlora will fail)")
PY
exec timeout "${DEVICE_CHECK_TIMEOUT_S:-540}" "$PYTHON" evals/device_check.py "$@"
