#!/usr/bin/env bash
# The prepared GPU check: run it once on a machine with one CUDA GPU, read its summary, fix
# what broke on CPU, rerun. Every step has its own timeout and log; a failing step is reported
# and the next one still runs, so one call shows everything that breaks. Exit status 0 only
# when every step succeeded.
#
#   OUT=runs/cuda_check bash launch/cuda_check.sh          # no install needed (PYTHONPATH = the checkout)
#
# Steps (about 6 minutes on one H100-class GPU):
#   1. torch/CUDA versions and the card
#   2. a short digits run on CUDA with train.amp=bf16 and train.packed=on, and its eval with
#      a per-client budget (digits ships with scikit-learn, so no download is needed)
#   3. fp32 runs packed and sequential, the sequential one twice: are repeated CUDA runs
#      bit-identical (model hashes), and do packed and sequential runs agree?
#   4. one rank under torchrun with a process group (NCCL) all the same, two ranks
#      under torchrun sharing the GPU with gloo (collectives on CUDA tensors), and runs with
#      train.resident_clients=2 (parking, prefetch on a copy stream), sequential and packed
#   5. `cafedist bench packed` and `bench aggregate` on the GPU (--quick)
# Every run starts afresh (a rerun into the same OUT retrains). Knobs: OUT (default
# runs/cuda_check), PYTHON (default python3), ROUNDS (default 5), BENCH=0 skips step 5,
# DEADLINE (seconds for the whole script, default 540: a later step gets what is left, and is
# skipped when nothing is), DEVICE (default cuda; DEVICE=cpu BENCH=0 ROUNDS=2 dry-runs the
# script on a machine without a GPU).
set -uo pipefail

PYTHON="${PYTHON:-python3}"
ROUNDS="${ROUNDS:-5}"
BENCH="${BENCH:-1}"
DEVICE="${DEVICE:-cuda}"
DEADLINE="${DEADLINE:-540}"
mkdir -p "${OUT:=runs/cuda_check}"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."  # the checkout: configs/ and the package
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

# note TEXT: one line of the summary (also shown as progress).
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME TIMEOUT_S CMD...: run CMD with a timeout (at most what is left of DEADLINE), log to
# $OUT/NAME.log, record the outcome; a failure sets the exit status.
step() {
    local name="$1" limit="$2"; shift 2
    local left=$((DEADLINE - SECONDS))
    if ((left <= 0)); then
        note "$name: skipped (DEADLINE of $DEADLINE s reached)"; FAILED=1; return 1
    fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS rc line
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    line="$name: rc=$rc in $((SECONDS - t0)) s"
    [[ $rc -eq 124 ]] && line="$line (timed out after $limit s)"
    note "$line"
    if [[ $rc -ne 0 ]]; then
        FAILED=1
        tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
    fi
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

RUN_ARGS=(--config configs/digits.yaml --no-progress dist.device="$DEVICE" "train.rounds=$ROUNDS"
          data.val_fraction=0.1 "data.cache_dir=$OUT/stores")

train() {  # train NAME OVERRIDES...: a fresh short digits run on the device
    local name="$1"; shift
    rm -rf "${OUT:?}/$name"
    step "train-$name" 180 "$PYTHON" -m cafedist train --out "$OUT/$name" "${RUN_ARGS[@]}" "$@"
}

step versions 60 "$PYTHON" -c "
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    print('card', torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())
"
sed 's/^/  /' "$OUT/versions.log" | tee -a "$SUMMARY"

train bf16-packed train.amp=bf16 train.packed=on
note "  bf16 packed acc_per_exit: $(field "$OUT/bf16-packed" acc_per_exit)"
step eval-budget 120 "$PYTHON" -m cafedist eval "$OUT/bf16-packed" --budget macs=0.5 --device "$DEVICE"
grep -E "within budget|personalized|global" "$OUT/eval-budget.log" | sed 's/^/  /' | tee -a "$SUMMARY"

train fp32-packed train.packed=on
train fp32-seq train.packed=off
train fp32-seq-again train.packed=off
for run in fp32-packed fp32-seq fp32-seq-again; do
    note "  $run acc_per_exit: $(field "$OUT/$run" acc_per_exit)"
done
note "  repeated sequential runs bit-identical (model hashes): $(same "$OUT/fp32-seq" "$OUT/fp32-seq-again")"
note "  packed equals sequential bit for bit (model hashes; not expected, PERFORMANCE.md):" \
     "$(same "$OUT/fp32-packed" "$OUT/fp32-seq")"

rm -rf "${OUT:?}/torchrun"
# CAFEDIST_PROCESS_GROUP=always: the one rank gets a process group (NCCL on the GPU) and every
# collective of training runs through it, as with several ranks
step torchrun-1rank 180 env CAFEDIST_PROCESS_GROUP=always \
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 -m cafedist train \
    --out "$OUT/torchrun" "${RUN_ARGS[@]}" train.packed=off
note "  torchrun run equals the plain run (model hashes): $(same "$OUT/fp32-seq" "$OUT/torchrun")"

# two ranks on the one GPU: NCCL refuses a shared GPU, gloo moves CUDA tensors through the host
# (the gather/scatter/object collectives on CUDA tensors, and rank 0's aggregation of them)
rm -rf "${OUT:?}/torchrun2"
step torchrun-2rank-gloo 180 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 2 -m cafedist train \
    --backend gloo --out "$OUT/torchrun2" "${RUN_ARGS[@]}" train.packed=off
note "  2 ranks equal 1 rank (model hashes): $(same "$OUT/fp32-seq" "$OUT/torchrun2")"

# at most 2 clients resident on the GPU (pinned parking, the copy stream, prefetch thread), also packed
train fp32-bounded train.packed=off train.resident_clients=2
note "  resident_clients=2 equals all resident (model hashes): $(same "$OUT/fp32-seq" "$OUT/fp32-bounded")"
train fp32-packed-bounded train.packed=on train.resident_clients=2

if [[ "$BENCH" != 0 ]]; then
    for b in packed aggregate; do
        step "bench-$b" 240 "$PYTHON" -m cafedist bench "$b" --quick --device "$DEVICE" \
            && tail -n 15 "$OUT/bench-$b.log" | sed 's/^/  /' | tee -a "$SUMMARY"
    done
fi
note "---- $( ((FAILED)) && echo "some steps failed" || echo "every step succeeded") (summary: $SUMMARY)"
exit $FAILED
