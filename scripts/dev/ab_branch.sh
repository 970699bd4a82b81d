#!/usr/bin/env bash
# A/B of one branch against main in one device call (~4 min): scripts/dev/ab_trees.sh with
# main here and the branch in out/ab (git-ignored): both built side by side, the branch's
# tests for the changed kernel, then one bench module in alternating processes.
# Prepare here:
#   rm -rf out/ab && mkdir -p out/ab && git archive BRANCH | tar -x -C out/ab
# then (device tool, carry ["out/ab"]):
#   scripts/dev/ab_branch.sh "pytest -k expression" bench_module > $OUT/ab.log 2>&1
# e.g. scripts/dev/ab_branch.sh "chunk_wgmma or states_wgmma" ssd_bwd
set -uo pipefail
KEXPR="${1:?pytest -k expression}" MOD="${2:?bench module (ssd_bwd, msc, ...)}"
TESTS="$KEXPR" ROUNDS="${ROUNDS:-2}" exec "$(dirname "$0")/ab_trees.sh" "$MOD" . out/ab
