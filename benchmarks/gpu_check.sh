#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent CUDA machine (run by hand; results go in RESULTS.md):
#   bash benchmarks/gpu_check.sh OUT_DIR [SECONDS]      (FULL_JOB=0 leaves out the full default toy job)
# Run from the repository root with a python3 that has torch (CUDA), transformers, diffusers, accelerate. SECONDS
# (default 480) bounds the whole script; each step gets its own limit and the last one gets what is left.
#  1. the test suite on this machine: its device "auto" is CUDA, so the node tests load and sample on the GPU in
#     bf16, and the trainer tests train with bf16 autocast;
#  2. tiny_pretrain -> resume -> tiny_instruct with training.run on the GPU (bf16, fused AdamW), timed, and the
#     prefix-cache benchmark (benchmarks/train_step.py) on CUDA in bf16;
#  3. the same pretraining under `accelerate launch` with the FSDP2 and DDP configs, one process each;
#  4. the toy job shortened (teach 20, autoencoder 20, pretrain 30, instruct 10 steps), then the full default job with the time that is left.
# Writes summary.txt (one line per step: rc, seconds) and one log per step into OUT_DIR.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [SECONDS]}
BUDGET=${2:-480}
mkdir -p "$OUT"
WORK=$(mktemp -d)
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)

left() { echo $((BUDGET - ($(date +%s) - START))); }

step() {  # step NAME LIMIT_SECONDS COMMAND...: runs COMMAND under the smaller of LIMIT and the time left
    local name=$1 limit=$2 t0 rc
    shift 2
    [ "$(left)" -lt "$limit" ] && limit=$(left)
    if [ "$limit" -le 5 ]; then
        echo "$name: not run (budget spent)" | tee -a "$OUT/summary.txt"
        return
    fi
    t0=$(date +%s)
    timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
    rc=$?
    echo "$name: rc=$rc in $(($(date +%s) - t0)) s (limit $limit)" | tee -a "$OUT/summary.txt"
}

python3 - >"$OUT/summary.txt" 2>&1 <<'EOF'
import platform, torch, transformers, diffusers, accelerate
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__,
      "diffusers", diffusers.__version__, "accelerate", accelerate.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-",
      "bf16", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
EOF
cat "$OUT/summary.txt"

XDIST=()
python3 -c "import xdist" 2>/dev/null && XDIST=(-n 8)
step pytest 180 python3 -m pytest -q "${XDIST[@]}" --timeout=170 -rfE

TINY="$WORK/tiny"
MODELS=(--model.mllm="$TINY/qwen2_5_vl" --model.decoder="$TINY/sana")
step train 30 python3 -m training.make_tiny_models "$TINY"
step train 60 python3 -m training.run configs/tiny_pretrain.yaml "${MODELS[@]}" --train.output_dir="$WORK/pre" \
    --train.steps=200
step train 45 python3 -m training.run configs/tiny_pretrain.yaml "${MODELS[@]}" --train.output_dir="$WORK/pre" \
    --train.steps=300 --train.resume=true
step train 60 python3 -m training.run configs/tiny_instruct.yaml "${MODELS[@]}" --train.output_dir="$WORK/ins" \
    --model.init_checkpoint="$WORK/pre/metaquery.safetensors" --train.steps=100
step train 90 python3 -m benchmarks.train_step --device cuda --bf16 --repeats 10 --warmup 2 --quiet
for dist in fsdp ddp; do
    step accelerate 60 accelerate launch --config_file "configs/accelerate/$dist.yaml" --num_processes 1 \
        -m training.run configs/tiny_pretrain.yaml "${MODELS[@]}" --train.output_dir="$WORK/$dist" \
        --train.steps=100 --train.checkpoint_every=50
done

step toy_quick 150 python3 -m training.run --teach_steps=20 --teach_restate_first=10 --ae_steps=20 \
    --pretrain_steps=30 --instruct_steps=10 --out="$WORK/toy_quick"
[ "${FULL_JOB:-1}" = 1 ] && step toy_full 600 python3 -m training.run --out="$WORK/toy_full"
for f in toy_quick toy_full; do
    [ -f "$WORK/$f/scores.json" ] && cp "$WORK/$f/scores.json" "$OUT/${f}_scores.json"
done
echo "total: $(($(date +%s) - START)) s" | tee -a "$OUT/summary.txt"
