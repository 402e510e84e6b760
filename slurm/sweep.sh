#!/usr/bin/env bash
# Scaling sweep: submit the SAME config once per rank layout, each run into its own directory,
# then compare them with `cafedist scaling-report OUT/*`.
#
#   CONFIG=configs/my.yaml OUT=runs/sweep SWEEP="1 2 4" slurm/sweep.sh
#       -> 3 jobs on one node with 1, 2, 4 tasks: runs/sweep/n1, runs/sweep/n2, runs/sweep/n4
#   CONFIG=configs/my.yaml OUT=runs/gpu GPUS=1 SWEEP="1 2 4 8 2x8 4x8" slurm/sweep.sh -- --partition=gpu
#       -> "NxT" = N nodes x T tasks per node (multi_node.sbatch): runs/gpu/n16-nodes2, ...
#
# Knobs (environment variables):
#   SWEEP     layouts: T (one node, T tasks) or NxT (N nodes, T tasks each); default "1 2 4"
#   CONFIG    YAML config (default configs/quickstart.yaml)
#   OUT       parent directory of the runs (default runs/sweep); run dir = OUT/n<ranks> on one
#             node, OUT/n<ranks>-nodes<N> on several
#   EXTRA     dotted overrides for every run (see slurm/_run.sh)
#   PYTHON    interpreter with cafedist (default python3 on PATH)
#   GPUS=1    one GPU per task (--gpus-per-node=T); default 0 = CPU ranks
#   SERIAL=1  run the jobs one after another (--dependency=singleton on one job name), so they
#             do not compete for the same nodes and timings stay comparable (default 1)
#   TEMPLATE_SINGLE, TEMPLATE_MULTI  sbatch templates (default slurm/single_node.sbatch and
#             slurm/multi_node.sbatch next to this script)
#   DRY_RUN=1 print the sbatch commands instead of submitting (runnable as printed: with the
#             run folder, the log file and the knobs above that the jobs read)
# Arguments after `--` are passed to every sbatch call (e.g. --partition, --time, --account).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SWEEP="${SWEEP:-1 2 4}"
export CONFIG="${CONFIG:-configs/quickstart.yaml}"
OUT="${OUT:-runs/sweep}"
GPUS="${GPUS:-0}"
SERIAL="${SERIAL:-1}"
TEMPLATE_SINGLE="${TEMPLATE_SINGLE:-$here/single_node.sbatch}"
TEMPLATE_MULTI="${TEMPLATE_MULTI:-$here/multi_node.sbatch}"
[[ "${1:-}" == "--" ]] && shift
# Run from inside a restarted job, sbatch would hand that job's restart count to every sweep job
# (Slurm sets it only on a restart). The templates ask scontrol for their own count anyway; this
# keeps them right where scontrol cannot answer and they fall back to the variable.
unset SLURM_RESTART_COUNT
job_name="cafedist-sweep-$(basename "$OUT")"

# Parse every layout first, so a typo submits nothing.
layouts=()
for layout in $SWEEP; do
    if [[ "$layout" =~ ^([0-9]+)x([0-9]+)$ ]]; then
        nodes="${BASH_REMATCH[1]}"; per_node="${BASH_REMATCH[2]}"
    elif [[ "$layout" =~ ^[0-9]+$ ]]; then
        nodes=1; per_node="$layout"
    else
        echo "slurm/sweep.sh: error: SWEEP entry '$layout' is not T or NxT (e.g. \"1 2 4 2x4\")" >&2
        exit 2
    fi
    if (( 10#$nodes < 1 || 10#$per_node < 1 )); then
        echo "slurm/sweep.sh: error: SWEEP entry '$layout' needs at least 1 node and 1 task" >&2
        exit 2
    fi
    layouts+=("$((10#$nodes)) $((10#$per_node))")
done

submitted=()
for layout in "${layouts[@]}"; do
    read -r nodes per_node <<<"$layout"
    ranks=$(( nodes * per_node ))
    if (( nodes == 1 )); then run="$OUT/n$ranks"; template="$TEMPLATE_SINGLE"
    else run="$OUT/n$ranks-nodes$nodes"; template="$TEMPLATE_MULTI"; fi

    args=(--nodes="$nodes" --ntasks-per-node="$per_node" --job-name="$job_name")
    if [[ "$GPUS" == 1 ]]; then args+=(--gpus-per-node="$per_node"); else args+=(--gpus-per-node=0); fi
    [[ "$SERIAL" == 1 ]] && args+=(--dependency=singleton)
    args+=("$@" "$template")

    # The run directory goes to the job through the environment (sbatch --export=ALL default);
    # the job log is written next to the run.
    log=(--output="$run/slurm-%j.out")
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        # with the knobs the jobs read (given inline to this script, they are not in the caller's
        # shell), the printed line submits what the sweep would
        printf 'mkdir -p %q && ' "$run"
        for knob in CONFIG EXTRA PYTHON; do [[ -n "${!knob:-}" ]] && printf '%s=%q ' "$knob" "${!knob}"; done
        printf 'OUT=%q ' "$run"; printf '%q ' sbatch "${log[@]}" "${args[@]}"; echo
        continue
    fi
    made=0; [[ -d "$run" ]] || made=1
    mkdir -p "$run"
    if ! job=$(OUT="$run" sbatch --parsable "${log[@]}" "${args[@]}"); then
        # sbatch said why above; the folder made for this layout goes again, and the user learns
        # which layouts are queued already (rerunning the whole sweep would submit them twice)
        (( made )) && rmdir "$run" 2>/dev/null
        echo "slurm/sweep.sh: error: sbatch refused layout ${nodes}x${per_node}; submitted before it:" \
             "${submitted[*]:-none}" >&2
        exit 1
    fi
    submitted+=("${nodes}x${per_node}=job$job")
    echo "submitted ${nodes}x${per_node} ($ranks ranks on $nodes node(s)) as job $job -> $run"
done
[[ "${DRY_RUN:-0}" == 1 ]] || echo "when done: cafedist scaling-report $OUT/n*"
