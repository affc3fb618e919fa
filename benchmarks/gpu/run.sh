#!/usr/bin/env bash
# The whole GPU check for a lent H100/H200 (about 8 minutes, plus up to 5 for train_switches: name parts to fit one
# 10-minute call): bf16 FSDP2 + compile training MFU on the llama-1b (micro-batch 8 and 16) and llama-350m presets,
# every scaling switch trained and resumed, then serving throughput of the engine on llama-1b.
# Logs land in $OUT (or /tmp/llmp-gpu). Each part has its own time limit, so one that hangs does not cost the others.
#
#   bash benchmarks/gpu/run.sh                        # every part
#   bash benchmarks/gpu/run.sh serve_engine           # named parts only
#
# The image there has torch, transformers and tokenizers but not Hydra: wheels in .whl/ (hydra-core, omegaconf,
# antlr4 runtime, and the transformers version the tests use) are installed to /tmp/site first when present. To make
# them on the CPU machine (git ignores .whl/ through .git/info/exclude):
#   pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl hydra-core==1.3.8 omegaconf==2.3.1 transformers==5.23.0
#   pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
set -u
OUT=${OUT:-/tmp/llmp-gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import sys, torch, transformers, hydra; print(sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'hydra', hydra.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/env.txt"

part() {  # part NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, note the exit status
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    grep -v -E "Warning|warn\(|^\s*$" "$OUT/$name.log" | tail -25
    echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
}

want() { [ $# -eq 0 ] || [[ " $* " == *" $PART "* ]]; }
PART=train_mfu_1b; want "$@" && part $PART 240 python3 benchmarks/gpu/train_mfu.py --model llama-1b --micro-batch 8
PART=train_mfu_1b_mb16
want "$@" && part $PART 240 python3 benchmarks/gpu/train_mfu.py --model llama-1b --micro-batch 16
PART=train_mfu_350m; want "$@" && part $PART 150 python3 benchmarks/gpu/train_mfu.py --model llama-350m --micro-batch 16
# Fine-tuning a Llama-3.2-1B-shaped model (#15): LoRA here; full fine-tuning's step is train_mfu_1b's.
PART=finetune_lora_1b; want "$@" && part $PART 240 python3 benchmarks/gpu/train_mfu.py --model llama-1b --lora \
    --micro-batch 8
# Every scaling switch (#25): bf16 FSDP2, activation checkpointing, compile, CPU offload, bf16 DDP autocast and the
# llama-1b-h100 stack each train a small Llama within bf16 tolerance of fp32 and resume from their own checkpoint;
# one `switch=<name> tokens_per_s=<n>` line each.
PART=train_switches; want "$@" && part $PART 300 python3 -m pytest -q -s -p no:cacheprovider \
    tests/gpu/test_train_switches_gpu.py
want "$@" && grep -h "^switch=" "$OUT/$PART.log"
PART=serve_engine; want "$@" && part $PART 240 python3 benchmarks/gpu/serve_engine.py --model llama-1b
# Serving memory against weights + KV budget (#17): a 1.2B GPT-2-shaped model, 128k vocabulary, 2k-token prompts.
PART=serve_memory; want "$@" && part $PART 240 python3 benchmarks/serve_memory.py --device cuda --layers 24 \
    --hidden 2048 --vocab 128256 --prompt-tokens 2048 --concurrency 32 --rows 8
exit 0
