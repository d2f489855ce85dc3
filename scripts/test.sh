#!/usr/bin/env bash
# All tests: vet, unit and VM integration tests, bounded fuzzing of every
# parser that reads guest- or user-controlled bytes, and the Python SDK
# suite when present. Called by `make test` and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
FUZZTIME=${FUZZTIME:-10s}

echo "== go vet"
go vet ./...

echo "== go test"
go test -count=1 -timeout 45m ./...

echo "== fuzz (${FUZZTIME} each)"
# Every Fuzz* function in the module, run for a bounded time.
grep -rl --include='*_test.go' -E '^func Fuzz[A-Za-z0-9_]+\(' . | sort | while read -r f; do
  dir=$(dirname "$f")
  for fn in $(grep -oE '^func Fuzz[A-Za-z0-9_]+' "$f" | awk '{print $2}'); do
    echo "-- $dir $fn"
    if ! out=$(go test -run='^$' -fuzz="^${fn}\$" -fuzztime="$FUZZTIME" "./$dir" 2>&1); then
      printf '%s\n' "$out" | tail -40
      exit 1
    fi
  done
done

if [ -d sdk/python/tests ]; then
  echo "== python sdk"
  (cd sdk/python && python3 -m unittest discover -s tests -v)
fi
echo "== all tests passed"
