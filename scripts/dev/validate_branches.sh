#!/usr/bin/env bash
# Session 6's first device call: the branches session 5 could not finish validating, and the
# race check on main, in one call (~8 min). Prepare here (out/ is git-ignored):
#   rm -rf out/b_states out/b_lean out/b_conv && mkdir -p out/b_states out/b_lean out/b_conv
#   git archive next/states-vectors | tar -x -C out/b_states
#   git archive next/states-lean | tar -x -C out/b_lean    # states-vectors + one commit
#   git archive next/conv-fwd | tar -x -C out/b_conv
# then run (device tool, carry ["out/b_states", "out/b_lean", "out/b_conv"]), in two calls
# (each part ~5 min):
#   scripts/dev/validate_branches.sh ssd > $OUT/validate_ssd.log 2>&1
#   scripts/dev/validate_branches.sh conv > $OUT/validate_conv.log 2>&1
set -uo pipefail
cd "$(dirname "$0")/../.."
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" MLMAMBA_CUDA_ARCHS="${MLMAMBA_CUDA_ARCHS:-90a}"
export PYTHONUNBUFFERED=1 COLUMNS=400
PY="${PYTHON:-python3}"
R=$PWD
PART="${1:-ssd}"
t0=$SECONDS
build() { (cd "$1" && $PY setup.py build_ext --inplace > "/tmp/build_$2.log" 2>&1) \
  || { echo "BUILD FAILED: $2"; tail -20 "/tmp/build_$2.log"; }; }
T="-q -p no:cacheprovider -rf"
if [ "$PART" = ssd ]; then
build "$R" main & build "$R/out/b_states" states & build "$R/out/b_lean" lean & wait
echo "== builds $((SECONDS - t0)) s"
echo "== main: backward length/size tests x5, then racecheck on them"
for i in $(seq 5); do
  timeout 60 $PY -m pytest $T tests/test_ssd_bwd_gpu.py -k "lengths or sizes" 2>&1 | grep -E "^FAILED|passed|failed"
done
timeout 100 compute-sanitizer --tool racecheck $PY -m pytest $T \
  "tests/test_ssd_bwd_gpu.py::test_lengths[127]" "tests/test_ssd_bwd_gpu.py::test_sizes[128-256]" 2>&1 | grep -E "RACECHECK SUMMARY|Hazard|passed|failed" | head
for b in b_states b_lean; do
  echo "== $b: backward tests, A/B against the register path"
  (cd out/$b && timeout 90 $PY -m pytest $T tests/test_ssd_bwd_gpu.py 2>&1 | grep -E "^FAILED|passed|failed"
   for m in "" sync; do echo "-- states mode '${m:-default}'"
     MLMAMBA_SSD_BWD_STATES=$m timeout 60 $PY -m bench --only ssd_bwd 2>&1 | grep -E "^ssd_scan bwd" | sort -u; done
   timeout 30 $PY scripts/dev/ssd_bwd_dev.py profile 2>&1 | grep -E "_kernel" | cut -c1-60,140-200)
done
fi
if [ "$PART" = conv ]; then
echo "== next/conv-fwd: conv1d GPU tests and forward timings (JIT build of the conv1d family)"
(cd out/b_conv && timeout 120 $PY scripts/dev/conv1d_dev.py build > /tmp/build_conv.log 2>&1 \
   || tail -20 /tmp/build_conv.log
 timeout 150 $PY -m pytest $T tests/test_conv1d_gpu.py -m gpu 2>&1 | grep -E "^FAILED|passed|failed"
 timeout 60 $PY scripts/dev/conv1d_dev.py fwd 2>&1 | tail -12)
fi
echo "== total $((SECONDS - t0)) s"
