#!/usr/bin/env bash
# Session 7's branch call (~7 min): next/fwd-vectors (forward v8 pre-pass, v9 warp-specialized
# kernel) and next/msc-bcconv (msc B/C conv), each built in its own folder beside main, their
# tests and A/B timings in one process order. Prepare here (out/ is git-ignored):
#   rm -rf out/b_fwd out/b_msc && mkdir -p out/b_fwd out/b_msc
#   git archive next/fwd-vectors | tar -x -C out/b_fwd
#   git archive next/msc-bcconv | tar -x -C out/b_msc
# then (device tool, carry ["out/b_fwd", "out/b_msc"]):
#   scripts/dev/validate_branches.sh > $OUT/validate.log 2>&1
# A barrier bug in the ws kernel traps after ~17 s (a CUDA error in that pytest process), it
# does not hang; its tests run in their own process first.
set -uo pipefail
cd "$(dirname "$0")/../.."
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" MLMAMBA_CUDA_ARCHS="${MLMAMBA_CUDA_ARCHS:-90a}"
export PYTHONUNBUFFERED=1 COLUMNS=400
PY="${PYTHON:-python3}"
T="-q -p no:cacheprovider -rf"
t0=$SECONDS
build() { (cd "$1" && $PY setup.py build_ext --inplace > "/tmp/build_$2.log" 2>&1) \
  || { echo "BUILD FAILED: $2"; tail -20 "/tmp/build_$2.log"; }; }
build . main & build out/b_fwd fwd & build out/b_msc msc & wait
echo "== builds $((SECONDS - t0)) s"
echo "== next/fwd-vectors: the new forward tests (bitwise A/B), then the whole forward file"
(cd out/b_fwd
 timeout 120 $PY -m pytest $T tests/test_ssd_fwd_gpu.py -k "vector_prepass" 2>&1 | grep -E "^FAILED|passed|failed|rror"
 timeout 120 $PY -m pytest $T tests/test_ssd_fwd_gpu.py -k "ws_kernel" 2>&1 | grep -E "^FAILED|passed|failed|rror"
 timeout 150 $PY -m pytest $T tests/test_ssd_fwd_gpu.py tests/test_msc_gpu.py 2>&1 | grep -E "^FAILED|passed|failed"
 echo "-- ssd_time (default = pre-pass; 'no pre-pass' = main's walk; 'ws, no split' = v9)"
 timeout 150 $PY scripts/dev/ssd_time.py 2>&1 | tail -4)
echo "== next/msc-bcconv: msc tests, then the msc bench against main"
(cd out/b_msc && timeout 120 $PY -m pytest $T tests/test_msc_gpu.py 2>&1 | grep -E "^FAILED|passed|failed")
for d in out/b_msc .; do echo "-- msc bench in $d"
  (cd $d && timeout 90 $PY -m bench --only msc 2>&1 | grep -E "^msc"); done
(cd out/b_msc && timeout 60 $PY scripts/dev/msc_prof.py cross 2>&1 | grep -E "bc_conv|wgmma")
echo "== total $((SECONDS - t0)) s"
