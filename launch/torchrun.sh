#!/usr/bin/env bash
# Multi-node torchrun wrapper for launch.train. Run it once per node (e.g. `srun --ntasks-per-node=1`
# under SLURM, or by hand / pdsh / k8s on each machine); every argument goes to launch.train as a
# Hydra override:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node001 launch/torchrun.sh model=toy parallel.pp=2 run.dir=runs/x
#   srun --nodes=4 --ntasks-per-node=1 launch/torchrun.sh model=deepseek_v3_671b ...   # SLURM
#   launch/torchrun.sh --dry-run ...   # print the resolved torchrun command and exit
#
# Torchrun's conventions (the same variables torchrun itself and torch.distributed use):
#   NNODES          number of machines in the job             (SLURM: SLURM_NNODES / SLURM_JOB_NUM_NODES; else 1)
#   NODE_RANK       this machine's index, 0 .. NNODES-1       (SLURM: SLURM_NODEID; else 0)
#   MASTER_ADDR     host of node 0; the static rendezvous     (SLURM: first host of SLURM_JOB_NODELIST,
#                   (TCPStore) listens there                   expanded by `scontrol show hostnames`)
#   MASTER_PORT     its port                                  (default 29500; same on every node)
#   NPROC_PER_NODE  processes (ranks) per machine, one per GPU (SLURM: SLURM_GPUS_ON_NODE; else the
#                                                              GPUs `nvidia-smi -L` lists; else 1)
#   MAX_RESTARTS    torchrun --max-restarts: on a rank failure all ranks restart this many times and
#                   resume from the newest checkpoint (default 0)
# Global rank = NODE_RANK * NPROC_PER_NODE + local rank; world size = NNODES * NPROC_PER_NODE.
# One node and no MASTER_ADDR: `torchrun --standalone` (rendezvous on localhost, a free port).
# TORCHRUN overrides the launcher command (default: `torchrun` if on PATH, else
# `python -m torch.distributed.run` with $PYTHON or python3).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

DRY_RUN=0
ARGS=()
for a in "$@"; do
  if [[ "$a" == "--dry-run" ]]; then DRY_RUN=1; else ARGS+=("$a"); fi
done

die() { echo "torchrun.sh: error: $*" >&2; exit 2; }

# First host of a SLURM node list ("gpu[003-010,012],cpu7" -> gpu003). scontrol knows every form;
# without it (e.g. outside the cluster) the first entry of the compressed form is expanded here.
first_host() {
  local list="$1"
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$list" | sed -n 1p   # sed reads everything: no SIGPIPE under pipefail
    return
  fi
  local head="${list%%,*}"
  if [[ "$head" == *"["* ]]; then
    local prefix="${list%%\[*}" rest="${list#*\[}"
    echo "${prefix}${rest%%[],-]*}"
  else
    echo "$head"
  fi
}

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

NNODES="${NNODES:-${SLURM_NNODES:-${SLURM_JOB_NUM_NODES:-1}}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:-0}}"
MASTER_PORT="${MASTER_PORT:-29500}"
MAX_RESTARTS="${MAX_RESTARTS:-0}"

if [[ -z "${MASTER_ADDR:-}" ]]; then
  NODELIST="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
  if [[ -n "$NODELIST" ]]; then
    MASTER_ADDR="$(first_host "$NODELIST")"
  fi
fi

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then
    NPROC_PER_NODE="$SLURM_GPUS_ON_NODE"
  elif command -v nvidia-smi >/dev/null 2>&1 && n="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')" && [[ "$n" -gt 0 ]]; then
    NPROC_PER_NODE="$n"
  else
    NPROC_PER_NODE=1
  fi
fi

for v in NNODES NODE_RANK MASTER_PORT MAX_RESTARTS NPROC_PER_NODE; do
  is_uint "${!v}" || die "$v must be a non-negative integer, got '${!v}'"
done
[[ "$NNODES" -ge 1 && "$NPROC_PER_NODE" -ge 1 ]] || die "NNODES and NPROC_PER_NODE must be >= 1"
[[ "$NODE_RANK" -lt "$NNODES" ]] || die "NODE_RANK=$NODE_RANK is not below NNODES=$NNODES"

if [[ -n "${TORCHRUN:-}" ]]; then
  read -r -a LAUNCHER <<<"$TORCHRUN"
elif command -v torchrun >/dev/null 2>&1; then
  LAUNCHER=(torchrun)
else
  LAUNCHER=("${PYTHON:-python3}" -m torch.distributed.run)
fi

if [[ "$NNODES" -eq 1 && -z "${MASTER_ADDR:-}" ]]; then
  CMD=("${LAUNCHER[@]}" --standalone --nnodes 1 --nproc_per_node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS")
else
  [[ -n "${MASTER_ADDR:-}" ]] || die "NNODES=$NNODES needs MASTER_ADDR (or SLURM_JOB_NODELIST) to find node 0"
  CMD=("${LAUNCHER[@]}" --nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR"
       --master_port "$MASTER_PORT" --nproc_per_node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS")
fi
CMD+=(-m launch.train ${ARGS[@]+"${ARGS[@]}"})

# `-m launch.train` imports from the repository, wherever this is started from (run.dir and other
# relative paths stay relative to the caller's working directory).
export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"

printf '%q ' "${CMD[@]}" | sed 's/ $//' >&2
echo >&2
if [[ "$DRY_RUN" -eq 1 ]]; then
  exit 0
fi
exec "${CMD[@]}"
