#!/usr/bin/env bash
# A/B of one branch against main in one device call (~4 min): both trees built side by side
# (main here, the branch in out/ab, git-ignored), the branch's tests for the changed kernel,
# then one bench module in alternating processes (main, branch, main, branch).
# Prepare here:
#   rm -rf out/ab && mkdir -p out/ab && git archive BRANCH | tar -x -C out/ab
# then (device tool, carry ["out/ab"]):
#   scripts/dev/ab_branch.sh "pytest -k expression" bench_module > $OUT/ab.log 2>&1
# e.g. scripts/dev/ab_branch.sh "chunk_wgmma or states_wgmma" ssd_bwd
set -uo pipefail
cd "$(dirname "$0")/../.."
KEXPR="${1:?pytest -k expression}" MOD="${2:?bench module (ssd_bwd, msc, ...)}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" MLMAMBA_CUDA_ARCHS="${MLMAMBA_CUDA_ARCHS:-90a}"
export PYTHONUNBUFFERED=1 COLUMNS=400
PY="${PYTHON:-python3}"
t0=$SECONDS
build() { (cd "$1" && $PY setup.py build_ext --inplace > "/tmp/build_$2.log" 2>&1) \
  || { echo "BUILD FAILED: $2"; tail -20 "/tmp/build_$2.log"; }; }
build . main & build out/ab branch & wait
grep -hE "C75|spill stores" /tmp/build_branch.log | sort | uniq -c | head -8
echo "== builds $((SECONDS - t0)) s"
echo "== branch tests: -k '$KEXPR'"
(cd out/ab && timeout 150 $PY -m pytest -q -p no:cacheprovider -rf -m gpu -k "$KEXPR" tests \
   2>&1 | grep -E "^FAILED|passed|failed|rror")
for d in . out/ab . out/ab; do
  echo "-- bench $MOD in ${d/#./main}"
  (cd "$d" && timeout 60 $PY -m bench --only "$MOD" 2>&1 | grep -vE "^---|^ ")
done
echo "== total $((SECONDS - t0)) s"
