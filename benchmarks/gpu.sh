#!/usr/bin/env bash
# The GPU run, in one call on a machine with a CUDA GPU and a CUDA build of torch:
#   1. build the CUDA extension (impls/cuda) for this GPU;
#   2. certify our kernels, `triton` and `cuda`, on the GPU for every dtype they declare (quick
#      battery, and the GPU-sized cases of --large: a bfloat16 tensor past 2^31 elements, rows past
#      65535 tiles of 16, rows past 2^20; LARGE=0 leaves them out) with the speed battery
#      (M = 16384 rows x N in {1024, 4096, 8192} for the row norms), torch.compile as the baseline
#      each must not be slower than (--min-ratio 1.0);
#   3. the same speed battery for `torch` (eager) and `torch-compile`, the incumbents;
#   4. merge the four reports into one matrix (report.md, report.html) with every run's GB/s
#      against the device-to-device copy timed in the same run.
# Usage: benchmarks/gpu.sh [OUT_DIR]   (default reports/of-record/gpu)
# Every step runs even if an earlier certification fails; the exit status is 1 if any did.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-reports/of-record/gpu}"
mkdir -p "$out"
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

echo "== building the CUDA extension"
python3 -c "import impls.cuda.build as b; b.load(); print('built')" || status=1

norms=(--norm layer_norm --norm rms_norm)
large=(--large)
if [ "${LARGE:-1}" = 0 ]; then large=(); fi
for adapter in triton cuda; do
    echo "== certify $adapter (quick, ${large[*]:-no --large}, speed; baseline torch-compile)"
    normconf certify --adapter "$adapter" --device cuda --quick "${large[@]}" --speed \
        --baseline torch-compile --min-ratio 1.0 \
        --no-progress --report-dir "$out/$adapter" || status=1
done
for adapter in torch torch-compile; do
    echo "== speed of $adapter"
    normconf certify --adapter "$adapter" --device cuda --quick --speed --baseline torch \
        "${norms[@]}" --exit-zero --no-progress --report-dir "$out/$adapter" || status=1
done
normconf report merge "$out/triton" "$out/cuda" "$out/torch" "$out/torch-compile" \
    --out "$out/merged" || status=1
exit "$status"
