#!/usr/bin/env bash
# Issue 3 on two H200s (kind nvidia-h200-x2), one device call:
#   bash bench/gpu_mesh.sh   (writes under $OUT, default /tmp/moemesh-gpu-mesh)
# 1. parity of (1,2,1) (1,1,2) (2,1,1) against 1 GPU, fp32 and bf16 (bench/gpu_parity.py, torchrun, NCCL);
# 2. tokens/s of the `gpu` preset on 1 GPU and at each 2-GPU layout, through `moemesh train` itself.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONPATH=src:. PYTHONWARNINGS=ignore
OUT=${OUT:-/tmp/moemesh-gpu-mesh}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())"
time torchrun --nproc-per-node 2 bench/gpu_parity.py --out "$OUT" 2>&1 | grep -v -i "warn" | tail -20
steps=40
run() {  # name, overrides...
  local name=$1; shift
  python3 -m moemesh train gpu --set train.steps=$steps --set run.progress=false --set run.tensorboard=false \
    --set run.dir="$OUT/$name" "$@" 2>&1 | grep -v -i "warn" | tail -4
}
run gpu1
run ep2 --set parallel.ep=2
run tp2 --set parallel.tp=2
run dp2 --set parallel.dp=2
run tp2-sp --set parallel.tp=2 --set parallel.sequence_parallel=true
python3 bench/gpu_mesh_report.py "$OUT" "bash bench/gpu_mesh.sh"
