#!/usr/bin/env bash
# The GPU measurements, run from the repository root on a machine with one CUDA GPU and 16 cores. Results go to
# $OUT (default benchmarks/results), each file naming its card. Sections, in the order given (default: all):
#   levers  the MPP step against timm's bare bf16 compiled step, one arm per speed lever (FP8, SDPA kernels),
#           ViT-B/16 and ViT-L/16 (at most 9 minutes, most of it torch.compile)
#   curve   FP8 training as good as bf16: 2,000-step ViT-B/16 losses, two bf16 seeds and one FP8 (about 5 minutes)
#   data    the data pipeline: nvJPEG against the CPU path, decode per core, the whole loop (about 8 minutes)
#   modes   the other levers, ViT-B/16: twice the batch, activation checkpointing, CUDA graphs, max-autotune
#           (at most 9 minutes; for a session after the one that ran levers)
# A device session has 15 minutes in all: give one or two sections per call (bash benchmarks/run_gpu.sh levers).
# Where a package is missing or too old (the lent GPU machines lack datasets, dill, multiprocess and torchao, and
# their timm 1.0.29 is older than the 1.0.31 run folders need), carry wheels in .whl/ (cp312); the ImageNet-like
# JPEGs are cut from the photographs in .photos/ (Debian's mate-backgrounds) when present. The wheels, into a fresh checkout:
#   pip download --only-binary=:all: --python-version 3.12 --no-deps -d .whl datasets==5.2.0 dill==0.4.1 \
#       multiprocess==0.70.19 fsspec==2026.9.0 torchao==0.18.0 timm==1.0.31
# REHEARSE=1 runs the same commands on this machine's CPU at toy sizes, with FP8 emulated (MPP_FP8_EMULATE_ON_CPU):
# every command line, flag, install step and output file is checked before a minute of device time is spent. Run
# it with the lent machines' software first on the PATH (Python 3.12, torch 2.11, accelerate 1.15, tensorboard,
# scikit-learn, pandas; no mlxtend), e.g. a venv: REHEARSE=1 PATH=/tmp/devenv/bin:$PATH bash benchmarks/run_gpu.sh
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
SECTIONS="${*:-levers curve data modes}"
for section in $SECTIONS; do
    case "$section" in levers | curve | data | modes) ;; *)
        echo "run_gpu.sh: unknown section '$section'; sections: levers curve data modes" >&2
        exit 2
        ;;
    esac
done
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_DATASETS_OFFLINE=1
PHOTOS=/usr/share/backgrounds/mate/nature
[ -d .photos ] && PHOTOS=.photos
if [ "${REHEARSE:-0}" = 1 ]; then
    DEVICE=cpu
    export MPP_FP8_EMULATE_ON_CPU=1
    VITB="--depth 1 --img-size 32 --batch-size 2"
    VITL="--depth 1 --img-size 32 --batch-size 2"
    TIMING="--steps 1 --repeats 2 --warmup 1 --peak-n 64 --gemm-seconds 0.01"
    CURVE="--steps 12 --smooth 3"
    CURVE_LEVER="fp8=tensorwise fp8_layers=all"  # ViT-Ti's layers are below torchao's rule: force them
    CURVE_SIZE="model=vit_tiny_patch16_224 img_size=32 batch_size=4 warmup_steps=4 log_every=2"
    DATA_SIZE="--images 24 --batch-size 8 --batches 2 --repeats 1"
    LOOP_SIZE="--jpegs 64 --steps 8 --window 2 --bare-windows 2"
    LOOP_MODEL="--img-size 32 --patch-size 16 --batch-size 4"
    LOOP_DECODES="cpu"  # --decode gpu needs nvJPEG: refused on a CPU
    echo "rehearsal on this CPU at toy sizes (FP8 emulated)"
else
    DEVICE=cuda
    VITB="--batch-size 128"
    VITL="--batch-size 64"
    TIMING="--steps 10 --repeats 5 --warmup 3 --peak-n 8192"
    CURVE="--steps 2000"
    CURVE_LEVER="fp8=tensorwise"
    CURVE_SIZE="model=vit_base_patch16_224 img_size=224 batch_size=64 warmup_steps=200 log_every=20"
    DATA_SIZE="--images 300 --batches 4 --repeats 3"
    LOOP_SIZE="--jpegs 2560 --steps 120 --window 10 --bare-windows 6"
    LOOP_MODEL="--img-size 224 --patch-size 16 --batch-size 128"
    LOOP_DECODES="cpu gpu"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
fi
nproc
python3 -c "import torch, torchvision, timm, accelerate, datasets; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'datasets', datasets.__version__)"
python3 -c "import torchao; print('torchao', torchao.__version__)" || echo "torchao missing: the FP8 arms will be refused"

for section in $SECTIONS; do
case "$section" in
levers)
    # each bench_step stops compiling arms once its warm-up budget is spent, so it reaches its timed repeats
    # inside the timeout; most telling levers first. ViT-B: at most 300 s, ViT-L: 240 s (one call: under 600 s)
    echo "== levers: ViT-B/16, batch 128, bf16 compiled"
    # shellcheck disable=SC2086  # the size variables are lists of flags
    timeout 300 python3 benchmarks/bench_step.py --device $DEVICE --dtype bf16 --compile --model vit_base_patch16_224 \
        $VITB $TIMING --warmup-budget 200 --levers fp8-tensorwise fp8-tensorwise-all sdpa-cudnn sdpa-flash \
        --out "$OUT/bench_levers_vitb16"
    echo "== levers: ViT-L/16, batch 64, bf16 compiled"
    # shellcheck disable=SC2086
    timeout 240 python3 benchmarks/bench_step.py --device $DEVICE --dtype bf16 --compile --model vit_large_patch16_224 \
        $VITL $TIMING --warmup-budget 150 --levers fp8-tensorwise-all fp8-tensorwise sdpa-cudnn fp8-rowwise-all \
        --out "$OUT/bench_levers_vitl16"
    ;;
curve)
    echo "== curve: FP8 (tensorwise) against two bf16 seeds, ViT-B/16 at 224 px, 2,000 steps of 64"
    # shellcheck disable=SC2086
    timeout 420 accelerate launch --mixed_precision bf16 --num_processes 1 benchmarks/fp8_curve.py $CURVE \
        --lever $CURVE_LEVER --seeds 0 1 --lever-seeds 0 --out "$OUT/fp8_curve_vitb16" \
        --settings dataset=photos patch_size=16 compile=true checkpoint_every=100000 $CURVE_SIZE
    ;;
data)
    echo "== data 1. nvJPEG path against the CPU path (tests/test_pipeline.py on CUDA)"
    timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_pipeline.py -k "nvjpeg or gpu_path"
    echo "== data 2. decode + augment images/s per core on this machine's CPU"
    # shellcheck disable=SC2086
    timeout 150 python3 benchmarks/bench_data.py --photos "$PHOTOS" $DATA_SIZE --builtins photos --out "$OUT/bench_data_gpuhost"
    echo "== data 3. the whole loop against the compiled bf16 step, --decode cpu and gpu, default workers"
    # shellcheck disable=SC2086
    timeout 420 python3 benchmarks/bench_loop.py --device $DEVICE --dtype bf16 --compile --photos "$PHOTOS" $LOOP_SIZE \
        --repeats 1 --datasets jpegs --decodes $LOOP_DECODES --out "$OUT/bench_loop_$DEVICE" \
        --recipe-args "--model vit_base_patch16_224 $LOOP_MODEL"
    ;;
modes)
    # max-autotune (minutes of GEMM autotuning) in a run of its own: a compile that outlasts its timeout then
    # costs only its own arm, not the other levers' timed repeats
    echo "== modes: ViT-B/16, batch 128 (batch-x2: 256), bf16 compiled"
    # shellcheck disable=SC2086
    timeout 300 python3 benchmarks/bench_step.py --device $DEVICE --dtype bf16 --compile --model vit_base_patch16_224 \
        $VITB $TIMING --warmup-budget 200 --levers batch-x2 grad-checkpointing compile-reduce-overhead \
        --out "$OUT/bench_modes_vitb16"
    echo "== modes: max-autotune, ViT-B/16, batch 128, bf16 compiled"
    # shellcheck disable=SC2086
    timeout 240 python3 benchmarks/bench_step.py --device $DEVICE --dtype bf16 --compile --model vit_base_patch16_224 \
        $VITB $TIMING --levers compile-max-autotune-no-cudagraphs --out "$OUT/bench_autotune_vitb16"
    ;;
esac
done
echo "run_gpu.sh done: $SECTIONS"
