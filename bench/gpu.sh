#!/usr/bin/env bash
# Train throughput on one CUDA GPU: bf16 autocast + channels_last, the real fit() next to a bare synthetic
# loop, with model-FLOPs utilisation. Each case is bounded by `timeout`; the whole script stays < 5 minutes.
#   bash bench/gpu.sh                  # PEAK_TFLOPS=989 (H100/H200 SXM bf16 dense); A100: PEAK_TFLOPS=312
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v .venv/bin/python || command -v python)}
PEAK=${PEAK_TFLOPS:-989}
OUT=bench/results
mkdir -p "$OUT"
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true

"$PY" - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("bench/gpu.sh: no CUDA device visible")
print("gpu:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| cuda", torch.version.cuda)
PY

run() {  # name, then bench args
  local name=$1; shift
  timeout 110 "$PY" bench/train_throughput.py --device cuda --mfu --peak-tflops "$PEAK" \
      --out "$OUT/gpu_${name}.json" "$@" || echo "{\"case\": \"$name\", \"error\": \"exit $?\"}"
}

# resnet50 at 224 px: the standard MFU yardstick (~12.3 GFLOPs per training image).
run resnet50_224 --model resnet50 --image-size 224 --batch-size 256 --n-train 4096 --epochs 3
# vit_b_16 at 224 px: transformer matmuls, the best case for bf16 tensor cores.
run vit_b_16_224 --model vit_b_16 --image-size 224 --batch-size 256 --n-train 3072 --epochs 3
# The digits default: a tiny CNN, where per-step overhead (not FLOPs) dominates.
run smallcnn_32 --model smallcnn --image-size 32 --batch-size 256 --n-train 16384 --epochs 4

"$PY" - "$OUT" <<'PY'
import json, pathlib, sys
rows = [json.loads(p.read_text()) for p in sorted(pathlib.Path(sys.argv[1]).glob("gpu_*.json"))]
print(f"{'model':<14}{'img':>5}{'batch':>7}{'stage img/s':>13}{'bare img/s':>12}{'ratio':>7}{'MFU stage':>11}")
for r in rows:
    print(f"{r['model']:<14}{r['image_size']:>5}{r['batch_size']:>7}{r['stage_images_per_s']:>13.0f}"
          f"{r['synthetic_images_per_s']:>12.0f}{r['ratio']:>7.2f}{r.get('mfu_stage', 0):>11.1%}")
PY
