#!/usr/bin/env bash
# A stage, or run_all.sh, on several SLURM nodes: one srun task per node, each starting torchrun
# with one process per GPU; the job's first node is the rendezvous endpoint (c10d). Submit from
# the repository's folder; out_dir, --cache_dir and the data must be on a filesystem every node
# shares (README "Several nodes").
#
#   sbatch slurm.sh pretrain_frame.py --data as1.9m                  # 2 nodes x 8 GPUs
#   sbatch --nodes=4 slurm.sh finetune.py --ckpt X.ckpt --data as2m
#   sbatch --nodes=2 slurm.sh run_all.sh                             # every table, DATA_ROOT=...
#
# A requeued or preempted job (--requeue) starts the same command again: it resumes from its
# last checkpoint wherever its rank 0 now runs (the out_dir lock knows the job id).
#SBATCH --job-name=atst
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")}"  # sbatch runs a copy of this file from its spool
[ $# -gt 0 ] || { echo "usage: sbatch slurm.sh SCRIPT.py [FLAGS...] | run_all.sh" >&2; exit 2; }

GPUS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}   # processes per node
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
RDZV=$HEAD:${RDZV_PORT:-29500}
# DataLoader workers bring their own parallelism: one thread per process unless set
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "job $SLURM_JOB_ID: $SLURM_NNODES nodes x $GPUS processes, rendezvous $RDZV: $*"

# one task per node with the job's CPUs (newer srun does not inherit --cpus-per-task); a node
# whose task fails ends the others rather than leaving them waiting for it
SRUN=(srun --ntasks-per-node=1 --kill-on-bad-exit=1
      ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK})
if [[ "$1" == *run_all.sh ]]; then  # every node runs the script; each cell's torchrun meets
  shift
  "${SRUN[@]}" env NNODES="$SLURM_NNODES" NPROC="$GPUS" RDZV="$RDZV" RDZV_ID="$SLURM_JOB_ID" \
    bash run_all.sh "$@"
else
  "${SRUN[@]}" torchrun --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS" \
    --rdzv_backend=c10d --rdzv_endpoint="$RDZV" --rdzv_id="$SLURM_JOB_ID" "$@"
fi
