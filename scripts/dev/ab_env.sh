#!/usr/bin/env bash
# One bench module in alternating processes under several environment settings, R rounds
# (default 2), rows only: the A/B of a developer knob inside one device call.
#   scripts/dev/ab_env.sh msc "MLMAMBA_MSC_STREAMS=1" "MLMAMBA_MSC_STREAMS=4"
#   ROUNDS=3 GREP="fwd\+bwd" scripts/dev/ab_env.sh msc "" "MLMAMBA_MSC_CONV_ROWS=0"
# An empty setting runs the defaults. Build first (setup.py build_ext --inplace).
set -uo pipefail
cd "$(dirname "$0")/../.."
MOD="${1:?bench module}"; shift
for ((round = 1; round <= ${ROUNDS:-2}; round++)); do
  for setting in "$@"; do
    echo "-- round $round: ${setting:-defaults}"
    env $setting timeout "${TIMEOUT:-90}" "${PYTHON:-python3}" -m bench --only "$MOD" 2>&1 \
      | grep -E "${GREP:-.}" | grep -vE "^---|^ |^case|^rows written|^device" | sort -u
  done
done
