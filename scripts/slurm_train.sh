#!/bin/bash
# Bi-encoder training on several SLURM nodes: srun starts one torchrun per node; torchrun starts one process per
# GPU and the c10d rendezvous on the first node of the allocation ranks them (by host name, so any node may be
# rank 0: rank 0 writes the checkpoints, and output_dir must be on a disk every node sees).
#
#   sbatch scripts/slurm_train.sh train=biencoder_nq train_datasets=[nq_train] dev_datasets=[nq_dev] output_dir=runs/nq
#
# Submit from the repository root; the arguments are train_dense_encoder.py's. Change the #SBATCH lines on the
# sbatch command line (sbatch --nodes=4 ...); NPROC_PER_NODE must match --gpus-per-node; RDZV_PORT is the
# rendezvous port on the first node.
#SBATCH --job-name=dpr --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --cpus-per-task=32 --time=48:00:00
set -euo pipefail
nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
srun torchrun --nnodes "$SLURM_NNODES" --nproc_per_node "${NPROC_PER_NODE:-8}" --rdzv_id "$SLURM_JOB_ID" \
  --rdzv_backend c10d --rdzv_endpoint "${nodes[0]}:${RDZV_PORT:-29500}" \
  "$SLURM_SUBMIT_DIR/train_dense_encoder.py" "$@"
