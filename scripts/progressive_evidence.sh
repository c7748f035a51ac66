#!/usr/bin/env bash
# Progressive resizing against a fixed size at equal wall time: ResNet-18 from scratch at 64 px on the 3,000-image
# Fashion-MNIST setting (300 train images per class, a 1,000-image val subset, the full 10,000-image test set), both
# planned by the same --budget, 3 seeds each; test accuracy from scripts/score.py. At 64 px the plan's only smaller
# side is 32 px.
#
#   bash scripts/progressive_evidence.sh            # BUDGET=180s per run; runs resume where they stopped
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data/fashion-mnist-64-3k}
RUNS=${RUNS:-checkpoints/progressive-evidence}
BUDGET=${BUDGET:-180s}
if [ ! -d "$DATA/train" ]; then
    python scripts/fashion_mnist.py --out "$DATA" --size 64 --train-per-class 300 --val-per-class 100
fi
COMMON=(--data-dir "$DATA" --output-dir "$RUNS" --arch resnet18 --weights none --img-size 64 --eval-crop-ratio 1
        --batch-size 64 --lr 1e-3 --epochs 40 --loss ce --aug light --rrc-scale 0.5 1 --workers 0
        --budget "$BUDGET" --resume auto)
for seed in 1 2 3; do
    for mode in fixed progressive; do
        name="$mode-$seed"
        extra=()
        if [ "$mode" = progressive ]; then extra=(--progressive 0.5); fi
        start=$(date +%s.%N)
        python train.py "${COMMON[@]}" --run-name "$name" --seed "$seed" "${extra[@]}" > "$RUNS-$name.log" 2>&1
        echo "$name $(echo "$(date +%s.%N) - $start" | bc) s" >> "$RUNS-times.txt"
        python inference.py --checkpoint "$RUNS/$name/best.pt" --data-dir "$DATA" --tta none --workers 0 \
            --output "$RUNS/$name/prediction.csv" > /dev/null 2>&1
        python scripts/score.py "$RUNS/$name/prediction.csv" "$DATA/test_labels.csv" --json "$RUNS/$name/score.json"
    done
done
