#!/usr/bin/env bash
# The Fashion-MNIST ablation of README "Results": resnet18 at 64 px from scratch on a fixed 3,000-image subset of
# the training split (300 per class), 4 epochs, 3 seeds per setting; selection on a 1,000-image val subset, accuracy
# on the full 10,000-image test set. About 5 minutes per run on two CPU cores.
#
#   bash scripts/fashion_mnist_ablation.sh            # all groups (18 runs)
#   bash scripts/fashion_mnist_ablation.sh ema-x-loss # one group
#
# Every group is an ablation.py grid and resumes where it stopped: run the same command again.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=${DATA:-data/fashion-mnist-64-3k}
RUNS=${RUNS:-checkpoints/fashion-mnist}
if [ ! -d "$DATA/train" ]; then
    python scripts/fashion_mnist.py --out "$DATA" --size 64 --train-per-class 300 --val-per-class 100
fi

# the recipe's numbers, scaled to a 4-epoch run: CE for epoch 1, the CE -> focal blend for epoch 2, focal after
COMMON=(--data-dir "$DATA" --output-dir "$RUNS" --repeats 3
        --arch resnet18 --weights none --img-size 64 --eval-crop-ratio 1 --batch-size 64 --lr 1e-3 --epochs 4
        --focal-start 1 --focal-full 2 --aug light --rrc-scale 0.5 1
        --test-labels "$DATA/test_labels.csv")

groups=" $* "
want() { [ "$groups" = "  " ] || [[ "$groups" == *" $1 "* ]]; }

# the seed's 2x2 (label smoothing 0.05 throughout): + label smoothing, + EMA, + CE -> focal schedule, + flip TTA
if want ema-x-loss; then
    python ablation.py --name ema-x-loss --grid ema=off,on loss=ce,schedule --test-tta none flip "${COMMON[@]}"
fi
# plain cross-entropy: no smoothing, no EMA
if want plain-ce; then
    python ablation.py --name plain-ce --grid label_smoothing=0 --no-ema --loss ce --test-tta none "${COMMON[@]}"
fi
# + class weights on top of EMA and the schedule
if want class-weights; then
    python ablation.py --name class-weights --grid class_weights=balanced --ema --loss schedule --test-tta none \
        "${COMMON[@]}"
fi
