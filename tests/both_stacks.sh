#!/usr/bin/env bash
# Run the suite on two Python stacks at once, each with its own pytest
# temporary directory and log, then show how each ended; fail if either fails.
# Usage: both_stacks.sh PYTHON_1 PYTHON_2 PYTEST_ARGS...
# Much of each suite waits on worker processes and the GCS test server, so
# two at once on two cores take far less than one after the other.
set -uo pipefail
pythons=("$1" "$2")
shift 2
logs=$(mktemp -d)
pids=()
for i in 0 1; do
  "${pythons[$i]}" "$@" --basetemp="$logs/tmp$i" > "$logs/stack$i.log" 2>&1 &
  pids+=($!)
done
status=0
for i in 0 1; do
  wait "${pids[$i]}" || status=1
done
for i in 0 1; do
  echo "=== ${pythons[$i]}: $(tail -n 1 "$logs/stack$i.log")"
done
if [ "$status" -ne 0 ]; then
  for i in 0 1; do
    echo "=== ${pythons[$i]}: the log's last 300 lines"
    tail -n 300 "$logs/stack$i.log"
  done
fi
rm -rf "$logs"
exit "$status"
