#!/usr/bin/env bash
# First device call of session 5: build the checked-out tree (meant for branch next/all: main +
# the branches written without GPU time at the end of session 4), run the tests those branches
# touch, then A/B timings of each change in the same run. About 4 minutes; a compact summary.
#   git checkout next/all && scripts/dev/validate_next.sh > $OUT/validate.log 2>&1
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" MLMAMBA_CUDA_ARCHS="${MLMAMBA_CUDA_ARCHS:-90a}"
PY="${PYTHON:-python3}"
$PY setup.py build_ext --inplace > /tmp/validate_build.log 2>&1 || { grep -E "error" /tmp/validate_build.log | head; exit 1; }
echo "== tests (msc, ssd forward incl. TMA, ssd backward, ops)"
timeout 240 $PY -m pytest -q --no-header -p no:cacheprovider tests/test_msc_gpu.py \
  tests/test_ssd_fwd_gpu.py tests/test_ssd_bwd_gpu.py tests/test_ops.py -rf 2>&1 \
  | grep -E "^FAILED|^ERROR|passed|failed" | head -20
echo "== SSD forward: cp.async (default) vs TMA, same run"
timeout 60 $PY scripts/dev/ssd_time.py 4 2048 80 32 576 32 | sed 's/^/cp.async /'
MLMAMBA_SSD_FWD_TMA=1 timeout 60 $PY scripts/dev/ssd_time.py 4 2048 80 32 576 32 | sed 's/^/TMA      /'
echo "== msc_scan forward by merge mode, and the msc / ssd_bwd bench rows"
timeout 60 $PY scripts/dev/msc_time.py
timeout 150 $PY -m bench --only msc,ssd_bwd 2>&1 | grep -E "^(msc|ssd_scan bwd|ssd_scan fwd\+bwd)"
