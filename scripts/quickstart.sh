#!/usr/bin/env bash
# The whole MiniGPT pipeline on embedded data, no download, ~5 minutes on a 2-core CPU:
#   tokenizer -> pretrain -> evaluate -> instruction fine-tune -> Hub-ready folder with card
#   -> reload with AutoModelForCausalLM(trust_remote_code=True) in a fresh process -> generate.
# Usage: bash scripts/quickstart.sh [OUT_DIR]      (default runs/quickstart; replaced if present)
# Every step is an ordinary entry point; run any of them alone with --help to see its options.
# It sets up its environment first (scripts/setup.sh: the active one, or .venv, made and kept here).
# QUICKSTART_MAX_STEPS=N trains each stage N steps instead of the configs' 300 and 1200: a smoke
# test of the commands (tests/scripts/test_readme.py), whose figures then mean nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
source scripts/setup.sh
OUT="${1:-runs/quickstart}"
STEPS=()
if [[ -n "${QUICKSTART_MAX_STEPS:-}" ]]; then
    STEPS=(--max_steps "$QUICKSTART_MAX_STEPS")
fi
rm -rf "$OUT"
mkdir -p "$OUT"
START=$(date +%s)

# The two training jobs go through `accelerate launch`, as they would on several GPUs: one CPU process
# here; on a GPU machine drop --cpu, or use `accelerate config` and plain `accelerate launch`. The
# launcher's --mixed_precision is overridden by each job's own (mixed_precision: auto, printed at start).
# The tokenizer and the evaluation run alone, as plain `python` (the launcher costs ~4 s per start).
LAUNCH=(accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no)
export TOKENIZERS_PARALLELISM=false

step() { printf '\n=== %s (%ds) ===\n' "$1" "$(( $(date +%s) - START ))"; }

step "0/6 write the embedded corpus (CPython's documentation, every 10th topic held out)"
python -c "import sys; from tokenization.corpus import write_embedded_corpus; print(*write_embedded_corpus(sys.argv[1]))" "$OUT/data"

step "1/6 train a byte-level BPE tokenizer on the training text"
python scripts/train_tokenizer.py --files "$OUT/data/train.txt" --output_dir "$OUT/tokenizer" --vocab_size 2048 \
    --model_max_length 128 --merges_table 20 --no_progress

step "2/6 pretrain a 4-layer MiniGPT (300 steps)"
"${LAUNCH[@]}" scripts/pretrain.py scripts/configs/quickstart_pretrain.yaml \
    --train_file "$OUT/data/train.txt" --validation_file "$OUT/data/validation.txt" \
    --tokenizer_path "$OUT/tokenizer" --output_dir "$OUT/pretrain" "${STEPS[@]}"

step "3/6 evaluate on the held-out documentation"
python scripts/evaluate.py --model "$OUT/pretrain/model" --text_file "$OUT/data/validation.txt" \
    --output_json "$OUT/eval_pretrained.json"

step "4/6 instruction fine-tune on the embedded tasks (1200 steps)"
"${LAUNCH[@]}" scripts/sft.py scripts/configs/quickstart_sft.yaml \
    --model_path "$OUT/pretrain/model" --output_dir "$OUT/sft" "${STEPS[@]}"

step "5/6 + 6/6 reload the final folder in a fresh process, generate, summarise"
python scripts/quickstart_report.py "$OUT" --elapsed_seconds "$(( $(date +%s) - START ))"
