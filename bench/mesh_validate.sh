#!/bin/bash
# Held-out check of the planner on 2 GPUs (issue 9): three configs never measured before, each at every
# 2-GPU layout and on 1 GPU, with bench/mesh_runs.py (one launch per world size), into $OUT/<label>/.
# bench/mesh_report.py then compares them with the planner (the mesh's idle constants were fitted on
# bench/results/mesh_runs_x2.json's configs only).
#   NCCL_NVLS_ENABLE=0 PYTHONPATH=src bash bench/mesh_validate.sh        (kind nvidia-h200-x2, ~4 min)
set -u
OUT=${OUT:-/tmp/mesh_validate}
run() {
  local label=$1; shift
  local sets=()
  for kv in "$@"; do sets+=(--set "$kv"); done
  python3 "$(dirname "$0")/mesh_runs.py" --gpus 2 --layouts "2,1,1;1,2,1;1,1,2;1,1,1" --configs gpu-preset \
    --no-a2a --deadline-s 200 --timeout-s 120 --out "$OUT/$label" "${sets[@]}" 2>&1 | grep "^\[mesh_runs\]\|Error\|error" | cut -c1-200
}
run m-d2048-e16-k2-f2816-L4-s2048-b8 model.dim=2048 model.n_layers=4 model.num_experts=16 model.top_k=2 \
  model.ffn_dim=2816 model.n_heads=16 model.n_kv_heads=4 model.max_seq_len=2048 train.seq_len=2048 train.global_batch=8
run m-d1536-e32-k4-f768-L12-s1024-b16 model.dim=1536 model.n_layers=12 model.num_experts=32 model.top_k=4 \
  model.ffn_dim=768 model.n_heads=12 model.n_kv_heads=4 model.max_seq_len=1024 train.seq_len=1024 train.global_batch=16
run m-d3072-e8-k2-f8192-L3-s2048-b8-v32k model.dim=3072 model.n_layers=3 model.num_experts=8 model.top_k=2 \
  model.ffn_dim=8192 model.n_heads=24 model.n_kv_heads=8 model.max_seq_len=2048 train.seq_len=2048 train.global_batch=8 \
  model.vocab_size=32000
