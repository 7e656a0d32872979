#!/usr/bin/env bash
# The 8×H100 recipe, like nanochat's speedrun.sh but on our stages:
# tokenizer -> base (d20) -> mid -> SFT -> GRPO RL on AQuA-RAT with probes on -> evals + HTML report.
#
#   WANDB_RUN=d20 bash training/speedrun.sh          # logs to W&B as d20-base, d20-mid, ...
#   DEPTH=26 NPROC=8 bash training/speedrun.sh        # a bigger model (see `python -m training.depth_table`)
#   ARCH=nanochat-2025-10 bash training/speedrun.sh   # the Oct-2025 GPT (exports to HF NanoChat / TL's bridge)
#
# WANDB_RUN unset or "dummy" turns W&B off (metrics.jsonl in each run folder is always written).
# Every stage takes --resume, so re-running this script after a crash continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."

DEPTH="${DEPTH:-20}"
ARCH="${ARCH:-nanochat-2026-07}"  # nanochat HEAD's GPT; nanochat-2025-10 if the model must export to HF NanoChat
NPROC="${NPROC:-8}"
RUNS="${RUNS:-runs/d${DEPTH}}"
DATA="${DATA:-hf:HuggingFaceFW/fineweb-edu:sample-10BT}"
AQUA="${AQUA:-deepmind/aqua_rat}"
GSM8K="${GSM8K:-openai/gsm8k}"
RL_STEPS="${RL_STEPS:-500}"
WANDB_RUN="${WANDB_RUN:-dummy}"
if [ "$WANDB_RUN" = "dummy" ]; then WANDB=disabled; else WANDB=online; fi
export OMP_NUM_THREADS=1

scripts/bootstrap
PY=.venv/bin/python
TORCHRUN=(.venv/bin/torchrun --standalone --nproc_per_node="$NPROC")
mkdir -p "$RUNS"

echo "== tokenizer: 65,536 tokens on 2B characters of $DATA"
if [ ! -f "$RUNS/tokenizer/tokenizer.json" ]; then
    $PY -m training.tok_train --data "$DATA" --vocab-size 65536 --max-chars 2000000000 \
        --out-dir "$RUNS/tokenizer" --aqua "$AQUA" --gsm8k "$GSM8K"
fi

echo "== base: depth $DEPTH ($ARCH), 20 tokens per parameter, 524,288 tokens per step"
"${TORCHRUN[@]}" -m training.base --depth "$DEPTH" --architecture "$ARCH" --data "$DATA" --tokenizer-dir "$RUNS/tokenizer" \
    --run-dir "$RUNS/base" --device-batch-size 32 --total-batch-tokens 524288 \
    --wandb "$WANDB" --run-name "$WANDB_RUN-base" --resume

echo "== mid: chat format on synthetic + AQuA-RAT + GSM8K conversations"
"${TORCHRUN[@]}" -m training.mid --init-from "$RUNS/base/checkpoints" --run-dir "$RUNS/mid" \
    --synthetic 50000 --aqua "$AQUA" --aqua-split train --gsm8k "$GSM8K" --gsm8k-split train \
    --device-batch-size 32 --total-batch-tokens 524288 --wandb "$WANDB" --run-name "$WANDB_RUN-mid" --resume

echo "== sft: both answer styles, categorical eval on held-out synthetic and AQuA-RAT validation"
"${TORCHRUN[@]}" -m training.sft --init-from "$RUNS/mid/checkpoints" --run-dir "$RUNS/sft" \
    --synthetic 20000 --aqua "$AQUA" --aqua-split train --aqua-limit 20000 --gsm8k "$GSM8K" --gsm8k-limit 5000 \
    --eval-aqua "$AQUA" --device-batch-size 16 --examples-per-step 128 \
    --wandb "$WANDB" --run-name "$WANDB_RUN-sft" --resume

echo "== rl: GRPO on AQuA-RAT with the probes on"
"${TORCHRUN[@]}" -m training.rl --checkpoint "$RUNS/sft/checkpoints" --task aqua --data "$AQUA" \
    --max-steps "$RL_STEPS" --probes entropy,option_mass,margin,kl,counts --out "$RUNS/rl" --wandb "$WANDB" --run-name "$WANDB_RUN-rl" --resume

echo "== report"
.venv/bin/aquainterp eval --checkpoint "$RUNS/rl/checkpoints" --task aqua --data "$AQUA" --mode categorical --device cuda | tee "$RUNS/report.txt"
.venv/bin/aquainterp eval --checkpoint "$RUNS/rl/checkpoints" --task aqua --data "$AQUA" --mode generative --num-samples 4 --device cuda \
    | tee -a "$RUNS/report.txt"
.venv/bin/aquainterp dashboard html --run "$RUNS/rl" -o "$RUNS/report.html"
$PY -m training.depth_table --depths "$DEPTH" >> "$RUNS/report.txt"
echo "report: $RUNS/report.txt and $RUNS/report.html"
