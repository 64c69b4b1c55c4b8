#!/usr/bin/env bash
# Rebuild checkpoints/demo from nothing: the chain of `model.train_demo` runs that made it
# (docs/demo.md, "How it was trained"). Each run is deterministic for its seed on one device and
# thread count (2 CPU threads here); each starts from the previous one's weights.
#
#   scripts/train_demo.sh [WORK_DIR]      # about 3 h 6 min on 2 CPU cores; the result is WORK_DIR/h
#
# Then: python -m lmstream.eval_demo --model WORK_DIR/h
set -euo pipefail
cd "$(dirname "$0")/.."
W=${1:-/tmp/demo-chain}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$W"
run() { echo "== $*" >&2; "$PY" -m model.train_demo --threads 2 "$@"; }

# 0. the first demo model (before issue 11): vision stage 0, align and instruct, 32 min
run --out "$W/base" --seed 0

# A. stage 0 again with the binding levers (per-patch (kind, colour) classes, the set loss on
#    the frame token), then 1,001 instruct steps of a 6,500-step schedule, 23 min
run --out "$W/a" --seed 0 --init-from "$W/base" --vision-steps 1000 --vision-lr 5e-4 --pair-loss 1 \
    --set-weight 17.5 --token-set 17.5 --steps 6500 --stop-after 1001 --stage1 0.05 --lr 1e-3 --warmup 50 \
    --bind 0.5 --hard-negatives 0.5 --paraphrase 0.1 --whole-videos 0.5 --long-every 4 --ema 0.995 \
    --minutes 600

# C. 1,001 instruct steps (of a 3,800-step schedule) with the per-frame question loss, 17 min
run --out "$W/c" --seed 1 --init-from "$W/a" --vision-steps 0 --steps 3800 --stop-after 1001 --stage1 0.02 \
    --lr 1e-3 --warmup 50 --bind 0.5 --local 1 --hard-negatives 0.5 --paraphrase 0.1 --whole-videos 0.5 \
    --long-every 4 --ema 0.995 --minutes 600

# D0. stage 0c: the pre-fusion layers answer colour, shape and "is there" per frame, 13 min
run --out "$W/d0" --seed 2 --init-from "$W/c" --vision-steps 0 --fusion-steps 1200 --fusion-batch 96 \
    --steps 0 --paraphrase 0.1

# D. instruct with the per-frame question loss, 2,300 steps, 40 min
run --out "$W/d" --seed 3 --init-from "$W/d0" --vision-steps 0 --steps 2300 \
    --stage1 0.02 --lr 5e-4 --warmup 50 --bind 0.5 --local 1 --hard-negatives 0.5 --paraphrase 0.1 \
    --whole-videos 0.5 --long-every 4 --ema 0.995 --minutes 600

# (E0, F0 and H0 ran without --paraphrase: each rebuilt the 88-word template vocabulary, and the
# next run added the 5 paraphrase words back with fresh embeddings; kept as it ran. docs/demo.md)

# E0. stage 0c again, now also holding the question rows of frames without the asked-about thing
#     to one row (--null; this run: the referent word's row only), 6.6 min
run --out "$W/e0" --seed 4 --init-from "$W/d" --vision-steps 0 --fusion-steps 600 --fusion-batch 96 \
    --steps 0 --null 1 --null-rows referent

# E. 501 instruct steps (of a 1,500-step schedule) with --null and decoy frames in the long
#    pseudo-videos, 14 min
run --out "$W/e" --seed 5 --init-from "$W/e0" --vision-steps 0 --steps 1500 --stop-after 501 --stage1 0.02 \
    --lr 5e-4 --warmup 50 --bind 0.5 --local 1 --null 1 --null-rows referent --decoys 12 --hard-negatives 0.5 \
    --paraphrase 0.1 --whole-videos 0.5 --long-every 4 --ema 0.995 --minutes 600

# F0. stage 0c with --null on every question row from the referent word on, 7.8 min
run --out "$W/f0" --seed 7 --init-from "$W/e" --vision-steps 0 --fusion-steps 500 --fusion-batch 96 \
    --steps 0 --null 1

# F. 751 instruct steps (of 1,500) with gradient through the long pseudo-videos' frame rows, 14 min
run --out "$W/f" --seed 8 --init-from "$W/f0" --vision-steps 0 --steps 1500 --stop-after 751 --stage1 0.02 \
    --lr 5e-4 --warmup 50 --bind 0.5 --local 1 --null 1 --decoys 12 --long-grad --hard-negatives 0.5 \
    --paraphrase 0.1 --whole-videos 0.5 --long-every 4 --ema 0.995 --minutes 600

# H0. stage 0c with a ten times heavier --null, 3.7 min
run --out "$W/h0" --seed 10 --init-from "$W/f" --vision-steps 0 --fusion-steps 300 --fusion-batch 96 \
    --steps 0 --null 10

# H. 600 instruct steps, long pseudo-videos of 200 distinct frames, 14 min: checkpoints/demo
run --out "$W/h" --seed 11 --init-from "$W/h0" --vision-steps 0 --steps 600 --stage1 0.02 --lr 5e-4 \
    --warmup 50 --bind 0.5 --local 1 --null 10 --decoys 12 --long-grad --long-anchors 200 \
    --hard-negatives 0.5 --paraphrase 0.1 --whole-videos 0.5 --long-every 3 --ema 0.995 --minutes 600
