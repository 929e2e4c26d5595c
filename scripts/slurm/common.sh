#!/bin/bash
# Shared by the sbatch scripts: one srun task per GPU, Trainer sized from SLURM's variables,
# the run directory fixed by the job id so a requeued job finds its last checkpoint.
# DRY_RUN=1 prints the command instead of running it.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

launch() {
  local run_name="$1"; shift
  local nodes="${SLURM_NNODES:-1}"
  local gpus="${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}"
  local cmd=(srun --kill-on-bad-exit=1 "$PYTHON" "$ROOT/main.py"
    "trainer.num_nodes=$nodes" "trainer.devices=$gpus"
    "hydra.run.dir=$ROOT/outputs/slurm/$run_name" "$@")
  if [[ "${DRY_RUN:-0}" == "1" ]]; then
    printf '%q ' "${cmd[@]}"; echo
  else
    export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-0}" WANDB_MODE="${WANDB_MODE:-offline}"
    exec "${cmd[@]}"
  fi
}
