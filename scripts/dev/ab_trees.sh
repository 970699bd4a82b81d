#!/usr/bin/env bash
# A/B of several source trees in one device call: each tree built in parallel (its own
# folder), then one bench module in alternating processes (tree 1, tree 2, ..., R rounds) and,
# where a tree has it, scripts/dev/ssd_bwd_dump.py (outputs compared bitwise against the
# first tree's). Prepare here, e.g.:
#   rm -rf out/f out/g && mkdir -p out/f out/g
#   git archive next/chunk-wg-order~1 | tar -x -C out/f; git archive next/chunk-wg-order | tar -x -C out/g
# then (device tool, carry ["out/f", "out/g"]):
#   ROUNDS=2 DUMP=1 scripts/dev/ab_trees.sh ssd_bwd,msc . out/f out/g > $OUT/ab.log 2>&1
# EXTRA_BUILD="out/ab out/e" builds more trees in the same parallel step (no bench, no dump);
# TESTS="pytest -k expression" runs those GPU tests in every bench tree after the first.
set -uo pipefail
cd "$(dirname "$0")/../.."
MOD="${1:?bench modules (ssd_bwd,msc,...)}"; shift
TREES=("${@:-.}")
PY="${PYTHON:-python3}"
export MLMAMBA_CUDA_ARCHS="${MLMAMBA_CUDA_ARCHS:-90a}" PYTHONUNBUFFERED=1 COLUMNS=400
read -r -a EXTRA <<< "${EXTRA_BUILD:-}"
NB=$(( ${#TREES[@]} + ${#EXTRA[@]} ))
export MAX_JOBS="${MAX_JOBS:-$(( $(nproc) / NB > 1 ? $(nproc) / NB : 1 ))}"
t0=$SECONDS
for d in "${TREES[@]}" "${EXTRA[@]}"; do
  (cd "$d" && $PY setup.py build_ext --inplace > "/tmp/build_$(echo "$d" | tr / _).log" 2>&1) \
    || { echo "BUILD FAILED: $d"; tail -20 "/tmp/build_$(echo "$d" | tr / _).log"; } &
done
wait
echo "== builds $((SECONDS - t0)) s (MAX_JOBS=$MAX_JOBS each)"
for d in "${TREES[@]}" "${EXTRA[@]}"; do  # ptxas' wgmma serialization and spill reports
  grep -hE "C75|spill stores" "/tmp/build_$(echo "$d" | tr / _).log" | sort | uniq -c | head -8
done
if [ -n "${TESTS:-}" ]; then
  for d in "${TREES[@]:1}"; do
    echo "== tests in $d: -k '$TESTS'"
    (cd "$d" && timeout 150 $PY -m pytest -q -p no:cacheprovider -rf -m gpu -k "$TESTS" tests \
       2>&1 | grep -E "^FAILED|passed|failed|rror")
  done
fi
if [ -n "${DUMP:-}" ]; then
  for d in "${TREES[@]}"; do
    (cd "$d" && PYTHONPATH=. timeout 120 $PY scripts/dev/ssd_bwd_dump.py dump \
      "/tmp/dump_$(echo "$d" | tr / _).pt" > /dev/null) || echo "DUMP FAILED: $d"
  done
  first="/tmp/dump_$(echo "${TREES[0]}" | tr / _).pt"
  for d in "${TREES[@]:1}"; do
    echo "-- dump $d vs ${TREES[0]}"
    PYTHONPATH=. $PY scripts/dev/ssd_bwd_dump.py compare "$first" "/tmp/dump_$(echo "$d" | tr / _).pt" | tail -4
  done
fi
for ((r = 1; r <= ${ROUNDS:-2}; r++)); do
  for d in "${TREES[@]}"; do
    echo "-- round $r: $d"
    (cd "$d" && timeout "${TIMEOUT:-90}" $PY -m bench --only "$MOD" 2>&1 \
      | grep -vE "^---|^ |^case|^rows written" | sort -u)
  done
done
echo "== total $((SECONDS - t0)) s"
