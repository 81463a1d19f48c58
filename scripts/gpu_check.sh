#!/usr/bin/env bash
# The GPU speed check as one prepared command: the throughput grid (ConvNet and ResNet-18 at 32 px), the
# CLI-vs-plain-loop overhead with device-resident data, and timm's ResNet-50 and ViT-S/16 at 224 px (bf16,
# channels-last, compiled and not), on a GPU machine that has PyTorch and Lightning but not Hydra or timm and that
# cannot download anything (this workplace's device machine).
#
#   scripts/gpu_check.sh prepare   # here, once: .gpu/ (git-ignored) = wheels of what the machine lacks + the
#                                  # shared CIFAR-10 copy (about 60 MB)
#   scripts/gpu_check.sh run       # there, with .gpu carried; JSON and log to $OUT (else outputs/bench/gpu)
#   scripts/gpu_check.sh smoke     # the same steps at toy sizes, on a CPU: checks this script before a lease
#
# Sized to end within 9 minutes on an H200: 3 interleaved rounds of the overhead benchmark (3 epochs each), the
# throughput grid without torch.compile (2 s per row), the compiled rows only at batch 512 in bf16 (what the goals
# are about), then the timm rows at 224 px (2 s each, compile time on top). On this workplace's device tool:
# run(command="scripts/gpu_check.sh run", carry=[".gpu"], timeout_s=560); the files under $OUT come back.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

prepare() {
    rm -rf .gpu && mkdir -p .gpu/wheels .gpu/data
    # wheels the machine lacks (it runs Python 3.12): Hydra, OmegaConf and OmegaConf's parser runtime, timm and
    # safetensors (an abi3 wheel; timm runs without huggingface_hub, which only finds cached pretrained weights)
    "$PYTHON" -m pip wheel -q --no-deps -w .gpu/wheels hydra-core==1.3.2 omegaconf==2.3.0 antlr4-python3-runtime==4.9.3 \
        timm==1.0.31
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .gpu/wheels safetensors
    cp -r "${TRANSFERLAB_SHARED_DATA:-../shared/data}/cifar10" .gpu/data/
    du -sh .gpu
}

run() {
    OUT=${OUT:-outputs/bench/gpu}
    mkdir -p "$OUT"
    exec > >(tee "$OUT/log.txt") 2>&1
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_site .gpu/wheels/*.whl
    export PYTHONPATH=/tmp/gpu_site:src PYTHONUNBUFFERED=1 TRANSFERLAB_SHARED_DATA=.gpu/data
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    "$PYTHON" -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__,
        'cuda', torch.cuda.is_available())"
    if [ "$1" = smoke ]; then
        "$PYTHON" scripts/bench_throughput.py --models convnet --batches 64 --precisions 32-true --compile off \
            --seconds 0.5 --out "$OUT/throughput.json"
        "$PYTHON" scripts/bench_throughput.py --models timm_resnet50 timm_vit_s16 --batches 2 --precisions 32-true \
            --compile off --seconds 0.5 --out "$OUT/throughput_timm.json"
        "$PYTHON" scripts/bench_overhead.py --device cpu --quick --train-per-class 20 --rounds 1 \
            --out "$OUT/overhead.json"
        return
    fi
    # most wanted first: a run cut short by the lease still brings back what it finished
    "$PYTHON" scripts/bench_overhead.py --device cuda --device-resident --epochs 3 --rounds 3 \
        --out "$OUT/overhead.json"
    "$PYTHON" scripts/bench_throughput.py --compile off --seconds 2 --out "$OUT/throughput.json"
    "$PYTHON" scripts/bench_throughput.py --compile on --batches 512 --precisions bf16-mixed --seconds 2 \
        --out "$OUT/throughput_compiled.json"
    # timm backbones at 224 px: bf16, contiguous and channels-last, eager and compiled (4 rows per model)
    "$PYTHON" scripts/bench_throughput.py --models timm_resnet50 timm_vit_s16 --batches 128 \
        --precisions bf16-mixed --compile off on --seconds 2 --out "$OUT/throughput_timm.json"
}

case "${1:-}" in
    prepare) prepare ;;
    run | smoke) run "$1" ;;
    *) echo "usage: scripts/gpu_check.sh prepare|run|smoke" >&2; exit 2 ;;
esac
