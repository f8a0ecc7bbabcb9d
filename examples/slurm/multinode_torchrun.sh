#!/bin/bash
# The same run launched without SLURM: torchrun on each of N nodes (run this on every node with
# NODE_RANK=0..N-1 and MASTER_ADDR = node 0's address), or mpirun through mpi4py.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash examples/slurm/multinode_torchrun.sh ...flags
#   mpirun -np 16 -H node1:8,node2:8 -x MASTER_ADDR=node1 -x MASTER_PORT=29500 \
#       -x MEGAKD_USE_MPI4PY=1 python tools/pretrain_kd.py ...flags      # needs pip install .[mpi]
set -euo pipefail
torchrun --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}" --nproc-per-node "${GPUS_PER_NODE:-8}" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  tools/pretrain_kd.py "$@"
