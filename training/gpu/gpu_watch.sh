#!/bin/bash
# Watch the background run for $1 seconds; bring back the log and (safety net) the latest export.
set -u
cd "$(dirname "$0")/../.."
end=$((SECONDS + $1))
while [ $SECONDS -lt $end ]; do
  sleep 10
  pgrep -f difill.training.train > /dev/null || { echo "TRAINING PROCESS ENDED"; break; }
done
grep -v "Warning\|warn" runs/gpu.log | tail -25
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
cp runs/gpu/log.jsonl runs/gpu.log "$OUT/" 2>/dev/null
if [ -f runs/gpu/ckpt/state.json ]; then
  python3 -m difill.training.train "${DIFILL_GPU_CONFIG:-training/configs/gpu-14m.json}" --run runs/gpu --export-to /tmp/snap > /dev/null 2>&1 \
    && tar -cf - -C /tmp snap | split -b 15M - "$OUT/snap.tar." && rm -rf /tmp/snap
fi
ls -la "$OUT"
