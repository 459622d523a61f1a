#!/usr/bin/env bash
# The data pipeline's GPU measurements in one command, run from the repository root on a machine with one CUDA GPU
# and 16 cores (about 8 minutes, most of it torch.compile). Results go to $OUT (default benchmarks/results).
# Where a package is missing (the lent GPU machines lack datasets, dill, multiprocess), carry wheels in .whl/;
# the ImageNet-like JPEGs are cut from the photographs in .photos/ (Debian's mate-backgrounds) when present.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1
PHOTOS=/usr/share/backgrounds/mate/nature
[ -d .photos ] && PHOTOS=.photos
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; nproc
python3 -c "import torch, torchvision, timm, accelerate, datasets; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"

echo "== 1. nvJPEG path against the CPU path (tests/test_pipeline.py on CUDA)"
timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_pipeline.py -k "nvjpeg or gpu_path"

echo "== 2. decode + augment images/s per core on this machine's CPU"
timeout 150 python3 benchmarks/bench_data.py --photos "$PHOTOS" --images 300 --batches 4 --repeats 3 --builtins photos --out "$OUT/bench_data_gpuhost"

echo "== 3. the whole loop against the compiled bf16 step, --decode cpu and gpu, default workers"
timeout 420 python3 benchmarks/bench_loop.py --device cuda --dtype bf16 --compile --photos "$PHOTOS" --jpegs 2560 --steps 120 \
    --window 10 --bare-windows 6 --repeats 1 --datasets jpegs --decodes cpu gpu --out "$OUT/bench_loop_cuda" \
    --recipe-args "--model vit_base_patch16_224 --img-size 224 --patch-size 16 --batch-size 128"
echo "run_gpu.sh done"
