#!/usr/bin/env bash
# Every outstanding GPU measurement of docs/benchmarks.md, as one script for a lent GPU
# (H100/H200, 16 cores, no internet), in about 5–9 minutes:
#
#   (a) nvidia-smi                                   -> $OUT/nvidia-smi.log
#   (b) benchmarks/embed.py, SD1.5-size text encoder, CUDA float16
#                                                    -> $OUT/embed.log, $OUT/embed.json
#   (c) benchmarks/restore_fullsize.py, CUDA bf16, 50 DDPM steps
#                                                    -> $OUT/restore_fullsize.{log,json}
#   (d) benchmarks/train_fullsize.py, CUDA, batch 8, 512², checkpointing off and on
#                                                    -> $OUT/train_fullsize.{log,json}
#
# plus $OUT/summary.log (the Python environment and each step's status and time): 8 files,
# what a device call brings back at most. OUT defaults to bench-out/gpu. Each step has its
# own timeout and all of them share a deadline (GPU_CHECKS_BUDGET_S, default 540 s), so
# the script ends on its own inside a 10-minute device call; a step that fails or times
# out does not stop the later ones, and the exit status is 1 if any failed.
#
# Python: the working tree travels to the GPU machine but .venv does not, and that machine
# reaches no package registry. Its image has Python 3.12 with CUDA PyTorch, accelerate,
# timm, transformers, ... but not diffusers, open_clip (and ftfy, wcwidth). So:
#
#   here (PyPI reachable), once:   bash benchmarks/gpu_checks.sh --wheels     # -> .whl/ (ignored, ~5 MB)
#   on the GPU (device run, carry [".whl"]):   bash benchmarks/gpu_checks.sh
#   anywhere, to check the commands and their options: bash benchmarks/gpu_checks.sh --dry-run
#   (sets up Python as below, then has each script parse its real options and stop there).
#
# On the GPU the script uses, in this order: a .venv that already imports everything; else
# the image's python3 with the wheels of .whl/ installed (no network) into .cache/gpu-site
# on PYTHONPATH; else `make venv` (a fresh .venv from PyPI, where PyPI is reachable).
# The SD1.5-size random weights (about 7 GB with the restore checkpoint) are built on the
# GPU machine under .cache/bench-restore-fullsize by step (c) and reused by step (d).
set -u
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# Packages the GPU image lacks (KINDS.md's list), at the versions of the pinned environment.
WHEELS="diffusers==0.42.1 open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4"

if [ "${1:-}" = "--wheels" ]; then
    pip=(python3 -m pip)
    [ -x .venv/bin/python ] && pip=(.venv/bin/python -m pip)
    mkdir -p .whl
    # shellcheck disable=SC2086
    "${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl $WHEELS || exit 1
    ls -l .whl
    echo "now run on the GPU machine with carry [\".whl\"]: bash benchmarks/gpu_checks.sh"
    exit 0
fi

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
# --dry-run: the script's main() parses the step's options (argparse errors → exit 2) and stops.
ARGCHECK='import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_and_stop(self, args=None, namespace=None):
    parse(self, args, namespace)
    print("options accepted:", " ".join(sys.argv[1:]))
    raise SystemExit(0)
argparse.ArgumentParser.parse_args = parse_and_stop
script = sys.argv[1]
import os; sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
sys.exit(runpy.run_path(script, run_name="gpu_checks_dry")["main"](sys.argv[2:]))'

OUT=${OUT:-bench-out/gpu}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY=$OUT/summary.log
: >"$SUMMARY"
export PYTHONUNBUFFERED=1
BUDGET=${GPU_CHECKS_BUDGET_S:-540}
START=$SECONDS
FAILED=0

note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME LIMIT_S COMMAND...: run with its own timeout (cut to the shared deadline),
# stdout+stderr tee'd to $OUT/NAME.log, status into the summary.
step() {
    local name=$1 limit=$2 left rc t0
    shift 2
    left=$((BUDGET - (SECONDS - START) - 5))
    if [ "$left" -lt 20 ]; then
        note "[$name] SKIPPED: ${left}s left of the ${BUDGET}s budget"
        FAILED=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    note "[$name] start (timeout ${limit}s): $*"
    t0=$SECONDS
    if [ "$DRY" -eq 0 ]; then
        timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
        rc=${PIPESTATUS[0]}
    elif [ "$1" = nvidia-smi ]; then
        { command -v nvidia-smi || echo "nvidia-smi is not on this machine (a dry run does not need it)"; } \
            2>&1 | tee "$OUT/$name.log"
        rc=0
    else  # "$1" is the Python, "$2" the script
        timeout 120 "$1" -c "$ARGCHECK" "${@:2}" 2>&1 | tee "$OUT/$name.log"
        rc=${PIPESTATUS[0]}
    fi
    if [ "$rc" -eq 0 ]; then
        note "[$name] ok in $((SECONDS - t0))s"
    else
        FAILED=1
        if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
            note "[$name] TIMED OUT after $((SECONDS - t0))s (limit ${limit}s)"
        else
            note "[$name] FAILED (exit status $rc) after $((SECONDS - t0))s"
        fi
    fi
}

# ------------------------------------------------------------------ Python ---
CHECK='import torch, diffusers, accelerate, timm, transformers, open_clip, cv2, pyarrow, skimage'
setup_python() {
    if [ -x .venv/bin/python ] && .venv/bin/python -c "$CHECK" 2>/dev/null; then
        PY=$ROOT/.venv/bin/python
        echo "using the existing .venv"
    elif compgen -G ".whl/*.whl" >/dev/null && python3 -c 'import torch' 2>/dev/null; then
        PY=$(command -v python3)
        echo "installing .whl/*.whl (no network) into .cache/gpu-site for $PY"
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$ROOT/.cache/gpu-site" .whl/*.whl || return 1
        export PYTHONPATH=$ROOT/.cache/gpu-site${PYTHONPATH:+:$PYTHONPATH}
    else
        echo "no usable .venv and no .whl/: make venv (needs PyPI; on a lent GPU run" \
             "'bash benchmarks/gpu_checks.sh --wheels' here first and carry .whl)"
        make venv || return 1
        PY=$ROOT/.venv/bin/python
    fi
    "$PY" -c "$CHECK" || return 1
    "$PY" - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
print(" ".join(f"{n}={md.version(n)}" for n in ("diffusers", "accelerate", "transformers", "tokenizers", "timm",
                                                 "open_clip_torch", "huggingface_hub", "safetensors", "numpy")))
EOF
}

note "gpu_checks: $(date -u +%FT%TZ) on $(hostname), results in $OUT, budget ${BUDGET}s"
PY=""
# in this shell (not a pipeline's subshell), so PY and PYTHONPATH stay set
setup_python > >(tee -a "$SUMMARY") 2>&1
setup_rc=$?
sleep 0.2  # let tee catch up
if [ "$setup_rc" -ne 0 ] || [ -z "$PY" ]; then
    note "[setup] FAILED: no Python environment with torch, diffusers, open_clip, ...; the Python steps are skipped"
    timeout 30 nvidia-smi >"$OUT/nvidia-smi.log" 2>&1
    exit 1
fi

# ------------------------------------------------------------------- steps ---
step nvidia-smi 30 nvidia-smi
step embed 120 "$PY" benchmarks/embed.py --hidden 768 --layers 12 --heads 12 --intermediate 3072 \
    --device cuda --dtype float16 --rows 2000 --out "$OUT/embed.json"
step restore_fullsize 300 "$PY" benchmarks/restore_fullsize.py --device cuda --dtype bf16 --steps 50 \
    --out "$OUT/restore_fullsize.json"
step train_fullsize 300 "$PY" benchmarks/train_fullsize.py --device cuda --out "$OUT/train_fullsize.json"

note "gpu_checks: done in $((SECONDS - START))s; $([ "$FAILED" -eq 0 ] && echo "all steps ok" || echo "SOME STEPS FAILED")"
exit "$FAILED"
