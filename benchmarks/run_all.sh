#!/usr/bin/env bash
# Run every benchmark in its quick (smoke) mode, one after another, from the repository root.
#
#   benchmarks/run_all.sh                 # quick mode, results printed
#   benchmarks/run_all.sh OUT_DIR         # also write OUT_DIR/<name>.json
#   PYTHON=/path/to/python benchmarks/run_all.sh
#
# Exits non-zero if any benchmark failed (a missed target is not a failure: nothing asserts on time).
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
OUT="${1:-}"
[ -n "$OUT" ] && mkdir -p "$OUT"
failed=()
for script in benchmarks/bench_*.py; do
    name="$(basename "$script" .py)"
    echo "=== $name --quick"
    args=(--quick)
    [ -n "$OUT" ] && args+=(--json "$OUT/$name.json")
    start=$(date +%s)
    if ! "$PY" "$script" "${args[@]}"; then
        failed+=("$name")
    fi
    echo "--- $name: $(( $(date +%s) - start )) s"
    echo
done
if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi
echo "all benchmarks ran"
