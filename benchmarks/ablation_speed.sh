#!/usr/bin/env bash
. .venv/bin/activate
M=crystal_gpt/models
python benchmarks/ablation.py --no-eval --out runs/speed -n 1000 \
  --row "last, no rule=$M/mp_20_last.pt:0" \
  --row "last, rule=$M/mp_20_last.pt:auto" \
  --row "first, no rule=$M/mp_20.pt:0" \
  --row "first, rule=$M/mp_20.pt:auto" \
  --row "first, rule, charge-balanced=$M/mp_20.pt:auto:--charge-balanced" \
  --row "first, rule, no symmetry check=$M/mp_20.pt:auto:--skip-symmetry-check"
python benchmarks/sample_speed.py --model mp_20 -n 1000
