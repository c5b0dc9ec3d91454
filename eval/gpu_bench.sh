#!/usr/bin/env bash
# The speed figures that need a GPU, in one run: each benchmark's JSON in OUT, every printout in
# OUT/log.txt (seven files: under the device tool's eight).
#
#   git archive fcf1067 tokendrop adapters > .bench/baseline.tar                 # where git history is
#   bash eval/gpu_bench.sh OUT [.bench/baseline.tar]                             # on the GPU machine
#
# The machine needs python3 with torch (CUDA), transformers and accelerate; tokendrop installs
# from this tree without its dependencies. The archive gives bench_selection the per-image
# baseline where the tree travels without its git history. Not yet run on a GPU: the four
# steps are sized to end within one 10-minute command, the throughput search last.
set -euo pipefail
out=${1:?usage: bash eval/gpu_bench.sh OUT [BASELINE_TAR]}
baseline=${2:-}
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/tokendrop-site .
export PYTHONPATH=/tmp/tokendrop-site PYTHONUNBUFFERED=1
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())' \
    2>&1 | tee "$out/log.txt"

# selection + compaction per call, batches of 1 and 8, CPU then CUDA, beside the per-image baseline
python3 -m tokendrop.eval.bench_selection --preset llava-next-shape --repeats 7 \
    ${baseline:+--baseline-archive "$baseline"} --out "$out/bench_selection.json" 2>&1 | tee -a "$out/log.txt"
# the vision pass before and after the early stop, 8 images a pass
python3 -m tokendrop.eval.bench_vision --preset llava-next-shape --device cuda --dtype bfloat16 --images 8 \
    --repeats 5 --out "$out/bench_vision.json" 2>&1 | tee -a "$out/log.txt"
# time to first token and the vision pass: unpatched, HiRED after the tower and inside it at layers 6, 11, 16
python3 -m tokendrop.eval.bench_tower --preset llava-next-shape --device cuda --dtype bfloat16 --images 8 \
    --repeats 5 --out "$out/bench_tower.json" 2>&1 | tee -a "$out/log.txt"
# the largest batch under a 24 GB cap (a P40's memory) and the throughput at it
python3 -m tokendrop profile --model llava-next-shape --dtype bf16 --methods hired globalcom2 \
    --budgets 1.0 0.2 0.1 --throughput --memory-limit 24 --max-batch-size 256 --out "$out/throughput" \
    --no-progress 2>&1 | tee -a "$out/log.txt"
