#!/usr/bin/env bash
# The GPU path, end to end: a two-site federated 2d training on CUDA with nnU-Net's CUDA defaults (torch.compile,
# mixed precision), nnUNetv2_predict on the result, and `fednnunet bench site-epoch` on the same device.
#
#   scripts/gpu_check.sh            on a machine with an NVIDIA GPU and a preinstalled PyTorch (python3)
#   scripts/gpu_check.sh --cpu      the same steps, tiny, on the CPU (tests/test_gpu_check.py runs this)
#
# Nothing is downloaded: packages the machine lacks travel as wheels in .whl/wheels.tar.xz (scripts/gpu_wheels.sh
# downloads them here) and are installed into a private folder. Output and figures go to $OUT (or ./gpu_check_out).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda
if [ "${1:-}" = "--cpu" ]; then DEVICE=cpu; fi
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fednnunet-gpu-check-XXXXXX")
trap 'rm -rf "$WORK"' EXIT
started=$(date +%s)
say() { echo "[$(( $(date +%s) - started ))s] $*" | tee -a "$OUT/gpu_check.txt"; }

if [ -f .whl/wheels.tar.xz ]; then  # made by scripts/gpu_wheels.sh
  mkdir -p "$WORK/wheels"
  tar -C "$WORK/wheels" -xJf .whl/wheels.tar.xz
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$WORK"/wheels/*.whl
  rm -rf "$WORK/wheels"
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PATH="$WORK/site/bin:$PATH"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export nnUNet_raw=$WORK/raw nnUNet_preprocessed=$WORK/preprocessed nnUNet_results=$WORK/results nnUNet_def_n_proc=2
FED=("$PY" -m fednnunet.cli)
if [ "$DEVICE" = cuda ]; then
  say "device: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
  ROUNDS=5; ITER=250; VAL=50; SITE_EPOCHS=3; SITE_REPEATS=2
else
  say "device: CPU (the script's CPU path: every step, tiny)"
  ROUNDS=2; ITER=2; VAL=1; SITE_EPOCHS=1; SITE_REPEATS=1
fi
say "torch $("$PY" -c 'import torch; print(torch.__version__, "cuda available:", torch.cuda.is_available())')"

"${FED[@]}" demo-data --out "$nnUNet_raw" --first-id 981 --sites 2 --dim 2 --seed 0 > /dev/null
"${FED[@]}" run plan_and_preprocess "981 982" -c 2d --out "$WORK/plan" | tee -a "$OUT/gpu_check.txt" | tail -n 1
say "planned (FFE)"
# nnU-Net's CUDA defaults: torch.compile (nnUNet_compile unset) and mixed precision in its trainer
"${FED[@]}" run train "981 982" 2d 0 -device "$DEVICE" --rounds "$ROUNDS" --iterations-per-round "$ITER" \
  --val-iterations "$VAL" --da-workers 0 --npz --out "$WORK/train" | tee -a "$OUT/gpu_check.txt" | tail -n 4
say "federated training on $DEVICE done"
cp "$WORK/train/metrics.jsonl" "$WORK/train/result.json" "$OUT/" 2>/dev/null || true
mkdir -p "$WORK/predict_in"
for f in $(ls "$nnUNet_raw"/Dataset981_*/imagesTr/*_0000.nii.gz | head -n 2); do ln -s "$f" "$WORK/predict_in/"; done
"$PY" -c 'from nnunetv2.inference.predict_from_raw_data import predict_entry_point; predict_entry_point()' \
  -i "$WORK/predict_in" -o "$WORK/predict_out" -d 981 -c 2d -f 0 -device "$DEVICE" -npp 1 -nps 1 \
  > "$WORK/predict.log" 2>&1 || { tail -n 30 "$WORK/predict.log"; exit 1; }
say "nnUNetv2_predict on the federated model: $(ls "$WORK/predict_out"/*.nii.gz | wc -l) segmentations"
"${FED[@]}" bench site-epoch --device "$DEVICE" --rounds "$SITE_EPOCHS" --repeats "$SITE_REPEATS" \
  --iterations "$ITER" --val-iterations "$VAL" --work "$WORK/site_epoch" --out "$OUT" | tee -a "$OUT/gpu_check.txt"
say "gpu check done"
