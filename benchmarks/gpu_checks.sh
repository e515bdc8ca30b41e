#!/usr/bin/env bash
# Every outstanding GPU measurement of docs/benchmarks.md, as one script for a lent GPU
# (H100/H200, 16 cores, no internet):
#
#   (a) nvidia-smi                                   -> $OUT/nvidia-smi.log
#   (b) benchmarks/embed.py, SD1.5-size text encoder, CUDA float16
#                                                    -> $OUT/embed.log, $OUT/embed.json
#   (c) restore_fullsize: benchmarks/restore_fullsize.py, CUDA bf16, 50 DDPM steps, for each
#       attention layout of GPU_CHECKS_LAYOUTS (default "paper adapter"), against the paper's
#       8.82 s on an A100                            -> $OUT/restore_fullsize.{log,json}
#   (d) train_fullsize: benchmarks/train_fullsize.py, CUDA, batch 8, 512², bf16, gradient
#       checkpointing off and on, for each layout   -> $OUT/train_fullsize.{log,json}
#   (e) latents: benchmarks/latents.py --sd-only, the latents stage's rows/s with an SD1.5-size
#       VAE on CUDA in float16, batch 32           -> $OUT/latents.{log,json}
#   (f) train_latents: benchmarks/train_fullsize.py, paper layout, batch 8, checkpointing on,
#       VAE encoded in the step vs cached moments  -> $OUT/train_latents.{log,json}
#
# plus $OUT/summary.log (the Python environment and each step's status and time): 8 files,
# what a device call brings back at most (each step's per-layout results are merged into its
# one JSON, {"paper": ..., "adapter": ...}). OUT defaults to bench-out/gpu. Each step has its
# own timeout and all of them share a deadline (GPU_CHECKS_BUDGET_S, default 540 s), so
# the script ends on its own inside a 10-minute device call; a step that fails or times
# out does not stop the later ones, and the exit status is 1 if any failed.
#
# Steps to run may be named (default: all four, in this order). Both layouts of (c) and (d)
# together do not fit one 10-minute call (building the random SD1.5-size weights alone takes
# minutes), so split them over calls, e.g.:
#
#   bash benchmarks/gpu_checks.sh nvidia-smi embed restore_fullsize     # call 1
#   bash benchmarks/gpu_checks.sh train_fullsize                         # call 2
#
# (each call starts a fresh machine: nothing of .cache survives, so each call rebuilds the
# weights it needs; GPU_CHECKS_LAYOUTS=paper halves a step).
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
if [ "${1:-}" = "--dry-run" ]; then
    DRY=1
    shift
fi
STEPS=${*:-"nvidia-smi embed restore_fullsize train_fullsize latents train_latents"}
LAYOUTS=${GPU_CHECKS_LAYOUTS:-"paper adapter"}
for s in $STEPS; do
    case $s in nvidia-smi|embed|restore_fullsize|train_fullsize|latents|train_latents) ;; *)
        echo "unknown step $s; steps: nvidia-smi embed restore_fullsize train_fullsize latents train_latents" >&2
        exit 2 ;;
    esac
done
wanted() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
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
wanted nvidia-smi && step nvidia-smi 30 nvidia-smi
wanted embed && step embed 120 "$PY" benchmarks/embed.py --hidden 768 --layers 12 --heads 12 --intermediate 3072 \
    --device cuda --dtype float16 --rows 2000 --out "$OUT/embed.json"
# Per layout: the script once per layout of $LAYOUTS into .cache/gpu-checks/NAME-LAYOUT.json (not
# under $OUT: 8 files come back at most); the JSONs are merged into $OUT/NAME.json afterwards.
for name in restore_fullsize train_fullsize; do
    wanted $name || continue
    args=(--device cuda)
    [ $name = restore_fullsize ] && args+=(--dtype bf16 --steps 50)
    mkdir -p .cache/gpu-checks
    for layout in $LAYOUTS; do
        step "$name-$layout" 480 "$PY" benchmarks/$name.py "${args[@]}" --layout "$layout" \
            --out "$ROOT/.cache/gpu-checks/$name-$layout.json"
    done
    # one log and one JSON per step: the per-layout logs are appended into $OUT/$name.log
    for layout in $LAYOUTS; do
        [ -f "$OUT/$name-$layout.log" ] && { echo "== $layout"; cat "$OUT/$name-$layout.log"; rm -f "$OUT/$name-$layout.log"; }
    done >"$OUT/$name.log"
    [ "$DRY" -eq 1 ] && continue
    "$PY" - "$OUT/$name.json" "$ROOT/.cache/gpu-checks" "$name" $LAYOUTS <<'EOF' | tee -a "$SUMMARY"
import json, pathlib, sys
out, folder, name, layouts = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4:]
merged = {l: json.loads((folder / f"{name}-{l}.json").read_text()) for l in layouts
          if (folder / f"{name}-{l}.json").is_file()}
pathlib.Path(out).write_text(json.dumps(merged, indent=1) + "\n")
print(f"[{name}] merged layouts {sorted(merged)} -> {out}")
EOF
done

wanted latents && step latents 240 "$PY" benchmarks/latents.py --sd-only --sd-rows 256 --device cuda \
    --dtype float16 --batch-size 32 --out "$OUT/latents.json"
if wanted train_latents; then
    mkdir -p .cache/gpu-checks
    for how in encode cached; do
        step "train_latents-$how" 300 "$PY" benchmarks/train_fullsize.py --device cuda --layout paper --cases on \
            --latents "$how" --out "$ROOT/.cache/gpu-checks/train_latents-$how.json"
    done
    for how in encode cached; do
        [ -f "$OUT/train_latents-$how.log" ] && { echo "== $how"; cat "$OUT/train_latents-$how.log"; rm -f "$OUT/train_latents-$how.log"; }
    done >"$OUT/train_latents.log"
    [ "$DRY" -eq 1 ] || "$PY" - "$OUT/train_latents.json" "$ROOT/.cache/gpu-checks" <<'EOF' | tee -a "$SUMMARY"
import json, pathlib, sys
out, folder = sys.argv[1], pathlib.Path(sys.argv[2])
merged = {h: json.loads((folder / f"train_latents-{h}.json").read_text()) for h in ("encode", "cached")
          if (folder / f"train_latents-{h}.json").is_file()}
pathlib.Path(out).write_text(json.dumps(merged, indent=1) + "\n")
print(f"[train_latents] merged {sorted(merged)} -> {out}")
EOF
fi

note "gpu_checks: done in $((SECONDS - START))s; $([ "$FAILED" -eq 0 ] && echo "all steps ok" || echo "SOME STEPS FAILED")"
exit "$FAILED"
