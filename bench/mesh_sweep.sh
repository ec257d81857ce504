#!/bin/bash
# The planner's multi-GPU measurements (issue 9): every layout of N GPUs, each in a fresh launch
# (bench/mesh_runs.py --launch-per-job), for one set of configs, into $OUT/<set>-x<N>/<config>/.
#   NCCL_NVLS_ENABLE=0 PYTHONPATH=src bash bench/mesh_sweep.sh SET N [ONLY]
# SET: skeleton     the `gpu` preset with tiny dims, 2 and 8 layers, launched op by op (train.cuda_graph=off):
#                   a step that is host time only, which calibrates the host of a step that is not one CUDA graph
#      calibration  session 4's three configs and its three held-out ones (now seen)
#                   (session 5's 4-GPU calibration was `heldout 4 'e64-k8|d4096'`: bench/results/mesh_calibration_x4.json)
#      heldout      configs never measured before (session 5), run at 2 GPUs and two of them at 4
#      heldout4     two more configs never measured before, for 4 GPUs (session 5, after the fit on the rest)
# ONLY: a regular expression; only the configs whose label matches it run.
# Every set but the skeleton replays the step as one CUDA graph where the layout can (ep=1: --graph-meshes),
# as session 6's graphed files did; the skeleton stays op by op (it measures the host).
# bench/mesh_report.py compares them with the planner; `moemesh plan --calibrate` fits on them.
set -u -o pipefail
FAILED=0
if [ $# -lt 2 ]; then echo "usage: bash bench/mesh_sweep.sh SET N [ONLY]  (SET: skeleton, calibration, heldout, heldout4; N: 2 or 4)"; exit 2; fi
SET=$1; N=$2; ONLY=${3:-.}
OUT=${OUT:-/tmp/mesh_sweep}
case $N in
  2) LAYOUTS="2,1,1;1,2,1;1,1,2" ;;
  4) LAYOUTS="4,1,1;1,4,1;1,1,4;2,2,1;2,1,2;1,2,2" ;;
  *) echo "N must be 2 or 4"; exit 2 ;;
esac
run() {
  local label=$1 config=$2; shift 2
  [[ $label =~ $ONLY ]] || return 0
  local sets=()
  for kv in "$@"; do sets+=(--set "$kv"); done
  python3 "$(dirname "$0")/mesh_runs.py" --gpus "$N" --layouts "$LAYOUTS" --configs "$config" --launch-per-job \
    --no-single --no-a2a --steps 10 --warmup 3 --profile-steps 0 --deadline-s 560 --timeout-s 120 $GRAPH \
    --out "$OUT/$SET-x$N/$label" "${sets[@]}" 2>&1 | grep "^\[mesh_runs\]\|Error\|error" | cut -c1-200
  local status=$?  # mesh_runs.py's exit status (1 when a run failed), through the filter
  [ "$status" -eq 0 ] || { echo "mesh_sweep: $label failed (exit $status)"; FAILED=1; }
}
SKELETON=$(cd "$(dirname "$0")" && python3 -c "from host_probe import SKELETON; print(' '.join(SKELETON))") || exit 1
GRAPH=--graph-meshes
[ "$SET" = skeleton ] && GRAPH=
case $SET in
  skeleton)
    # shellcheck disable=SC2086
    run skeleton-L2 gpu-preset $SKELETON model.n_layers=2 train.cuda_graph=off
    # shellcheck disable=SC2086
    run skeleton-L8 gpu-preset $SKELETON model.n_layers=8 train.cuda_graph=off ;;
  calibration)
    run gpu-preset gpu-preset
    run mixtral-shaped mixtral-shaped
    run fine-grained fine-grained
    run m-d2048-e16-k2-f2816-L4-s2048-b8 gpu-preset model.dim=2048 model.n_layers=4 model.num_experts=16 model.top_k=2 \
      model.ffn_dim=2816 model.n_heads=16 model.n_kv_heads=4 model.max_seq_len=2048 train.seq_len=2048 train.global_batch=8
    run m-d1536-e32-k4-f768-L12-s1024-b16 gpu-preset model.dim=1536 model.n_layers=12 model.num_experts=32 model.top_k=4 \
      model.ffn_dim=768 model.n_heads=12 model.n_kv_heads=4 model.max_seq_len=1024 train.seq_len=1024 train.global_batch=16
    run m-d3072-e8-k2-f8192-L3-s2048-b8-v32k gpu-preset model.dim=3072 model.n_layers=3 model.num_experts=8 model.top_k=2 \
      model.ffn_dim=8192 model.n_heads=24 model.n_kv_heads=8 model.max_seq_len=2048 train.seq_len=2048 train.global_batch=8 \
      model.vocab_size=32000 ;;
  heldout)
    run h-d1024-e64-k8-f512-L6-s2048-b8 gpu-preset model.dim=1024 model.n_layers=6 model.num_experts=64 model.top_k=8 \
      model.ffn_dim=512 model.n_heads=16 model.n_kv_heads=4 model.max_seq_len=2048 train.seq_len=2048 train.global_batch=8
    run h-d2560-e8-k2-f6912-L4-s2048-b8 gpu-preset model.dim=2560 model.n_layers=4 model.num_experts=8 model.top_k=2 \
      model.ffn_dim=6912 model.n_heads=20 model.n_kv_heads=4 model.max_seq_len=2048 train.seq_len=2048 train.global_batch=8
    run h-d1024-e16-k2-f2816-L16-s1024-b16 gpu-preset model.dim=1024 model.n_layers=16 model.num_experts=16 model.top_k=2 \
      model.ffn_dim=2816 model.n_heads=16 model.n_kv_heads=8 model.max_seq_len=1024 train.seq_len=1024 train.global_batch=16
    run h-d4096-e8-k1-f8192-L2-s4096-b4 gpu-preset model.dim=4096 model.n_layers=2 model.num_experts=8 model.top_k=1 \
      model.ffn_dim=8192 model.n_heads=32 model.n_kv_heads=8 model.max_seq_len=4096 train.seq_len=4096 train.global_batch=4 ;;
  heldout4)
    run v-d1536-e16-k4-f1024-L8-s2048-b8 gpu-preset model.dim=1536 model.n_layers=8 model.num_experts=16 model.top_k=4 \
      model.ffn_dim=1024 model.n_heads=12 model.n_kv_heads=4 model.max_seq_len=2048 train.seq_len=2048 train.global_batch=8
    run v-d3072-e32-k2-f2048-L4-s2048-b8-v32k gpu-preset model.dim=3072 model.n_layers=4 model.num_experts=32 model.top_k=2 \
      model.ffn_dim=2048 model.n_heads=24 model.n_kv_heads=8 model.max_seq_len=2048 train.seq_len=2048 train.global_batch=8 \
      model.vocab_size=32000 ;;
  *) echo "SET must be skeleton, calibration, heldout or heldout4"; exit 2 ;;
esac
python3 "$(dirname "$0")/mesh_merge.py" "$OUT/mesh_${SET}_x$N.json" "$OUT/$SET-x$N"/*/mesh_runs.json
exit $FAILED
