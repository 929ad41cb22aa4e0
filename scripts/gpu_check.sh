#!/usr/bin/env bash
# One-shot GPU validation for mhc-compile (owner: scripts/gpu_check.sh; how to run: docs/gpu.md).
#
# Modes (first argument; default "kernels"):
#   kernels   one <= 8-minute command on an H100/H200: environment report, editable install (offline),
#             then bench_kernels.py in ONE process (bf16, T=16384; n=4 at C=1024/2048/4096, then n=2,8
#             at C=1024, then the decode shapes n=4, C=4096 at T=256 and 8, where the coefficient kernels
#             split K; every case's triton and eager rows first, Triton paths timed by CUDA-graph
#             replay; rows written to OUT as each finishes, so a kill keeps them), then every
#             gpu-marked test and the torch-internals canaries with pytest-xdist, natively (never
#             TRITON_INTERPRET on the GPU: the GPU image's triton 3.6 interpreter needs numpy < 2.4),
#             then the sm_90 resource checks (ahead-of-time compiles, no GPU needed).
#   train     bench_train.py on the C=1024 L=12 GPT (8x1024 tokens, bf16), variants
#             plain,mhc,mhc_norecomp,mhc_blocks by default (--variants to change; hand_mhc alone ~4 min).
#
# Options:
#   --out DIR         where results go (default: $OUT, else ./out)
#   --budget SEC      wall-clock budget of the whole run (default 470 = 7 min 50 s); every step runs
#                     under `timeout` with what is left, so the script ends, and results are
#                     collected, before the device tool's 10-minute limit
#   --variants LIST   train mode: bench_train variants (default plain,mhc,mhc_norecomp,mhc_blocks)
#   --shapes LIST     train mode: bench_train shapes (default 1024x12x8x1024)
#   --cpu-smoke       run every step in a tiny CPU form (gpu tests collected and skipped, --quick
#                     benchmarks, the interpreter where a CPU needs it): proves the script end to end
#   --no-install      skip `pip install -e .` (PYTHONPATH=. is always set)
#   --bench-only      kernels mode: skip the test steps (a second call that only measures)
#
# Files under DIR (at most 8, flat: what the device tool brings back):
#   gpu_check.log     everything printed, with a per-step status table at the end
#   summary.md        environment, step status, test summaries and the benchmark tables
#   kernels.json/.md  bench_kernels rows, rewritten as each row finishes (kernels mode)
#   train.json/.md    bench_train rows (train mode; train_rows.jsonl holds rows printed so far)
#   logs.tar.gz       every step's own log and the pytest junit XML files
set -uo pipefail

MODE=kernels
case "${1:-}" in kernels|train) MODE=$1; shift ;; esac
OUTDIR="${OUT:-./out}"
BUDGET=470
VARIANTS="plain,mhc,mhc_norecomp,mhc_blocks"
SHAPES="1024x12x8x1024"
SMOKE=0
INSTALL=1
TESTS=1
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUTDIR=$2; shift 2 ;;
    --budget) BUDGET=$2; shift 2 ;;
    --variants) VARIANTS=$2; shift 2 ;;
    --shapes) SHAPES=$2; shift 2 ;;
    --cpu-smoke) SMOKE=1; shift ;;
    --no-install) INSTALL=0; shift ;;
    --bench-only) TESTS=0; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/mhc_gpu_check.XXXXXX")"   # per-step files; only a bundle goes to OUTDIR
LOG="$OUTDIR/gpu_check.log"
SUMMARY="$OUTDIR/summary.md"
PY="${PYTHON:-python3}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MHC_BENCH_DEBUG="${MHC_BENCH_DEBUG:-1}"
RESERVE=25            # seconds kept for collecting results at the end
STATUS=()             # "name|rc|seconds|note" per step
: >"$LOG"

log() { echo "[gpu_check $(date -u +%H:%M:%S) +${SECONDS}s] $*" | tee -a "$LOG"; }

left() { echo $((BUDGET - SECONDS - RESERVE)); }

# run_step NAME MAX_SECONDS MIN_SECONDS CMD...: run CMD under timeout (the smaller of MAX and the
# budget left), its output to WORK/NAME.log and the main log; skipped when less than MIN is left.
run_step() {
  local name=$1 max=$2 min=$3; shift 3
  local t; t=$(left)
  [ "$t" -gt "$max" ] && t=$max
  if [ "$t" -lt "$min" ]; then
    log "SKIP $name: ${t}s left of the budget, needs ${min}s"
    STATUS+=("$name|skipped|0|budget")
    return 0
  fi
  log "START $name (timeout ${t}s): $*"
  local t0=$SECONDS rc
  timeout --signal=TERM --kill-after=10 "$t" "$@" 2>&1 | tee "$WORK/$name.log" >>"$LOG"
  rc=$?
  local note=""
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && note="timed out after ${t}s"
  log "END $name rc=$rc in $((SECONDS - t0))s $note"
  STATUS+=("$name|$rc|$((SECONDS - t0))|$note")
  collect
  return 0
}

# pytest: junit XML per step, no cache dir in the repo; -n when pytest-xdist is importable.
pytest_cmd() { echo "$PY -m pytest -q -p no:cacheprovider -rfEs"; }
xdist() { "$PY" -c "import xdist" 2>/dev/null && echo "-n ${1}" || true; }

# collect: refresh OUTDIR's files from WORK (called after every step, so a kill keeps them).
collect() {
  "$PY" - "$WORK" "$OUTDIR" "$MODE" <<'EOF' >>"$LOG" 2>&1
import glob, json, os, sys, tempfile
work, out, mode = sys.argv[1:4]

def write(path, text):
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".tmp_")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)

if mode == "kernels":
    pass  # bench_kernels.py writes OUT/kernels.json and kernels.md itself, row by row
else:
    rows = []
    for p in sorted(glob.glob(os.path.join(work, "bench_train*.log"))):
        rows += [l for l in open(p) if l.startswith('{"variant"')]
    if rows:
        write(os.path.join(out, "train_rows.jsonl"), "".join(rows))
    for ext in ("json", "md"):
        src = os.path.join(work, "train." + ext)
        if os.path.exists(src):
            write(os.path.join(out, "train." + ext), open(src).read())
EOF
  tar -czf "$OUTDIR/.logs.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv -f "$OUTDIR/.logs.tar.gz.tmp" "$OUTDIR/logs.tar.gz"
  write_summary
}

write_summary() {
  {
    echo "# gpu_check.sh $MODE ($( [ $SMOKE = 1 ] && echo cpu-smoke || echo gpu )), $(date -u '+%Y-%m-%d %H:%M UTC'), ${SECONDS}s"
    echo
    [ -f "$WORK/env.log" ] && { echo '```'; cat "$WORK/env.log"; echo '```'; echo; }
    echo "| step | rc | s | note |"
    echo "|---|---|---|---|"
    local s; for s in "${STATUS[@]+"${STATUS[@]}"}"; do echo "| ${s//|/ | } |"; done
    echo
    local f
    for f in "$WORK"/test_*.log; do
      [ -f "$f" ] || continue
      echo "## $(basename "$f" .log)"; echo '```'
      grep -E "passed|failed|error|skipped|collected|FAILED|ERROR" "$f" | tail -n 40
      echo '```'; echo
    done
    [ -f "$OUTDIR/kernels.md" ] && { echo "## bench_kernels"; echo; cat "$OUTDIR/kernels.md"; echo; }
    [ -f "$OUTDIR/train.md" ] && { echo "## bench_train"; echo; cat "$OUTDIR/train.md"; echo; }
    [ -f "$OUTDIR/train_rows.jsonl" ] && [ ! -f "$OUTDIR/train.md" ] && {
      echo "## bench_train rows so far (no table: the run did not finish)"; echo '```'; cat "$OUTDIR/train_rows.jsonl"; echo '```'; }
    true
  } >"$SUMMARY.tmp"
  mv -f "$SUMMARY.tmp" "$SUMMARY"
}

# ------------------------------------------------------------------------------------ environment
env_report() {
  local rev; rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null) || rev="no git"
  [ "$rev" != "no git" ] && ! git -C "$REPO" diff --quiet 2>/dev/null && rev="$rev, dirty"
  echo "repo: $REPO ($rev)"
  echo "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
  "$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", "sm", f"{p.major}{p.minor}", "SMs", p.multi_processor_count)
for mod in ("pytest", "xdist", "pytest_timeout", "transformers", "liger_kernel"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception:
        print(mod, "missing")
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  true
}

log "mode=$MODE smoke=$SMOKE budget=${BUDGET}s out=$OUTDIR work=$WORK"
env_report 2>&1 | tee "$WORK/env.log" >>"$LOG"
STATUS+=("env|$?|$SECONDS|")

if [ "$SMOKE" = 0 ] && [ "$INSTALL" = 1 ]; then
  # Offline editable install: registers the torch_dynamo_backends entry point "mhc" (one canary
  # checks it). --no-build-isolation: nothing can be fetched there; setuptools is installed.
  run_step install 120 20 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
fi

if [ "$MODE" = kernels ]; then
  if [ "$SMOKE" = 1 ]; then
    KB=(--quick --device cpu --tokens 64 --cpu-reps 1 --cases 4x32,2x32,2x32@8 --impls triton,eager --ops site,pre)
    INTERP=(env TRITON_INTERPRET=1)   # CPU: Triton runs in the interpreter
    XG=2; XC=2; CANARIES=(tests/test_torch_internals.py); SM90=(--collect-only); CAN_T=180  # 2 shared cores
  else
    KB=(--tokens 16384 --dtype bf16 --cases 4x1024,4x2048,4x4096,2x1024,8x1024,4x4096@256,4x4096@8
        --impls triton,eager,liger,inductor --ops site,boundary,coeffs,pre,post_res)
    INTERP=(env -u TRITON_INTERPRET)  # GPU: native Triton, never the interpreter
    XG=8; XC=4; CANARIES=(tests/test_torch_internals.py tests/test_recompute.py); SM90=(); CAN_T=90
  fi

  # 1. The benchmarks first, in one process (the Triton kernels compile once per n), each row
  #    written to OUTDIR as it finishes: the step's timeout, or the device tool's kill, keeps them.
  run_step bench_kernels 240 60 "${INTERP[@]}" "$PY" benchmarks/bench_kernels.py "${KB[@]}" \
    --json "$OUTDIR/kernels.json" --markdown "$OUTDIR/kernels.md"

  if [ "$TESTS" = 0 ]; then
    log "SKIP the test steps (--bench-only)"
  else
    # 2. Every gpu-marked test, natively on CUDA, spread over xdist workers (skipped on a CPU).
    run_step test_gpu 120 30 "${INTERP[@]}" $(pytest_cmd) $(xdist $XG) -m gpu tests --junitxml="$WORK/junit_gpu.xml"
    # 3. The canaries of every private torch API (the torch 2.11 check on the GPU image).
    run_step test_canaries "$CAN_T" 20 "${INTERP[@]}" $(pytest_cmd) $(xdist $XC) -m "not gpu" "${CANARIES[@]}" \
      --junitxml="$WORK/junit_canaries.xml"
    # 4. sm_90 resources of every kernel as a launch compiles them (AOT; needs no GPU or interpreter).
    run_step test_sm90 60 20 env -u TRITON_INTERPRET $(pytest_cmd) $(xdist $XC) "${SM90[@]}" \
      tests/test_kernel_aot.py "tests/test_kernels_mix.py::test_kernels_compile_for_sm90_without_spills" \
      --junitxml="$WORK/junit_sm90.xml"
  fi
else
  if [ "$SMOKE" = 1 ]; then
    TB=(--quick --compiler aot_eager)
    [ "$SHAPES" = 1024x12x8x1024 ] && SHAPES=32x2x2x32
  else
    TB=()
  fi
  run_step bench_train 560 60 "$PY" benchmarks/bench_train.py "${TB[@]}" --shapes "$SHAPES" --variants "$VARIANTS" \
    --streams 4 --json "$WORK/train.json" --markdown "$WORK/train.md"
fi

collect
log "done in ${SECONDS}s; results in $OUTDIR"
{ echo; echo "step | rc | seconds | note"; printf '%s\n' "${STATUS[@]+"${STATUS[@]}"}"; } | tee -a "$LOG"
rm -rf "$WORK"
# exit status: 1 when a step failed or timed out, else 3 when a step was skipped for time, else 0
final=0
for s in "${STATUS[@]+"${STATUS[@]}"}"; do
  rc=$(echo "$s" | cut -d'|' -f2)
  if [ "$rc" = skipped ]; then [ "$final" = 0 ] && final=3; elif [ "$rc" != 0 ]; then final=1; fi
done
exit "$final"
