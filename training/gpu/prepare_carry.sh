#!/bin/bash
# Here, before the GPU call: build the pinned part of the corpus (it needs the network) and pack
# it into carry/pinned, which travels with the working tree; the GPU machine builds the Python
# part from its own packages and adds this one (gpu_start.sh). ~8 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m difill.training.corpus --no-python --pinned --out data/pinned | tail -1
mkdir -p carry/pinned
xz -T2 -9 -c data/pinned/train.jsonl > carry/pinned/train.jsonl.xz &
xz -9 -c data/pinned/val.jsonl > carry/pinned/val.jsonl.xz
xz -9 -c data/pinned/MANIFEST.json > carry/pinned/MANIFEST.json.xz
wait
tree_bytes=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carry_bytes=$(du -cb carry/pinned/* | tail -1 | cut -f1)
echo "carry/pinned: $carry_bytes bytes; tracked tree: $tree_bytes bytes; together $((tree_bytes + carry_bytes)) of the 67108864 that travel"
[ $((tree_bytes + carry_bytes)) -lt 67108864 ] || { echo "TOO LARGE to travel: leave packages out of training/sources.json"; exit 1; }
