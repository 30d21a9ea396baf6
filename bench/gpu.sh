#!/usr/bin/env bash
# loraflow's trainer on one GPU: LoRA and QLoRA tokens/s and peak memory on Llama-shaped models of
# about 1B and 7B parameters (random weights, built from configs there: the GPU machine has no network).
#
# 1. Here, once (PyPI needed): put the packages the GPU machine lacks into the git-ignored .wheels/
#        bash bench/gpu_prepare.sh
# 2. Through the device tool, one call:
#        run(command="bash bench/gpu.sh", carry=[".wheels"], timeout_s=540)
#    It prints the table at the end and returns $OUT/gpu_results.json (figures, environment, one
#    record per run, failures with their reason) and $OUT/gpu.log (everything printed).
#    Expected: about 6 minutes. DEADLINE_S below stops starting new steps in time to write the table
#    before timeout_s; a step past RUN_LIMIT_S is stopped and its row says so.
#
# On a CPU, to try the whole path with a tiny model (the CUDA-only checks are refused, and say so):
#     SIZES=tiny SEQ_LEN=64 PACK_TO=256 LIGER=off PYTHON=.venv/bin/python bash bench/gpu.sh
set -uo pipefail

SIZES=${SIZES:-"1b 8b"}          # see MODEL_SHAPES in bench/gpu_train.py
METHODS=${METHODS:-"lora qlora"}
SEQ_LEN=${SEQ_LEN:-512}          # tokens per example, all examples exactly this long
PACK_TO=${PACK_TO:-2048}         # packed rows of this many tokens (0: one example per row)
BATCH_SIZE=${BATCH_SIZE:-2}      # rows per step (no gradient accumulation)
LIGER=${LIGER:-"off on"}         # Liger's kernels off and on (on needs liger-kernel there)
CHECKS=${CHECKS:-yes}            # the crash paths and correctness checks first (bench/gpu_checks.py)
UNTIMED_STEPS=${UNTIMED_STEPS:-3}
TIMED_STEPS=${TIMED_STEPS:-15}
DEADLINE_S=${DEADLINE_S:-450}    # no step starts later than this; keep it about 90 s under timeout_s
RUN_LIMIT_S=${RUN_LIMIT_S:-240}  # one step (build a model, or one training run) at most
MIN_STEP_S=${MIN_STEP_S:-60}     # a step with less time than this left is skipped, not started
PYTHON=${PYTHON:-python3}
WORK=${WORK:-}                   # models (7B: 13.5 GB), datasets, run records; unset: see below

cd "$(dirname "$0")/.."
if [ -z "$WORK" ]; then # /tmp, unless this checkout's disk has more room (/tmp may be held in memory)
    WORK=/tmp/loraflow-gpu-bench
    [ "$(df -Pk . | awk 'NR == 2 {print $4}')" -gt "$(df -Pk /tmp | awk 'NR == 2 {print $4}')" ] &&
        WORK=$PWD/.gpu-bench-work
fi
OUT=${OUT:-$WORK/out}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PER_ROW=$((PACK_TO > 0 ? PACK_TO / SEQ_LEN : 1))
EXAMPLES=$(((UNTIMED_STEPS + TIMED_STEPS) * BATCH_SIZE * PER_ROW))
PACKING=()
[ "$PACK_TO" -gt 0 ] && PACKING=(--pack-to "$PACK_TO")
SITE=$WORK/site

bench() {
    "$PYTHON" bench/gpu_train.py --work "$WORK" "$@"
}

# step NAME ARGS...: one bench/gpu_train.py process, within RUN_LIMIT_S and the deadline
step() {
    local left=$((DEADLINE_S - SECONDS))
    local limit=$((left < RUN_LIMIT_S ? left : RUN_LIMIT_S))
    echo "=== $* (at ${SECONDS}s, limit ${limit}s)"
    timeout --kill-after=15 "$limit" "$PYTHON" bench/gpu_train.py --work "$WORK" "$@"
    local status=$?
    [ "$status" -eq 124 ] && echo "=== stopped after ${limit}s: $*"
    return "$status"
}

install_missing_wheels() {
    compgen -G ".wheels/*.whl" >/dev/null || {
        echo "no .wheels/: nothing installed (run bench/gpu_prepare.sh here and carry .wheels)"
        return 0
    }
    local needed
    needed=$("$PYTHON" - .wheels/*.whl <<'EOF'
"""The carried wheels this Python lacks, or has older versions of (a newer one already there stays)."""
import importlib.metadata
import sys
from pathlib import Path

from packaging.version import Version

# pydantic pins pydantic-core exactly: the pair goes in together or not at all
FOLLOWS = {"pydantic-core": "pydantic"}

wheels = {}
for path in sys.argv[1:]:
    name, version = Path(path).name.split("-")[:2]
    wheels[name.lower().replace("_", "-")] = (Version(version), path)


def lacking(name: str) -> bool:
    try:
        return Version(importlib.metadata.version(name)) < wheels[name][0]
    except importlib.metadata.PackageNotFoundError:
        return True


chosen = {name for name in wheels if name not in FOLLOWS and lacking(name)}
chosen |= {name for name, leader in FOLLOWS.items() if name in wheels and leader in chosen}
for name in sorted(wheels):
    what = "install" if name in chosen else "already there"
    print(f"  {name} {wheels[name][0]}: {what}", file=sys.stderr)
    if name in chosen:
        print(wheels[name][1])
EOF
    ) || return 1
    rm -rf "$SITE"
    if [ -n "$needed" ]; then
        # shellcheck disable=SC2086 # one wheel path per word
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$SITE" $needed || return 1
        export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
    fi
}

main() {
    echo "loraflow GPU bench, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(uname -m)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null ||
        echo "nvidia-smi: not found"
    mkdir -p "$WORK"
    df -h "$WORK" | tail -1
    echo "sizes: $SIZES; methods: $METHODS; sequence $SEQ_LEN; batch $BATCH_SIZE;" \
        "$TIMED_STEPS timed steps after $UNTIMED_STEPS; deadline ${DEADLINE_S}s"

    install_missing_wheels || { echo "installing the carried wheels failed"; return 1; }
    "$PYTHON" - <<'EOF' || { echo "loraflow's trainer does not import here: see above"; return 1; }
import importlib.metadata
import platform

import torch

import loraflow.train  # noqa: F401 - what every run needs

print(f"Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}),",
      f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
for name in ("transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "liger-kernel", "flash-attn", "pydantic", "duckdb"):
    try:
        print(f"  {name} {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"  {name}: not installed")
try:
    import bitsandbytes
except Exception as err:  # noqa: BLE001 - said here, the QLoRA rows then say how it failed
    print(f"  bitsandbytes does not import ({type(err).__name__}: {err}): QLoRA runs will fail")
else:
    print(f"  bitsandbytes from {bitsandbytes.__file__}")
EOF

    rm -rf "$WORK/runs"
    if [ "$CHECKS" = yes ]; then
        echo "=== crash paths and correctness on a tiny model (at ${SECONDS}s)"
        timeout --kill-after=15 "$RUN_LIMIT_S" "$PYTHON" bench/gpu_checks.py --work "$WORK/checks" --out "$OUT" ||
            echo "=== some checks failed: see $OUT/gpu_checks.json"
    fi
    for size in $SIZES; do
        prepared=yes
        if [ $((DEADLINE_S - SECONDS)) -lt "$MIN_STEP_S" ]; then
            prepared="no time left to build it"
        elif ! step prepare --size "$size" --seq-len "$SEQ_LEN" --examples "$EXAMPLES"; then
            prepared="building the model or dataset failed (see gpu.log)"
        fi
        for method in $METHODS; do
            for liger in $LIGER; do
                options=("${PACKING[@]}" --liger "$liger")
                if [ "$prepared" != yes ]; then
                    bench skip --size "$size" --method "$method" "${options[@]}" --reason "$prepared"
                elif [ $((DEADLINE_S - SECONDS)) -lt "$MIN_STEP_S" ]; then
                    bench skip --size "$size" --method "$method" "${options[@]}" \
                        --reason "no time left (DEADLINE_S=$DEADLINE_S)"
                elif [ "$liger" = on ] && ! "$PYTHON" -c "import liger_kernel" 2>/dev/null; then
                    bench skip --size "$size" --method "$method" "${options[@]}" \
                        --reason "liger-kernel is not installed there"
                else
                    step train --size "$size" --method "$method" --batch-size "$BATCH_SIZE" \
                        --untimed-steps "$UNTIMED_STEPS" --timed-steps "$TIMED_STEPS" "${options[@]}"
                fi
                bench report --out "$OUT" >/dev/null # $OUT holds the results so far, should the call be cut off
            done
        done
    done
    echo "=== done in ${SECONDS}s"
    bench report --out "$OUT"
}

mkdir -p "$OUT"
main 2>&1 | tee -a "$OUT/gpu.log"
exit "${PIPESTATUS[0]}"
