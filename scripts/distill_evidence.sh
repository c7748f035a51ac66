#!/usr/bin/env bash
# Distillation at equal wall time: ResNet-18 from scratch at 64 px on the 3,000-image Fashion-MNIST setting (300
# train images per class, a 1,000-image val subset, the full 10,000-image test set). One 3-fold ensemble
# (--all-folds over train/ + val/, each fold BUDGET), 3 single models and 3 students of the ensemble, each of those
# six with the same --budget BUDGET; test accuracy from scripts/score.py, none of these models having seen a test
# image. The students validate on val/, which the fold teachers trained on: their val scores are optimistic (the
# run says so) and are not compared; the test set is. At the end, a table and the share of the ensemble's lead over
# the single models that the students recover, with its standard error.
#
#   bash scripts/distill_evidence.sh            # BUDGET=150s per model; runs resume where they stopped
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data/fashion-mnist-64-3k}
RUNS=${RUNS:-checkpoints/distill-evidence}
BUDGET=${BUDGET:-150s}
if [ ! -d "$DATA/train" ]; then
    python scripts/fashion_mnist.py --out "$DATA" --size 64 --train-per-class 300 --val-per-class 100
fi
COMMON=(--data-dir "$DATA" --output-dir "$RUNS" --arch resnet18 --weights none --img-size 64 --eval-crop-ratio 1
        --batch-size 64 --lr 1e-3 --epochs 40 --loss ce --aug light --rrc-scale 0.5 1 --workers 0 --resume auto)
mkdir -p "$RUNS"

timed() {  # name, command...: the command's log and its wall time
    local name=$1 start
    shift
    start=$(date +%s.%N)
    "$@" > "$RUNS/$name.log" 2>&1
    echo "$name $(echo "$(date +%s.%N) - $start" | bc) s" >> "$RUNS/times.txt"
}
score() {  # checkpoint (a best.pt or a folder of fold models), name
    python inference.py --checkpoint "$1" --data-dir "$DATA" --tta none --workers 0 \
        --output "$RUNS/$2-prediction.csv" > /dev/null 2>&1
    python scripts/score.py "$RUNS/$2-prediction.csv" "$DATA/test_labels.csv" --json "$RUNS/$2-score.json" \
        > /dev/null
}

if [ ! -f "$RUNS/ensemble-score.json" ]; then
    seconds=$(python -c "import sys; from config import time_limit_seconds; print(3 * time_limit_seconds(sys.argv[1]))" "$BUDGET")
    timed ensemble python train.py "${COMMON[@]}" --run-name ensemble --seed 7 --folds 3 --all-folds \
        --budget "${seconds}s"
    score "$RUNS/ensemble" ensemble
fi
for seed in 1 2 3; do
    for kind in single student; do
        name="$kind-$seed"
        [ -f "$RUNS/$name-score.json" ] && continue
        extra=()
        if [ "$kind" = student ]; then extra=(--teacher "$RUNS/ensemble"); fi
        timed "$name" python train.py "${COMMON[@]}" --run-name "$name" --seed "$seed" --budget "$BUDGET" "${extra[@]}"
        score "$RUNS/$name/best.pt" "$name"
    done
done

python - "$RUNS" <<'EOF'
import json, math, statistics, sys
runs = sys.argv[1]
acc = lambda name: json.load(open(f"{runs}/{name}-score.json"))["accuracy"]
ens, single, student = acc("ensemble"), [acc(f"single-{s}") for s in (1, 2, 3)], [acc(f"student-{s}") for s in (1, 2, 3)]
mean = statistics.mean
var_si, var_st = statistics.variance(single) / 3, statistics.variance(student) / 3  # of the means
var_en = ens * (1 - ens) / 10000  # one ensemble: the test set's binomial variance stands in for its seeds'
lead, gain = ens - mean(single), mean(student) - mean(single)
share = gain / lead
# delta method for gain / lead; both differences share the single models' mean (their covariance is var_si)
var_share = (var_st + var_si) / lead ** 2 + gain ** 2 * (var_en + var_si) / lead ** 4 - 2 * gain * var_si / lead ** 3
print("| model | test accuracy |\n| --- | ---: |")
print(f"| 3-fold ensemble (3 forward passes per image) | {100 * ens:.2f}% |")
for kind, values in (("single model", single), ("student of the ensemble", student)):
    print(f"| {kind}, seeds 1-3 | {100 * mean(values):.2f}% ± {100 * statistics.stdev(values):.2f} "
          f"({', '.join(f'{100 * v:.2f}' for v in values)}) |")
print(f"the ensemble leads the single models by {100 * lead:.2f} points; the students recover {100 * gain:.2f} "
      f"points of it: a share of {100 * share:.0f}% ± {100 * math.sqrt(max(var_share, 0)):.0f}% (standard error)")
EOF
