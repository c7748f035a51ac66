#!/usr/bin/env bash
# GPU check: the CUDA-marked tests, then bench.py for ResNeXt-101 32x8d at 224 px with batches of 64 and 128.
# Installs nothing; about 8 minutes on one H100/H200-class GPU. Results: bench-gpu-b64.json, bench-gpu-b128.json.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 300 python -m pytest -q -m cuda tests
for batch in 64 128; do
    timeout 100 python bench.py --device cuda --arch resnext101_32x8d --img-size 224 --batch-size "$batch" \
        --steps 10 --repeats 3 --images 512 --workers 15 --parts input step \
        --json "bench-gpu-b$batch.json" 2>&1 | grep -v "it/s"
done
