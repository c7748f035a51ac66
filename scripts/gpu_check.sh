#!/usr/bin/env bash
# GPU check, on one CUDA GPU; installs nothing, every step under its own timeout (about 8 minutes in all on one
# H100/H200-class GPU):
#   1. the CUDA-marked tests;
#   2. the README's first command on CUDA (train on data/sample -> best.pt -> inference.py -> prediction.csv, with
#      --amp auto and the default channels_last), then the same with --compile, then under
#      `torchrun --nproc_per_node 1` (the NCCL process group): each prints its training images/s from history.csv
#      and checks that prediction.csv has one row per test image;
#   3. bench.py for ResNeXt-101 32x8d at 224 px with batches of 64 and 128 (the latter also the whole epoch and the
#      loop efficiency): bench-gpu-b64.json, bench-gpu-b128.json.
# Runs and predictions go to a temporary folder; the exit status is 1 when any step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || exit 1
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0

quiet() {  # the output without tqdm's progress bars, which redraw a line with carriage returns
    tr '\r' '\n' | { grep -v -E "it/s|s/it|^ *$" || true; }
}

step() {  # name, command...: run one step, note a failure and carry on with the next
    local name=$1
    shift
    echo "== $name"
    if ! "$@"; then
        echo "FAILED: $name"
        failed=1
    fi
}

check_run() {  # label, run folder, prediction CSV: images/s of the training epochs, rows of the prediction
    python - "$@" <<'EOF'
import csv, os, statistics, sys
label, run_dir, prediction = sys.argv[1:]
with open(os.path.join(run_dir, "history.csv")) as f:
    history = list(csv.DictReader(f))
rates = [float(r["images_per_s"]) for r in history]
with open(prediction) as f:
    rows = sum(1 for _ in f) - 1
tests = len(os.listdir("data/sample/test"))
print(f"{label}: {statistics.median(rates[1:] or rates):.0f} train img/s (median of epochs 2-{len(rates)}; "
      f"epoch 1 {rates[0]:.0f}), val acc {float(history[-1]['val_acc']):.3f}, {rows} predictions for {tests} "
      "test images")
sys.exit(0 if rows == tests else 1)
EOF
}

sample_run() {  # label, timeout of the training in seconds, launcher and extra train.py flags...
    local label=$1 limit=$2
    shift 2
    local run_dir=$work/$label
    timeout "$limit" "$@" --data-dir data/sample --arch resnet18 --weights none --img-size 64 --epochs 10 \
        --batch-size 32 --lr 1e-3 --device cuda --amp auto --output-dir "$work" --run-name "$label" \
        2>&1 | quiet &&
    timeout 120 python inference.py --checkpoint "$run_dir/best.pt" --data-dir data/sample --val-dir data/sample/val \
        --device cuda --output "$run_dir/prediction.csv" 2>&1 | quiet &&
    check_run "$label" "$run_dir" "$run_dir/prediction.csv"
}

bench_run() {  # timeout in seconds, batch size, parts...
    local limit=$1 batch=$2
    shift 2
    timeout "$limit" python bench.py --device cuda --arch resnext101_32x8d --img-size 224 --batch-size "$batch" \
        --steps 10 --repeats 3 --images 512 --workers 15 --parts "$@" --json "bench-gpu-b$batch.json" 2>&1 | quiet
}

step "CUDA tests" timeout 300 python -m pytest -q -m cuda -p no:xdist -o addopts="" tests
step "sample run" sample_run sample 120 python train.py
step "sample run, --compile" sample_run compiled 300 python train.py --compile
step "sample run, torchrun 1 process" sample_run torchrun 150 torchrun --standalone --nproc_per_node 1 train.py
step "bench, batch 64" bench_run 100 64 input step
step "bench, batch 128, with the whole epoch and the loop efficiency" bench_run 160 128 input step epoch
exit $failed
