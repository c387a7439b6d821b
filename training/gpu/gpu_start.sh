#!/bin/bash
# Call 1 on the lent GPU: install, build or unpack the corpus, start the training run in the background.
set -u
cd "$(dirname "$0")/../.."
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | grep -v "WARNING: Running pip" | tail -3
python3 -c "import difill.training.train" || { echo IMPORT-FAILED; exit 1; }
mkdir -p data/corpus runs
if [ -f carry/pinned/MANIFEST.json.xz ]; then
  # The Python part from this machine's own standard library and site-packages (larger than what
  # could travel), the pinned part built where its packages could be downloaded added to it.
  if ! python3 -m difill.training.corpus --out data/corpus --add carry/pinned --workers "$(nproc)" > runs/corpus.log 2>&1; then
    tail -20 runs/corpus.log; echo CORPUS-FAILED; exit 1  # end the call: the device time is kept for another try
  fi
  tail -1 runs/corpus.log
else  # a whole corpus built elsewhere
  xz -T4 -dc carry/train.xz > data/corpus/train.jsonl &
  xz -dc carry/val.jsonl.xz > data/corpus/val.jsonl
  wait
fi
wc -l data/corpus/*.jsonl
cp difill/default_model/tokenizer.json data/tokenizer.json
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
setsid nohup python3 -m difill.training.train "${DIFILL_GPU_CONFIG:-training/configs/gpu-14m.json}" --run runs/gpu > runs/gpu.log 2>&1 < /dev/null &
bash training/gpu/gpu_watch.sh "${1:-420}"
