#!/usr/bin/env bash
# Seeded runs bit for bit: the same seeded federation (FFE plan_and_preprocess, FFE training of folds 0 and 1,
# AsymFedAvg planning and training (other datasets), find_best_configuration) with the package at SRC_A and at SRC_B (two source
# trees, e.g. a `git worktree` of the old commit and this one), then a diff of every digest
# (scripts/seeded_digests.py). Prints "identical" and exits 0 when nothing differs.
# Usage: scripts/seeded_digests.sh SRC_A SRC_B [WORKDIR]   (SRC_*: the folders holding fednnunet/, i.e. .../src)
set -euo pipefail
A=$(realpath "$1"); B=$(realpath "$2"); WORK=${3:-$(mktemp -d)}
HERE=$(dirname "$(realpath "$0")")
PY=${PYTHON:-python}
export nnUNet_n_proc_DA=0
run_one() {  # $1: source tree, $2: workdir
  local src=$1 w=$2
  rm -rf "$w"; mkdir -p "$w"
  export nnUNet_raw=$w/nnUNet_raw nnUNet_preprocessed=$w/nnUNet_preprocessed nnUNet_results=$w/nnUNet_results
  local fed="env PYTHONPATH=$src $PY -m fednnunet.cli"
  $fed demo-data --out "$nnUNet_raw" --first-id 971 --sites 3 --dim 2 --seed 0 >/dev/null
  $fed run plan_and_preprocess "971 972 973" -c 2d --out "$w/runs/plan" >/dev/null
  for fold in 0 1; do
    $fed run train "971 972 973" 2d $fold --rounds 3 --iterations-per-round 4 --val-iterations 2 --seed 0 \
      --out "$w/runs/train$fold" >/dev/null
  done
  $fed run find_best_configuration "971 972 973" -c 2d -f 0 1 --out "$w/runs/best" >/dev/null
  $fed demo-data --out "$nnUNet_raw" --first-id 974 --sites 3 --dim 2 --seed 1 >/dev/null
  $fed run plan_and_preprocess "974 975 976" -c 2d --asym --out "$w/runs/plan_asym" >/dev/null
  $fed run train "974 975 976" 2d 0 --asym -tr nnUNetTrainer --rounds 2 --iterations-per-round 4 --val-iterations 2 \
    --seed 0 --out "$w/runs/train_asym" >/dev/null
  PYTHONPATH=$src $PY "$HERE/seeded_digests.py" "$w" > "$w/digests.txt"
}
run_one "$A" "$WORK/a"
run_one "$B" "$WORK/b"
echo "$(wc -l < "$WORK/a/digests.txt") digests"
if diff "$WORK/a/digests.txt" "$WORK/b/digests.txt"; then echo identical; else echo DIFFERENT; exit 1; fi
