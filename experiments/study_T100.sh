#!/usr/bin/env bash
# The T = 100 study of issue 14 (docs/RESULTS.md): every method tuned on validation (lr grid,
# seed 0), the chosen setting run on three seeds, in four settings. Resumable: rerun the same
# line and finished runs are reused, unfinished ones resume from their last checkpoint.
# ~13 minutes per run on one core of the 2-core CI-like machine (mnist5k, 100 rounds).
#
#   bash experiments/study_T100.sh mnist5k-a0.3                  # tune + 3 seeds (the study)
#   bash experiments/study_T100.sh mnist5k-a0.3 --first-trials   # only every method's lr=0.05 trial (seed 0), reused by the study
#   bash experiments/study_T100.sh mnist5k-a0.3-last-exit-kd     # CAFEDistill with last_exit_kd (one method; any setting + -last-exit-kd)
#
# PYTHON=path/to/venv/bin/python picks the interpreter; JOBS=1 runs one training at a time.
# Order of the budget: mnist5k a0.3, mnist5k a0.1, digits a0.3, digits a0.1.
set -euo pipefail
cd "$(dirname "$0")/.."
setting=${1:?usage: study_T100.sh SETTING [extra compare args]}; shift
# SETTING-last-exit-kd: CAFEDistill alone with the last exit distilling too (ours, not the paper's;
# docs/METHOD.md, "The last exit starves"): the best CAFEDistill variant on validation, tuned
# and seeded like the other methods of SETTING
base=${setting%-last-exit-kd}
case "$base" in
  mnist5k-a0.3) config=configs/quickstart.yaml; extra=() ;;
  mnist5k-a0.1) config=configs/quickstart.yaml; extra=(data.alpha=0.1) ;;
  digits-a0.3)  config=configs/digits.yaml;     extra=() ;;
  digits-a0.1)  config=configs/digits.yaml;     extra=(data.alpha=0.1) ;;
  *) echo "unknown setting $setting" >&2; exit 2 ;;
esac
if [ "$base" != "$setting" ]; then
  extra+=(algorithm.cafedistill.last_exit_kd=true); METHODS=${METHODS:-cafedistill}
fi
METHODS=${METHODS:-cafedistill,fedper,cafedistill-heads,fedrod,fedavg,fedrep,fedpac,ditto,cafedistill-nosel,cafedistill-nokd}  # METHODS=a,b runs a subset (same run directories)
mode=(--tune --seeds 3)
if [ "${1:-}" = "--first-trials" ]; then  # only the lr=0.05 trial of every method (seed 0), no tuning
  shift; mode=(--seeds 1); grid=(--grid train.lr=0.05)  # --seeds 1: the first seed (0) only
else
  grid=(--grid train.lr=0.05,0.02)
fi
for arg in "$@"; do  # the study's own settings come last and would silently win over the same key
  case "$arg" in
    train.rounds=*|train.eval_every=*|data.val_fraction=*|checkpoint.every=*|data.alpha=*|train.lr=*|\
    algorithm.cafedistill.last_exit_kd=*)
      echo "study_T100.sh: $arg: the study fixes ${arg%%=*} (its protocol); run cafedist compare directly for another" >&2
      exit 2 ;;
  esac
done
export OMP_NUM_THREADS=1
exec "${PYTHON:-python}" -m cafedist compare --config "$config" --algorithms "$METHODS" "${grid[@]}" "${mode[@]}" \
  --jobs "${JOBS:-2}" --out "runs/study/$setting" "$@" \
  train.rounds=100 train.eval_every=5 data.val_fraction=0.1 checkpoint.every=10 ${extra[@]+"${extra[@]}"}  # (bash < 4.4 calls an empty array unbound under set -u)
