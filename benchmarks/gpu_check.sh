#!/usr/bin/env bash
# GPU check: build nflux with CUDA kernels, run the CUDA tests and print the benchmark tables.
# For a machine with one GPU, torch (CUDA build), nvcc, CMake, ninja, pybind11 and
# scikit-build-core preinstalled and no network. Run from anywhere:
#
#     bash benchmarks/gpu_check.sh            # output also goes to $OUT/gpu_check.log if set
#
# Environment: PYTHON (default: python3, else python), CUDA_ARCH (default 90),
# BUILD_TIMEOUT / TEST_TIMEOUT / BENCH_TIMEOUT (seconds; defaults keep the total under ~8 min).
# Each section runs even if an earlier one failed; the exit status is 1 if any section failed.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1

if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi

PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
CUDA_ARCH="${CUDA_ARCH:-90}"
BUILD_TIMEOUT="${BUILD_TIMEOUT:-300}"
TEST_TIMEOUT="${TEST_TIMEOUT:-150}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-90}"
FAILED=()
T0=$SECONDS

section() { printf '\n==================== %s (t=%ss) ====================\n' "$1" "$((SECONDS - T0))"; }
record() {  # record NAME STATUS
  if [[ "$2" -ne 0 ]]; then
    FAILED+=("$1 (exit $2)")
    echo ">>> $1: FAILED (exit $2)"
  else
    echo ">>> $1: ok"
  fi
}

section "environment"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi failed"
nvcc --version 2>&1 | tail -n 2 || echo "nvcc not found"
cmake --version 2>&1 | head -n 1
echo "python: $PYTHON"
"$PYTHON" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
PY
record "environment" $?

section "build (pip install -e ., CUDA arch ${CUDA_ARCH})"
# CMake builds the CUDA kernels only if it finds nvcc; point it there when it is off PATH.
if [[ -z "${CUDACXX:-}" ]]; then
  for c in "$(command -v nvcc)" "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"; do
    if [[ -n "$c" && -x "$c" ]]; then export CUDACXX="$c"; break; fi
  done
fi
echo "CUDACXX=${CUDACXX:-<not found>}"
export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCH}"
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
BUILD_LOG="${OUT:-/tmp}/gpu_check_build.log"
timeout "$BUILD_TIMEOUT" "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . >"$BUILD_LOG" 2>&1
BUILD_RC=$?
grep -E 'nflux: CUDA|CUDA compiler|Building|Linking|warning|error|Error' "$BUILD_LOG" | tail -n 60
echo "--- last lines of $BUILD_LOG ---"
tail -n 25 "$BUILD_LOG"
record "build" "$BUILD_RC"

section "build info"
"$PYTHON" -c 'import nflux; print(nflux.build_info())'
record "build info" $?
"$PYTHON" - <<'PY'
import sys
import nflux
info = nflux.build_info()
ok = info["extension_loaded"] and info["cuda_kernels"] and info["cuda_available"]
print("CUDA kernels loaded and a GPU visible:", bool(ok))
sys.exit(0 if ok else 1)
PY
record "CUDA kernels present" $?

section "rq_spline CUDA vs CPU smoke check"
# Independent of the test suite: the CUDA op against the CPU op (float64 inputs) for every
# dtype, K in the local buckets, an exact bucket, and the workspace path (K > 128), forward,
# inverse and backward, with ~10% of inputs in the tails.
timeout 120 "$PYTHON" - <<'PY'
import sys
import torch
import nflux  # noqa: F401  (loads the extension)

op, bwd = torch.ops.nflux.rq_spline, torch.ops.nflux.rq_spline_backward
args = (3.0, 1e-3, 1e-3, 1e-3)
# Each dtype is compared with the CPU float64 op on the same (rounded) inputs. Large K in float
# is ill-conditioned for some elements (knots as cumulative sums, bins of width ~1/K), so the
# tolerance of the float types grows with K/16 and a dtype fails when more than 1% of the entries
# of an output are off by more than it relative to 1 + |ref|; a bug is off almost everywhere.
tol = {torch.float64: 1e-7, torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 4e-2}
names = ("y", "lad", "g_x", "g_w", "g_h", "g_d")
bad = 0
g = torch.Generator().manual_seed(0)
for K in (1, 5, 8, 16, 20, 128, 200):
    n = 4099
    x = torch.rand(n, generator=g, dtype=torch.float64) * 6.6 - 3.3
    w, h = (torch.randn(n, K, generator=g, dtype=torch.float64) for _ in range(2))
    d = torch.randn(n, K - 1, generator=g, dtype=torch.float64)
    go, gl = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    for inverse in (False, True):
        for dt, t in tol.items():
            t = t if dt == torch.float64 else t * max(1.0, K / 16)
            c = [a.to("cuda", dt) for a in (x, w, h, d, go, gl)]
            r = [a.cpu().double() for a in c]
            ref = op(*r[:4], inverse, *args) + bwd(r[4], r[5], *r[:4], inverse, *args)
            got = op(*c[:4], inverse, *args) + bwd(c[4], c[5], *c[:4], inverse, *args)
            torch.cuda.synchronize()
            report, ok = [], True
            for name, a, b in zip(names, got, ref):
                if b.numel() == 0:
                    continue
                err = (a.double().cpu() - b).abs() / (1 + b.abs())
                frac = (err > t).double().mean().item()
                finite = bool(torch.isfinite(a).all()) == bool(torch.isfinite(b).all())
                ok = ok and frac <= 1e-2 and finite
                report.append(f"{name} {err.max().item():.0e}/{frac:.0e}")
            bad += not ok
            print(f"K={K:4d} inv={int(inverse)} {str(dt)[6:]:8s} max err/frac>tol: " + " ".join(report)
                  + f" (tol {t:.0e}) {'ok' if ok else 'MISMATCH'}")
# Empty input and non-contiguous input.
e = torch.empty(0, device="cuda")
p4, p3 = torch.empty(0, 4, device="cuda"), torch.empty(0, 3, device="cuda")
print("empty:", [tuple(t.shape) for t in op(e, p4, p4, p3, False, *args)])
xs = torch.randn(64, 2, device="cuda")[:, 0]
ws = torch.randn(64, 8, 2, device="cuda")[..., 0]
ds = torch.randn(64, 7, 2, device="cuda")[..., 0]
y, lad = op(xs, ws, ws, ds, False, *args)
y2, lad2 = op(xs.contiguous(), ws.contiguous(), ws.contiguous(), ds.contiguous(), False, *args)
nc_ok = torch.equal(y, y2) and torch.equal(lad, lad2)
print("non-contiguous matches contiguous:", nc_ok)
bad += not nc_ok
sys.exit(1 if bad else 0)
PY
record "rq_spline smoke check" $?

section "pytest -k cuda"
timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest -q tests -k cuda -p no:cacheprovider 2>&1 | tail -n 60
TEST_RC=${PIPESTATUS[0]}
if [[ "$TEST_RC" -eq 5 ]]; then
  echo "no test matched -k cuda"
  TEST_RC=0
fi
record "pytest -k cuda" "$TEST_RC"

section "benchmarks/bench_rq_spline.py --device cuda"
timeout "$BENCH_TIMEOUT" "$PYTHON" benchmarks/bench_rq_spline.py --device cuda
record "bench_rq_spline" $?

section "benchmarks/bench_rq_spline.py --device cuda --bins 256 (workspace path)"
timeout "$BENCH_TIMEOUT" "$PYTHON" benchmarks/bench_rq_spline.py --device cuda --bins 256 --n 262144
record "bench_rq_spline K=256" $?

section "benchmarks/bench_autoregressive.py --device cuda (made_inverse persistent kernel vs ATen composite vs D-pass)"
timeout "$BENCH_TIMEOUT" "$PYTHON" benchmarks/bench_autoregressive.py --device cuda --sections sample
record "bench_autoregressive" $?

for script in benchmarks/bench_*.py; do
  [[ "$script" == benchmarks/bench_rq_spline.py || "$script" == benchmarks/bench_autoregressive.py ]] && continue
  # Only scripts that take --device; a failure of one does not stop the others.
  if ! timeout 30 "$PYTHON" "$script" --help 2>/dev/null | grep -q -- '--device'; then
    echo "skip $script (no --device option)"
    continue
  fi
  if (( SECONDS - T0 > 420 )); then
    echo "skip $script (time budget spent)"
    continue
  fi
  section "$script --device cuda"
  timeout "$BENCH_TIMEOUT" "$PYTHON" "$script" --device cuda
  record "$(basename "$script")" $?
done

section "summary"
if ((${#FAILED[@]})); then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "all sections passed"
