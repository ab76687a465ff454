#!/usr/bin/env bash
# Runs the engine's cancellation and state-machine suites N times in a row (default 20) and stops
# at the first failure, naming the run. A loop of separate pytest processes (no pytest-repeat):
# each run gets a fresh interpreter and fresh hypothesis examples (the suites are not
# derandomized), so a flake depending on order, seed or timing has 20 chances to show.
#
#   scripts/stress-engine.sh [N] [extra pytest args...]      (or: make stress N=20)
#
# Bounded: N runs, each under a 600 s timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-20}"
shift || true
suites=(tests/engine/test_cancellation.py tests/engine/test_state_machine.py
  tests/engine/test_quota_state_machine.py)
log="$(mktemp -t stress-engine.XXXXXX)"
start=$(date +%s)
for i in $(seq 1 "$runs"); do
  if ! timeout 600 .venv/bin/pytest -q -x -p no:cacheprovider "${suites[@]}" "$@" >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "stress-engine: run $i of $runs FAILED (full output: $log)" >&2
    exit 1
  fi
  echo "run $i/$runs: $(tail -n 1 "$log")"
done
rm -f "$log"
echo "stress-engine: $runs of $runs runs passed in $(($(date +%s) - start)) s"
