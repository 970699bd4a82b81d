#!/usr/bin/env bash
# One device call (~4 min) that validates and measures this branch (next/bwd-states-wg: the
# dinit fix and step 1 of the SSD backward on wgmma), run with the branch checked out:
#   scripts/dev/bwd_branch_call.sh > $OUT/bwd.log 2>&1
# A barrier bug in the wgmma walk would hang a stage wait: its tests run first, in their own
# process, under a timeout.
set -uo pipefail
cd "$(dirname "$0")/../.."
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" MLMAMBA_CUDA_ARCHS="${MLMAMBA_CUDA_ARCHS:-90a}"
export PYTHONUNBUFFERED=1 COLUMNS=400
PY="${PYTHON:-python3}"
T="-q -p no:cacheprovider -rf"
t0=$SECONDS
$PY setup.py build_ext --inplace > /tmp/build.log 2>&1 || { tail -20 /tmp/build.log; exit 1; }
echo "== build $((SECONDS - t0)) s"
timeout 120 $PY -m pytest $T tests/test_ssd_bwd_gpu.py -k "states_wgmma or dinit_strong" 2>&1 \
  | grep -E "^FAILED|passed|failed|rror"
MLMAMBA_TEST_SEED=2269501624 timeout 60 $PY -m pytest $T tests/test_ssd_bwd_gpu.py \
  -k long_strong_decay 2>&1 | grep -E "^FAILED|passed|failed"
timeout 200 $PY -m pytest $T tests/test_ssd_bwd_gpu.py 2>&1 | grep -E "^FAILED|passed|failed"
MLMAMBA_SSD_BWD_STATES=wgmma timeout 200 $PY -m pytest $T tests/test_ssd_bwd_gpu.py 2>&1 \
  | grep -E "^FAILED|passed|failed"
for mode in "" wgmma "" wgmma; do
  echo "-- bench ssd_bwd, MLMAMBA_SSD_BWD_STATES=${mode:-default}"
  MLMAMBA_SSD_BWD_STATES=$mode timeout 90 $PY -m bench --only ssd_bwd 2>&1 | grep -E "^ssd_scan"
done
echo "== total $((SECONDS - t0)) s"
