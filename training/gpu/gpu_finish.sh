#!/bin/bash
# Last call: let the run reach its time budget (it exports itself), bring the model back, run the GPU
# benches (a second argument `nobench` leaves them out).
set -u
cd "$(dirname "$0")/../.."
end=$((SECONDS + ${1:-240}))
while pgrep -f difill.training.train > /dev/null && [ $SECONDS -lt $end ]; do sleep 5; done
pkill -TERM -f difill.training.train && while pgrep -f difill.training.train > /dev/null; do sleep 2; done
grep -v "Warning\|warn" runs/gpu.log | tail -12
tar -cf - -C runs/gpu export | split -b 15M - "$OUT/model.tar."
mkdir -p /tmp/small && cp runs/gpu/log.jsonl runs/gpu.log /tmp/small/
# The corpus's manifest (attribution, languages) for the model card, when it was built here.
[ -f data/corpus/MANIFEST.json ] && xz -T0 -6 -c data/corpus/MANIFEST.json > /tmp/small/MANIFEST.json.xz
export PYTHONUNBUFFERED=1
if [ "${2:-bench}" != "nobench" ]; then  # the GPU figures of the engine and kernels (up to 350 s)
  timeout 200 python3 bench/engine.py --gpu-7b --json --out /tmp/small/engine-gpu7b.json 2>&1 | tail -5
  timeout 150 python3 bench/kernels.py --json --out /tmp/small/kernels-h100.json 2>&1 | tail -40
fi
tar -cf "$OUT/small.tar" -C /tmp small
ls -la "$OUT"
