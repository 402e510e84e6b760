#!/usr/bin/env bash
# The prepared GPU check: run it once on a machine with one CUDA GPU, read its summary, fix
# what broke on CPU, rerun. Every step has its own timeout and log; a failing step is reported
# and the next one still runs, so one call shows everything that breaks.
#
#   OUT=runs/cuda_check bash launch/cuda_check.sh          # from a checkout (no install needed)
#
# Steps (about 5 minutes on one H100-class GPU; each is skipped with a note when it cannot run):
#   1. torch/CUDA versions and the card
#   2. a short digits run on CUDA with train.amp=bf16 and train.packed=on, and its eval with
#      a per-client budget (digits ships with scikit-learn, so no download is needed)
#   3. the same run packed off, and a second fp32 run twice: are repeated CUDA runs bit-identical
#      (model hashes), and how far apart are packed and sequential steps?
#   4. one rank under torchrun (NCCL process group on the GPU; several ranks need several GPUs)
#   5. `cafedist bench packed` and `bench aggregate` on the GPU (--quick)
# Knobs: OUT (where logs and runs go; default runs/cuda_check), PYTHON (default python3),
# BENCH=0 skips step 5, ROUNDS (default 5), DEVICE (default cuda; DEVICE=cpu BENCH=0 ROUNDS=2 is a
# dry run of the script itself on a machine without a GPU).
set -uo pipefail

OUT="${OUT:-runs/cuda_check}"
PYTHON="${PYTHON:-python3}"
ROUNDS="${ROUNDS:-5}"
BENCH="${BENCH:-1}"
DEVICE="${DEVICE:-cuda}"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$(pwd)"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# step NAME TIMEOUT_S CMD...: run CMD with a timeout, log to $OUT/NAME.log, record the outcome.
step() {
    local name="$1" limit="$2"; shift 2
    local t0=$SECONDS rc
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    local line="$name: rc=$rc in $((SECONDS - t0)) s"
    [[ $rc -eq 124 ]] && line="$line (timed out after $limit s)"
    echo "$line" | tee -a "$SUMMARY"
    [[ $rc -ne 0 ]] && tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    return $rc
}

# One field of a run's summary.json (prints "missing" when the run did not finish).
field() {
    "$PYTHON" -c "import json,sys; s=json.load(open(sys.argv[1])); print(s.get(sys.argv[2], 'missing'))" \
        "$1/summary.json" "$2" 2>/dev/null || echo missing
}

# same RUN_A RUN_B: whether two finished runs have the same model hashes (yes/no; n/a if one is missing).
same() {
    local a b
    a="$(field "$1" model_hashes)" b="$(field "$2" model_hashes)"
    if [[ "$a" == missing || "$b" == missing ]]; then echo "n/a (a run did not finish)"
    elif [[ "$a" == "$b" ]]; then echo yes; else echo no; fi
}

step versions 60 "$PYTHON" -c "
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('card', torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())
"
cat "$OUT/versions.log" >> "$SUMMARY"

train() {  # train NAME OVERRIDES...: a short digits run on the GPU
    local name="$1"; shift
    step "train-$name" 300 "$PYTHON" -m cafedist train --config configs/digits.yaml --out "$OUT/$name" --no-progress \
        dist.device="$DEVICE" "train.rounds=$ROUNDS" data.val_fraction=0.1 "data.cache_dir=$OUT/stores" "$@"
}

train bf16-packed train.amp=bf16 train.packed=on
echo "  bf16 packed acc_per_exit: $(field "$OUT/bf16-packed" acc_per_exit)" | tee -a "$SUMMARY"
step eval-budget 180 "$PYTHON" -m cafedist eval "$OUT/bf16-packed" --budget macs=0.5
grep -E "within budget|personalized|global" "$OUT/eval-budget.log" | sed 's/^/  /' >> "$SUMMARY"

train fp32-packed train.packed=on
train fp32-seq train.packed=off
train fp32-seq-again train.packed=off
for run in fp32-packed fp32-seq fp32-seq-again; do
    echo "  $run acc_per_exit: $(field "$OUT/$run" acc_per_exit)" | tee -a "$SUMMARY"
done
echo "  repeated sequential runs bit-identical (model hashes): $(same "$OUT/fp32-seq" "$OUT/fp32-seq-again")" \
    | tee -a "$SUMMARY"
echo "  packed equals sequential bit for bit (model hashes; not expected, PERFORMANCE.md): \
$(same "$OUT/fp32-packed" "$OUT/fp32-seq")" | tee -a "$SUMMARY"

step torchrun-1rank 300 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -m cafedist train \
    --config configs/digits.yaml --out "$OUT/torchrun" --no-progress dist.device="$DEVICE" "train.rounds=$ROUNDS" \
    data.val_fraction=0.1 "data.cache_dir=$OUT/stores" train.packed=off
echo "  torchrun run equals the plain run (model hashes): $(same "$OUT/fp32-seq" "$OUT/torchrun")" | tee -a "$SUMMARY"

if [[ "$BENCH" != 0 ]]; then
    step bench-packed 300 "$PYTHON" -m cafedist bench packed --quick --device "$DEVICE"
    step bench-aggregate 300 "$PYTHON" -m cafedist bench aggregate --quick --device "$DEVICE"
    for b in bench-packed bench-aggregate; do sed 's/^/  /' "$OUT/$b.log" | tail -n 15 >> "$SUMMARY"; done
fi
echo "---- summary ($SUMMARY)"
cat "$SUMMARY"
