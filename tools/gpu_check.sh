#!/usr/bin/env bash
# GPU readiness check (issue 15): on a machine with a CUDA GPU, after the README's set-up,
#   1. print the versions (python, torch and its CUDA, Triton, ...) and the device,
#   2. run the GPU-marked tests (pytest -m gpu),
#   3. run the GPU benchmark: fp16 and int8 with backend=auto (whose table has every backend's
#      time, error and verdict) against eager and torch.compile fp16, on the zoo and on Hugging
#      Face BERT-base and GPT-2, and write its tables into docs/bench/gpu/.
# Each step runs under a time bound (45 + 150 + 240 s, each killed 5 s after it: under 8 minutes
# in all); a step that fails or runs out of time ends the check with a non-zero status and the
# step named on stderr. The benchmark starts no mode in the last 75 s of its bound, so its tables
# are written either way (what did not fit reads "skipped"); it rewrites them after every model.
#
#   tools/gpu_check.sh             # the check, on the GPU machine
#   tools/gpu_check.sh --dry-run   # the same steps on the CPU with tiny settings, into a
#                                  # temporary folder (what tests/bench/test_gpu_check.py runs)
#
# Environment: PYTHON (default .venv/bin/python, else python3); GPU_CHECK_OUT (the folder for
# results.md, results.json, tests.txt, bench.txt, environment.txt); GPU_CHECK_TESTS (test paths,
# default tests); GPU_CHECK_MODELS, GPU_CHECK_MODES (the benchmark's, comma-separated);
# GPU_CHECK_ENV_S, GPU_CHECK_TEST_S, GPU_CHECK_BENCH_S (the steps' time bounds in seconds).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option '$1'; use --dry-run or --help" >&2; exit 2 ;;
esac

if [ -n "${PYTHON:-}" ]; then
    PY=$PYTHON
elif [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
fi

ZOO="resnet,mobilenet,bert,gpt,mlp"
if [ "$DRY_RUN" = 1 ]; then
    DEVICE=cpu
    OUT=${GPU_CHECK_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-dry-run.XXXXXX")}
    MODELS=${GPU_CHECK_MODELS:-mlp}
    MODES=${GPU_CHECK_MODES:-eager,graphopt-O2-auto,graphopt-O2-int8-auto}
    # tiny settings: a few timed calls per mode, one thread
    TIMING=(--batch 4 --min-time 0 --min-reps 2 --rounds 1 --threads 1)
else
    DEVICE=cuda
    OUT=${GPU_CHECK_OUT:-docs/bench/gpu}
    MODELS=${GPU_CHECK_MODELS:-$ZOO,bert-base,gpt2}
    MODES=${GPU_CHECK_MODES:-eager,eager-fp16,torch.compile-fp16,graphopt-O2-fp16-auto,graphopt-O2-int8-auto}
    TIMING=(--batch 8 --min-time 0.2)
fi
read -r -a TESTS <<< "${GPU_CHECK_TESTS:-tests}"
ENV_S=${GPU_CHECK_ENV_S:-45}
TEST_S=${GPU_CHECK_TEST_S:-150}
BENCH_S=${GPU_CHECK_BENCH_S:-240}
# the benchmark starts no mode after this; the rest of its bound is for the mode then running,
# the timing of the modes built and the tables
BENCH_LIMIT_S=$(( BENCH_S > 100 ? BENCH_S - 75 : BENCH_S * 3 / 4 ))
mkdir -p "$OUT"

fail() {
    echo "gpu_check: FAILED: $*" >&2
    exit 1
}

# run_step TITLE SECONDS LOG COMMAND...: COMMAND under a time bound, its output shown and kept in
# LOG; a non-zero status or the bound reached ends the check, naming the step
run_step() {
    local title=$1 limit=$2 log=$3 start=$SECONDS status
    shift 3
    echo "== $title (time bound ${limit} s)"
    set +e
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$log"
    status=${PIPESTATUS[0]}
    set -e
    if [ "$status" = 124 ] || [ "$status" = 137 ]; then
        fail "$title timed out after ${limit} s (output in $log)"
    elif [ "$status" != 0 ]; then
        fail "$title failed with exit status $status (output in $log)"
    fi
    echo "== $title: passed in $(( SECONDS - start )) s"
}

ENVIRONMENT=$(cat <<'PY'
import importlib
import os
import platform
import sys

device = sys.argv[1]
missing = []
for name in ("torch", "triton", "graphopt", "pytest", "matplotlib", "transformers"):
    try:
        importlib.import_module(name)
    except Exception as exc:  # not installed, or built for another torch
        missing.append(f"{name} ({type(exc).__name__}: {exc})")
if missing:
    sys.exit(
        "cannot import " + "; ".join(missing) + ". Set up as the README says: python3 -m venv "
        ".venv && .venv/bin/pip install -e '.[dev,bench]' (on a GPU machine torch comes with CUDA)"
    )

import torch
import triton


def version(name):
    try:
        return importlib.import_module(name).__version__
    except Exception:
        return "not installed"


print(
    f"python {platform.python_version()}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
    f"triton {triton.__version__}; onnxruntime {version('onnxruntime')}; "
    f"transformers {version('transformers')}; graphopt {version('graphopt')}"
)
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit(
            f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}); run this on a GPU machine, or with --dry-run"
        )
    props = torch.cuda.get_device_properties(0)
    print(
        f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability "
        f"{props.major}.{props.minor}; {torch.cuda.device_count()} CUDA device(s)"
    )
else:
    print(f"device: cpu, {os.cpu_count()} cores (dry run: the GPU steps on the CPU, tiny settings)")
PY
)

echo "gpu_check: device $DEVICE, python $PY, writing into $OUT"
run_step "environment" "$ENV_S" "$OUT/environment.txt" "$PY" -c "$ENVIRONMENT" "$DEVICE"
if [ "$DEVICE" = cuda ] && command -v nvidia-smi > /dev/null; then
    timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
        | tee -a "$OUT/environment.txt" || true
fi

run_step "GPU tests (pytest -m gpu ${TESTS[*]})" "$TEST_S" "$OUT/tests.txt" \
    "$PY" -m pytest -m gpu -q -rfEs -p no:cacheprovider "${TESTS[@]}"

run_step "GPU benchmark ($MODELS)" "$BENCH_S" "$OUT/bench.txt" \
    "$PY" -m graphopt.tools.cli bench --device "$DEVICE" --models "$MODELS" --modes "$MODES" \
    --out "$OUT" --time-limit "$BENCH_LIMIT_S" --scaling-batches "" --depths "" --kernels no \
    "${TIMING[@]}"

# modes that failed or did not fit are findings of the run, not failures of the check: say so
"$PY" - "$OUT/results.json" <<'PY'
import collections
import json
import sys

results = json.load(open(sys.argv[1]))["results"]
count = collections.Counter(r["status"] for r in results)
print(f"gpu_check: benchmark modes: {dict(count)}")
for r in results:
    if r["status"] in ("failed", "skipped"):
        print(f"gpu_check: note: {r['model']} {r['mode']} {r['status']}: {r['reason']}")
PY
echo "gpu_check: passed in $SECONDS s; tables in $OUT (results.md, results.json, tests.txt)"
