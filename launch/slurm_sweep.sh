#!/usr/bin/env bash
# Submit a whole sweep file as a SLURM job array: one array task per grid point, each on
# devices/8 nodes, each writing its row to its own JSONL (a shared filesystem does not make
# concurrent appends to one file safe). Re-submitting skips points already recorded.
#
#   launch/slurm_sweep.sh configs/sweeps/study_13b_2k_64gpu.yaml results/study_13b_2k_64gpu/
#   python -m jaxlayouts.report results/study_13b_2k_64gpu/*.jsonl --out reports/study_13b_2k_64gpu/
#
# Extra sbatch options go after the two arguments, e.g. --partition=gpu --time=01:00:00.
# JAXLAYOUTS_HARDWARE (default h100-80gb) names the hardware file whose memory_fraction the jobs run
# with (launch/slurm.sbatch); plan with the same --hardware.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: launch/slurm_sweep.sh SWEEP.yaml OUT_DIR [sbatch options...]" >&2
  exit 2
fi
sweep=$1
out=$2
shift 2
mkdir -p "$out"
points=$(python -m jaxlayouts.sweep "$sweep" --out /dev/null --dry-run 2>/dev/null | wc -l)
devices=$(python -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['devices'])" "$sweep")
nodes=$(( (devices + 7) / 8 ))
here=$(cd "$(dirname "$0")" && pwd)
hardware=${JAXLAYOUTS_HARDWARE:-h100-80gb}
fraction=$(python -m jaxlayouts.plan.hardware --hardware "$hardware" --print memory_fraction)
echo "submitting $points points of $sweep on $nodes nodes each (memory fraction $fraction, $hardware)"
sbatch --array=0-$((points - 1)) --nodes="$nodes" "$@" "$here/slurm.sbatch" \
  bash -c "python -m jaxlayouts.sweep '$sweep' --index \$SLURM_ARRAY_TASK_ID --out '$out/point-\$SLURM_ARRAY_TASK_ID.jsonl'"
